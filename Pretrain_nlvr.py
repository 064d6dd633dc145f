"""Text-assignment pre-training for NLVR2 (docs/DESIGN.md, "Text-assignment step (Pretrain_nlvr.py)"):
from a pre-training checkpoint, learn to tell
which image of a pair (or neither) a text describes. Its checkpoint starts NLVR.py.

    python Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --checkpoint ALBEF.pth --output_dir out
"""
import configuration
configuration.precheck(__name__, __file__)  # config mistakes in a second, before torch loads

import argparse

import engine
import utils
from dataset import CaptionCollate, create_dataset, normalize
from models.model_pretrain_nlvr import ALBEF

REQUIRED = {'bert_config', 'image_res', 'batch_size', 'embed_dim'}
OPTIONAL = {'temp', 'alpha'} | configuration.PRETRAIN_DATA_KEYS


def train_step(model, batch, alpha, run):
    image, text = batch  # uint8 images; text tokenised by the loader workers (CaptionCollate)
    image = normalize(utils.to_device(image, run.device))
    return {'loss': model(image, utils.to_device(text, run.device))}


def main(args):
    config = engine.load_config(args.config, REQUIRED, OPTIONAL)
    run = engine.setup(args, config)
    run.tokenizer = engine.build_tokenizer(config)

    print('Creating dataset')
    engine.require_one_of(config, args.config, ('train_file', 'train_shards'))
    dataset = create_dataset('pretrain', config, uint8=True) if config.get('train_file') else None
    loader = engine.train_loader(dataset, config['batch_size'], run, config, collate_fn=CaptionCollate(run.tokenizer))

    print('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    model = model.to(run.device)
    optimizer, lr_scheduler = engine.build_optimization(config, model)
    checkpointer, state = engine.start_state(args, run, model, optimizer, lr_scheduler)
    model, model_without_ddp = engine.wrap_model(model, run, find_unused_parameters=True)

    engine.fit(model, loader, optimizer, lr_scheduler, run, state, checkpointer, train_step, alpha_ramp=False)

def get_parser():
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   parents=[engine.get_args_parser('./configs/NLVR_pretrain.yaml',
                                                                   'output/NLVR_pretrain')])


if __name__ == '__main__':
    engine.launch(main, get_parser())
