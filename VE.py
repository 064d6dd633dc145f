"""Visual entailment on SNLI-VE (docs/DESIGN.md, "Visual entailment (VE.py)"):
does the image entail, contradict or leave neutral the
sentence? Fine-tuning with momentum distillation; accuracy on val and test after every epoch.

    python VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/VE
    python VE.py --config configs/VE.yaml --checkpoint output/VE/checkpoint_best.pth --output_dir out --evaluate
"""
import configuration
configuration.precheck(__name__, __file__)  # config mistakes in a second, before torch loads

import argparse

import engine
import utils
from dataset import create_dataset
from models.model_ve import ALBEF

REQUIRED = {'train_file', 'val_file', 'test_file', 'image_root', 'bert_config', 'image_res', 'batch_size_train',
            'batch_size_test', 'alpha', 'distill', 'warm_up'}


def unpack(batch):
    image, text, targets = batch
    return image, text, targets


def train_step(model, batch, alpha, run):
    image, text, targets = unpack(batch)
    image, targets = utils.to_device((image, targets), run.device)
    text_input = utils.to_device(run.tokenizer(text, padding='longest', return_tensors='pt'), run.device)
    return {'loss': model(image, text_input, targets=targets, train=True, alpha=alpha)}


def main(args):
    config = engine.load_config(args.config, REQUIRED)
    run = engine.setup(args, config)
    run.tokenizer = engine.build_tokenizer(config)

    print('Creating SNLI-VE datasets')
    train_dataset, val_dataset, test_dataset = create_dataset('ve', config)
    train_loader = engine.train_loader(train_dataset, config['batch_size_train'], run, config)
    val_loader, test_loader = (engine.eval_loader(d, config['batch_size_test'], run, config, distributed=True)
                               for d in (val_dataset, test_dataset))

    print('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    model = model.to(run.device)
    optimizer, lr_scheduler = engine.build_optimization(config, model)
    checkpointer, state = engine.start_state(args, run, model, optimizer, lr_scheduler,
                                             allow_new_heads=not args.evaluate)
    model, model_without_ddp = engine.wrap_model(model, run)

    evaluate = engine.split_evaluator({'val': val_loader, 'test': test_loader},
                                      lambda loader: engine.evaluate_accuracy(model_without_ddp, loader, run, unpack))
    engine.fit(model, train_loader, optimizer, lr_scheduler, run, state, checkpointer, train_step, evaluate,
               best_key='val_acc', evaluate_only=args.evaluate, alpha_ramp=config['warm_up'], digits=4)

def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[engine.get_args_parser('./configs/VE.yaml', 'output/VE')])
    parser.add_argument('--evaluate', action='store_true', help='evaluate the checkpoint, no training')
    return parser


if __name__ == '__main__':
    engine.launch(main, get_parser())
