"""Weakly-supervised visual grounding on RefCOCO+ (docs/DESIGN.md, "Grounding (Grounding.py) and Grad-CAM"):
fine-tuning with the retrieval
objectives (ITC + ITM, no boxes), then each referring expression's Grad-CAM map picks one of the
detection proposals, scored by IoU >= 0.5 with the ground truth on val, testA and testB.

    python Grounding.py --config configs/Grounding.yaml --checkpoint ALBEF.pth --output_dir output/Grounding
    python Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --output_dir out --evaluate
    python Grounding.py ... --gradcam_mode itc --block_num 8
"""
import configuration
configuration.precheck(__name__, __file__)  # config mistakes in a second, before torch loads

import argparse

import torch.distributed as dist
from tqdm import tqdm

import engine
import utils
from dataset import create_dataset
from dataset.refer import REFER, grounding_eval, load_detections
from dataset.utils import collect_result
from models import gradcam
from models.model_retrieval import ALBEF

REQUIRED = {'train_file', 'test_file', 'refcoco_data', 'det_file', 'coco_file', 'image_root', 'bert_config',
            'image_res', 'batch_size', 'queue_size', 'momentum', 'vision_width', 'embed_dim', 'temp', 'alpha',
            'distill', 'warm_up'}
OPTIONAL = {'block_num'}


def train_step(model, batch, alpha, run):
    image, caption, idx = batch  # idx: the image file's number, so captions of one image are positives
    image, idx = utils.to_device((image, idx), run.device)
    # max_length without truncation truncates nothing, as in the original
    text = utils.to_device(run.tokenizer(caption, padding='longest', max_length=30, return_tensors='pt'),
                           run.device)
    loss_ita, loss_itm = model(image, text, alpha=alpha, idx=idx)
    return {'loss_itm': loss_itm, 'loss_ita': loss_ita}


def evaluation(model, data_loader, run, mode, block_num):
    """[{'ref_id', 'pred': (h, w) map}] for this rank's share of the expressions. Runs in eval mode
    with gradients: Grad-CAM differentiates the ITM logit (or the ITC similarity)."""
    model.eval()
    result = []
    for image, text, ref_ids in tqdm(data_loader, desc=f'Grad-CAM ({mode}, block {block_num})',
                                     disable=not run.is_main, leave=False):
        image = image.to(run.device, non_blocking=True)
        text = run.tokenizer(text, padding='longest', return_tensors='pt').to(run.device)
        maps = gradcam.expression_gradcam(model, image, text, mode, block_num).cpu()
        result += [{'ref_id': int(ref_id), 'pred': m} for ref_id, m in zip(ref_ids, maps)]
    return result


def evaluate(model, loader, run, refer, dets, cocos, epoch):
    """Grad-CAM on every rank's share, merged on rank 0, scored there; the metrics on every rank."""
    result = evaluation(model, loader, run, run.args.gradcam_mode, run.args.block_num)
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
    config = engine.load_config(args.config, REQUIRED, OPTIONAL)
    run = engine.setup(args, config)
    run.tokenizer = engine.build_tokenizer(config)

    print('Creating dataset')
    train_dataset, test_dataset = create_dataset('grounding', config)
    train_loader = engine.train_loader(train_dataset, config['batch_size'], run, config)
    test_loader = engine.eval_loader(test_dataset, config['batch_size'], run, config, distributed=True)
    refer = REFER(config['refcoco_data'], 'refcoco+', 'unc')
    dets = load_detections(config['det_file'])
    cocos = load_detections(config['coco_file'])  # Parity: loaded (and checked) but unused

    print('Creating model')
    model = ALBEF(config=config, text_encoder=engine.bert_weights(config), tokenizer=run.tokenizer)
    args.block_num = resolve_block_num(args, config, model)
    print(f'Grad-CAM: {args.gradcam_mode.upper()} at block {args.block_num}, '
          f'{"x".join(map(str, gradcam.patch_grid(model)))} patches')
    model = model.to(run.device)
    optimizer, lr_scheduler = engine.build_optimization(config, model)
    checkpointer, state = engine.start_state(args, run, model, optimizer, lr_scheduler,
                                             allow_new_heads=not args.evaluate)
    model, model_without_ddp = engine.wrap_model(model, run)

    engine.fit(model, train_loader, optimizer, lr_scheduler, run, state, checkpointer, train_step,
               lambda epoch: evaluate(model_without_ddp, test_loader, run, refer, dets, cocos, epoch),
               best_key='val_d', evaluate_only=args.evaluate, alpha_ramp=config['warm_up'])

def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[engine.get_args_parser('./configs/Grounding.yaml',
                                                                     'output/Grounding')])
    parser.add_argument('--gradcam_mode', choices=gradcam.MODES, default='itm',
                        help='ITM: cross-attention of a fusion layer; ITC: attention of a ViT block')
    parser.add_argument('--block_num', type=int, default=None,
                        help="the layer or block to take the attention from (default: the config's block_num, "
                             'else 8 for ALBEF in both modes, and the matching block of a smaller model)')
    parser.add_argument('--evaluate', action='store_true', help='evaluate the checkpoint, no training')
    return parser


if __name__ == '__main__':
    engine.launch(main, get_parser())
