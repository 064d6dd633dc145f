"""NLVR2 (docs/DESIGN.md, "NLVR2 (NLVR.py)"): is the sentence true of the pair of images?
Fine-tuning with momentum
distillation from a text-assignment checkpoint of Pretrain_nlvr.py; accuracy on val and test after
every epoch.

    python NLVR.py --config configs/NLVR.yaml --checkpoint pretrain_model_nlvr.pth --output_dir output/NLVR
    python NLVR.py --config configs/NLVR.yaml --checkpoint output/NLVR/checkpoint_best.pth --output_dir out --evaluate

Parity:
- the original copies the online encoders into the momentum encoders before loading the
  checkpoint, which has no momentum weights, so the momentum model starts from the initial (not
  the text-assignment) weights. `nlvr_momentum_from_checkpoint: true` in the config starts it from
  the loaded weights instead;
- the original also writes checkpoint_<epoch>.pth whenever val accuracy improves; like the other
  fine-tuning scripts we keep checkpoint_best.pth and checkpoint_last.pth.
"""
import configuration
import tasks

TASK = tasks.NLVR  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import engine
import utils
from models.model_nlvr import ALBEF


def train_step(model, batch, alpha, run, update_momentum=True):
    # the two images of each pair stacked as [image0 ; image1] on dim 0 (dataset.NLVRCollate)
    batch = batch.to(run.device)
    return {'loss': model(batch.image, batch.text, targets=batch.targets, train=True, alpha=alpha,
                          update_momentum=update_momentum)}


def main(args):
    run = engine.setup(args, TASK)
    config = run.config

    utils.print0('Creating NLVR2 datasets')
    train_loader, val_loader, test_loader = engine.task_loaders(run, TASK, config['batch_size'], config['batch_size'])

    utils.print0('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    training = engine.prepare(run, model, sync_momentum=config.get('nlvr_momentum_from_checkpoint', False))
    evaluate = engine.split_evaluator({'val': val_loader, 'test': test_loader},
                                      lambda loader: engine.evaluate_accuracy(training.module, loader, run))
    engine.fit(run, training, train_loader, train_step, evaluate, best_key='val_acc', evaluate_only=args.evaluate,
               alpha_ramp=config['warm_up'], digits=4)


def get_parser():
    return engine.task_parser(__doc__, './configs/NLVR.yaml', 'output/NLVR',
                              evaluate='evaluate the checkpoint, no training (new)')


if __name__ == '__main__':
    engine.launch(main, get_parser())
