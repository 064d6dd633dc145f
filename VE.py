"""Visual entailment on SNLI-VE (docs/DESIGN.md, "Visual entailment (VE.py)"):
does the image entail, contradict or leave neutral the
sentence? Fine-tuning with momentum distillation; accuracy on val and test after every epoch.

    python VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/VE
    python VE.py --config configs/VE.yaml --checkpoint output/VE/checkpoint_best.pth --output_dir out --evaluate
"""
import configuration
import tasks

TASK = tasks.VE  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import engine
import utils
from models.model_ve import ALBEF


def train_step(model, batch, alpha, run, update_momentum=True):
    batch = batch.to(run.device)  # hypotheses tokenised by the loader workers (dataset.VECollate)
    return {'loss': model(batch.image, batch.text, targets=batch.targets, train=True, alpha=alpha,
                          update_momentum=update_momentum)}


def main(args):
    run = engine.setup(args, TASK)
    config = run.config

    utils.print0('Creating SNLI-VE datasets')
    train_loader, val_loader, test_loader = engine.task_loaders(run, TASK, config['batch_size_train'],
                                                                config['batch_size_test'])

    utils.print0('Creating model')
    training = engine.prepare(run, ALBEF(config=config, text_encoder=engine.bert_weights(config),
                                         tokenizer=run.tokenizer))
    evaluate = engine.split_evaluator({'val': val_loader, 'test': test_loader},
                                      lambda loader: engine.evaluate_accuracy(training.module, loader, run))
    engine.fit(run, training, train_loader, train_step, evaluate, best_key='val_acc', evaluate_only=args.evaluate,
               alpha_ramp=config['warm_up'], digits=4)


def get_parser():
    return engine.task_parser(__doc__, './configs/VE.yaml', 'output/VE',
                              evaluate='evaluate the checkpoint, no training')


if __name__ == '__main__':
    engine.launch(main, get_parser())
