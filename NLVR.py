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
configuration.precheck(__name__, __file__)  # config mistakes in a second, before torch loads

import argparse

import torch

import engine
import utils
from dataset import create_dataset
from models.model_nlvr import ALBEF

REQUIRED = {'train_file', 'val_file', 'test_file', 'image_root', 'bert_config', 'image_res', 'batch_size', 'alpha',
            'distill', 'warm_up'}
OPTIONAL = {'eval_ema', 'nlvr_momentum_from_checkpoint'}


def unpack(batch):
    """(images, texts, targets): the two images of each pair stacked as [image0 ; image1] on dim 0."""
    image0, image1, text, targets = batch
    return torch.cat([image0, image1], dim=0), text, targets


def train_step(model, batch, alpha, run):
    image, text, targets = unpack(batch)
    image, targets = utils.to_device((image, targets), run.device)
    text_input = utils.to_device(run.tokenizer(text, padding='longest', return_tensors='pt'), run.device)
    return {'loss': model(image, text_input, targets=targets, train=True, alpha=alpha)}


def main(args):
    config = engine.load_config(args.config, REQUIRED, OPTIONAL)
    run = engine.setup(args, config)
    run.tokenizer = engine.build_tokenizer(config)

    print('Creating NLVR2 datasets')
    train_dataset, val_dataset, test_dataset = create_dataset('nlvr', config)
    train_loader = engine.train_loader(train_dataset, config['batch_size'], run, config)
    val_loader, test_loader = (engine.eval_loader(d, config['batch_size'], run, config, distributed=True)
                               for d in (val_dataset, test_dataset))

    print('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    model = model.to(run.device)
    optimizer, lr_scheduler = engine.build_optimization(config, model)
    checkpointer, state = engine.start_state(
        args, run, model, optimizer, lr_scheduler, allow_new_heads=not args.evaluate,
        sync_momentum=config.get('nlvr_momentum_from_checkpoint', False))
    model, model_without_ddp = engine.wrap_model(model, run)

    evaluate = engine.split_evaluator({'val': val_loader, 'test': test_loader},
                                      lambda loader: engine.evaluate_accuracy(model_without_ddp, loader, run, unpack))
    engine.fit(model, train_loader, optimizer, lr_scheduler, run, state, checkpointer, train_step, evaluate,
               best_key='val_acc', evaluate_only=args.evaluate, alpha_ramp=config['warm_up'], digits=4)

def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[engine.get_args_parser('./configs/NLVR.yaml', 'output/NLVR')])
    parser.add_argument('--evaluate', action='store_true', help='evaluate the checkpoint, no training (new)')
    return parser


if __name__ == '__main__':
    engine.launch(main, get_parser())
