"""Text-assignment pre-training for NLVR2 (docs/DESIGN.md, "Text-assignment step (Pretrain_nlvr.py)"):
from a pre-training checkpoint, learn to tell
which image of a pair (or neither) a text describes. Its checkpoint starts NLVR.py.

    python Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --checkpoint ALBEF.pth --output_dir out
"""
import configuration
import tasks

TASK = tasks.PRETRAIN_NLVR  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import engine
import utils
from dataset import normalize
from models.model_pretrain_nlvr import ALBEF


def train_step(model, batch, alpha, run, update_momentum=True):
    batch = batch.to(run.device)  # uint8 images; text tokenised by the loader workers (dataset.CaptionCollate)
    return {'loss': model(normalize(batch.image), batch.text)}  # (no momentum encoders)


def main(args):
    run = engine.setup(args, TASK)
    config = run.config

    utils.print0('Creating dataset')
    loader = engine.pretrain_loader(run, TASK, config['batch_size'])

    utils.print0('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    training = engine.prepare(run, model, find_unused_parameters=True)
    engine.fit(run, training, loader, train_step, alpha_ramp=False)


def get_parser():
    return engine.task_parser(__doc__, './configs/NLVR_pretrain.yaml', 'output/NLVR_pretrain')


if __name__ == '__main__':
    engine.launch(main, get_parser())
