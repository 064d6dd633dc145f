"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation
(docs/DESIGN.md, "Pre-training (Pretrain.py)").

    python Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain
"""
import configuration
configuration.precheck(__name__, __file__)  # config mistakes in a second, before torch loads

import argparse

import engine
import utils
from dataset import CaptionCollate, create_dataset, normalize
from models.model_pretrain import ALBEF

REQUIRED = {'bert_config', 'image_res', 'batch_size', 'embed_dim', 'temp', 'mlm_probability',
            'queue_size', 'momentum', 'alpha'}
OPTIONAL = {'init_deit', 'deit_checkpoint'} | configuration.PRETRAIN_DATA_KEYS


def train_step(model, batch, alpha, run):
    image, text = batch  # uint8 images; text tokenised by the loader workers (CaptionCollate)
    image = normalize(utils.to_device(image, run.device))
    # text left on the CPU: the model draws the MLM masks there, then moves it
    loss_mlm, loss_ita, loss_itm = model(image, text, alpha=alpha)
    return {'loss_mlm': loss_mlm, 'loss_ita': loss_ita, 'loss_itm': loss_itm}


def main(args):
    config = engine.load_config(args.config, REQUIRED, OPTIONAL)
    run = engine.setup(args, config)
    run.tokenizer = engine.build_tokenizer(config)

    print('Creating dataset')
    engine.require_one_of(config, args.config, ('train_file', 'train_shards'))
    dataset = create_dataset('pretrain', config, uint8=True) if config.get('train_file') else None
    collate = CaptionCollate(run.tokenizer, padding=engine.text_padding(run))
    loader = engine.train_loader(dataset, config['batch_size'], run, config, collate_fn=collate)

    print('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer,
                  init_deit=config.get('init_deit', True) and not args.checkpoint and not args.resume)
    model = model.to(run.device)
    optimizer, lr_scheduler = engine.build_optimization(config, model)
    checkpointer, state = engine.start_state(args, run, model, optimizer, lr_scheduler)
    model, model_without_ddp = engine.wrap_model(model, run)

    engine.fit(model, loader, optimizer, lr_scheduler, run, state, checkpointer, train_step)

def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[engine.get_args_parser('./configs/Pretrain.yaml', 'Pretrain/')])
    return parser


if __name__ == '__main__':
    engine.launch(main, get_parser())
