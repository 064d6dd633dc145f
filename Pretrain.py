"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation
(docs/DESIGN.md, "Pre-training (Pretrain.py)").

    python Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain
"""
import configuration
import tasks

TASK = tasks.PRETRAIN  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import engine
import utils
from dataset import normalize
from models.model_pretrain import ALBEF


def train_step(model, batch, alpha, run, update_momentum=True):
    # uint8 images; captions tokenised and MLM masks drawn by the loader workers (dataset.MaskedCaptionCollate).
    # The text and masks stay on the host: the model reads the padding and masked positions there, then moves them
    batch = batch.to(run.device, keep=('text', 'mlm'))
    loss_mlm, loss_ita, loss_itm = model(normalize(batch.image), batch.text, alpha=alpha, mlm=batch.mlm,
                                         update_momentum=update_momentum)
    return {'loss_mlm': loss_mlm, 'loss_ita': loss_ita, 'loss_itm': loss_itm}


def main(args):
    run = engine.setup(args, TASK)
    config = run.config

    utils.print0('Creating dataset')
    loader = engine.pretrain_loader(run, TASK, config['batch_size'])

    utils.print0('Creating model')
    init_deit = config.get('init_deit', True) and not args.checkpoint and not args.resume
    training = engine.prepare(run, ALBEF(config=config, text_encoder=engine.bert_weights(config),
                                         tokenizer=run.tokenizer, init_deit=init_deit))
    engine.fit(run, training, loader, train_step)


def get_parser():
    return engine.task_parser(__doc__, './configs/Pretrain.yaml', 'output/Pretrain')


if __name__ == '__main__':
    engine.launch(main, get_parser())
