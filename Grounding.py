"""Weakly-supervised visual grounding on RefCOCO+ (docs/DESIGN.md, "Grounding (Grounding.py) and Grad-CAM"):
fine-tuning with the retrieval
objectives (ITC + ITM, no boxes), then each referring expression's Grad-CAM map picks one of the
detection proposals, scored by IoU >= 0.5 with the ground truth on val, testA and testB.

    python Grounding.py --config configs/Grounding.yaml --checkpoint ALBEF.pth --output_dir output/Grounding
    python Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --output_dir out --evaluate
    python Grounding.py ... --gradcam_mode itc --block_num 8
"""
import configuration
import tasks

TASK = tasks.GROUNDING  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import torch.distributed as dist

import engine
import utils
from dataset.refer import REFER, grounding_eval, load_detections
from dataset.utils import collect_result
from models import gradcam
from models.model_retrieval import ALBEF


def train_step(model, batch, alpha, run, update_momentum=True):
    # idx: the image file's number, so captions of one image are positives (dataset.GroundingCollate)
    batch = batch.to(run.device)
    loss_ita, loss_itm = model(batch.image, batch.text, alpha=alpha, idx=batch.idx, update_momentum=update_momentum)
    return {'loss_itm': loss_itm, 'loss_ita': loss_ita}


def evaluation(model, data_loader, run, mode, block_num):
    """[{'ref_id', 'pred': (h, w) map}] for this rank's share of the expressions. Runs in eval mode
    with gradients: Grad-CAM differentiates the ITM logit (or the ITC similarity)."""
    model.eval()
    result = []
    for batch in utils.progress(data_loader, desc=f'Grad-CAM ({mode}, block {block_num})',
                                disable=not run.is_main, leave=False):
        batch = batch.to(run.device)
        maps = gradcam.expression_gradcam(model, batch.image, batch.text, mode, block_num).cpu()
        result += [{'ref_id': int(ref_id), 'pred': m} for ref_id, m in zip(batch.ids, maps)]
    return result


def evaluate(model, loader, run, refer, dets, cocos, epoch, mode, block_num):
    """Grad-CAM on every rank's share, merged on rank 0, scored there; the metrics on every rank."""
    result = evaluation(model, loader, run, mode, block_num)
    results = collect_result(result, run.path('result'), f'epoch{epoch}', is_json=False)
    stats = [grounding_eval(results, dets, cocos, refer, alpha=0.5) if run.is_main else None]
    if run.distributed:
        dist.broadcast_object_list(stats, src=0)
    return stats[0]


def resolve_block_num(args, config, model):
    """--block_num, else the config's block_num, else the model's default; checked against the model."""
    block_num = args.block_num if args.block_num is not None else config.get('block_num')
    if block_num is None:
        block_num = gradcam.default_block_num(model, args.gradcam_mode)
    try:
        return gradcam.check_block_num(model, args.gradcam_mode, block_num)
    except ValueError as error:
        raise engine.ConfigError(f'{args.config}: {error} (set --block_num or the config key block_num)') from None


def main(args):
    run = engine.setup(args, TASK)
    config = run.config

    utils.print0('Creating dataset')
    train_loader, test_loader = engine.task_loaders(run, TASK, config['batch_size'], config['batch_size'])
    refer = REFER(config['refcoco_data'], 'refcoco+', 'unc')
    dets = load_detections(config['det_file'])
    cocos = load_detections(config['coco_file'])  # Parity: loaded (and checked) but unused

    utils.print0('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    block_num = resolve_block_num(args, config, model)
    utils.print0(f'Grad-CAM: {args.gradcam_mode.upper()} at block {block_num}, '
          f'{"x".join(map(str, gradcam.patch_grid(model)))} patches')
    training = engine.prepare(run, model)
    engine.fit(run, training, train_loader, train_step,
               lambda epoch: evaluate(training.module, test_loader, run, refer, dets, cocos, epoch,
                                      args.gradcam_mode, block_num),
               best_key='val_d', evaluate_only=args.evaluate, alpha_ramp=config['warm_up'])


def get_parser():
    parser = engine.task_parser(__doc__, './configs/Grounding.yaml', 'output/Grounding',
                                evaluate='evaluate the checkpoint, no training')
    parser.add_argument('--gradcam_mode', choices=gradcam.MODES, default='itm',
                        help='ITM: cross-attention of a fusion layer; ITC: attention of a ViT block')
    parser.add_argument('--block_num', type=int, default=None,
                        help="the layer or block to take the attention from (default: the config's block_num, "
                             'else 8 for ALBEF in both modes, and the matching block of a smaller model)')
    return parser


if __name__ == '__main__':
    engine.launch(main, get_parser())
