"""RefCOCO+ annotations and the weakly-supervised grounding metric
(docs/DESIGN.md, "Grounding evaluation and IoU").

`REFER(data_root, 'refcoco+', 'unc')` reads `data_root/refcoco+/refs(unc).p` and `instances.json`
into the four maps Grounding.py needs (the original's refTools class has many more). The refs
file is a pickle, i.e. a program: it is read with an unpickler that refuses every class and
function, which is enough for its plain lists, dicts, strings and numbers and makes a pickle that
would run code fail with a one-line `DataError` instead.

`grounding_eval` turns each Grad-CAM map into a box: the detection proposal with the most map mass
per (area ** alpha), scored on the map upsampled to the image size, and counts IoU >= 0.5 with the
ground-truth box per split.
"""
from __future__ import annotations

import io
import os
import pickle
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F

import utils
from configuration import one_line
from .base import DataError, read_json
from .utils import computeIoU

SPLITS = ('val', 'testA', 'testB')
REF_KEYS = ('ref_id', 'ann_id', 'image_id', 'split')


class _Refused(pickle.UnpicklingError):
    """The pickle names a class or function (the message is its dotted name)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only what needs no class: containers, numbers, strings, bytes, bools and None."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f'{module}.{name}')


def load_plain_pickle(path: str) -> Any:
    """The object in pickle file `path`, refusing any pickle that names a class or function (the
    only way a pickle can run code). Raises DataError with one line naming the file."""
    if not os.path.isfile(path):
        raise DataError(f'refs file not found: {path}')
    try:
        with open(path, 'rb') as f:
            data = f.read()
        # latin-1: Python 2 pickles (the released refs files) store str as bytes
        return _PlainDataUnpickler(io.BytesIO(data), encoding='latin1').load()
    except _Refused as e:
        raise DataError(f"{path}: refused to unpickle: it asks for the Python object '{e}' (a refs file holds "
                        f'only lists, dicts, strings and numbers; this file may be malicious)') from None
    except Exception as e:  # truncated or corrupt files raise EOFError, ValueError, ...
        raise DataError(f'{path}: not a readable pickle: {type(e).__name__}: {one_line(e)}') from None


class REFER:
    """The referring expressions of one dataset/split scheme.

    Attributes:
        Refs: {ref_id: ref}, each ref a dict with 'ref_id', 'ann_id', 'image_id', 'split', 'sentences'.
        Anns: {ann_id: COCO annotation} ('bbox' is [x, y, w, h]).
        Imgs: {image_id: COCO image record} ('height', 'width', 'file_name').
        refToAnn: {ref_id: the annotation of the referred object}.
    """

    def __init__(self, data_root: str, dataset: str = 'refcoco+', splitBy: str = 'unc') -> None:
        self.data_dir = os.path.join(data_root, dataset)
        refs_file = os.path.join(self.data_dir, f'refs({splitBy}).p')
        instances_file = os.path.join(self.data_dir, 'instances.json')
        refs = load_plain_pickle(refs_file)
        instances = read_json(instances_file)
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise DataError(f'{refs_file}: expected a list of ref dicts, got {type(refs).__name__}')
        for i, ref in enumerate(refs):
            missing = [k for k in REF_KEYS if k not in ref]
            if missing:
                raise DataError(f"{refs_file}: ref {i} has no '{missing[0]}'")
        if not isinstance(instances, dict) or not {'images', 'annotations'} <= instances.keys():
            raise DataError(f"{instances_file}: expected a COCO object with 'images' and 'annotations'")

        self.Refs = {ref['ref_id']: ref for ref in refs}
        self.Anns = {ann['id']: ann for ann in instances['annotations']}
        self.Imgs = {img['id']: img for img in instances['images']}
        self.refToAnn = {}
        for ref in refs:
            if ref['ann_id'] not in self.Anns:
                raise DataError(f"{refs_file}: ref {ref['ref_id']} points at annotation {ref['ann_id']}, "
                                f'which {instances_file} does not have')
            if ref['image_id'] not in self.Imgs:
                raise DataError(f"{refs_file}: ref {ref['ref_id']} is on image {ref['image_id']}, "
                                f'which {instances_file} does not have')
            self.refToAnn[ref['ref_id']] = self.Anns[ref['ann_id']]
        utils.print0(f'{dataset} ({splitBy}): {len(self.Refs)} refs, {len(self.Anns)} annotations, '
              f'{len(self.Imgs)} images')


def load_detections(path: str) -> dict:
    """The detection proposals of `det_file`: {str(image_id): [[x, y, w, h, ...], ...]}."""
    dets = read_json(path)
    if not isinstance(dets, dict):
        raise DataError(f'{path}: expected an object {{image_id: [[x, y, w, h, ...], ...]}}')
    for image_id, boxes in dets.items():
        if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) >= 4 for b in boxes):
            raise DataError(f'{path}: image {image_id}: expected a list of [x, y, w, h, ...] boxes')
    return dets


# ---- the metric ---------------------------------------------------------------------------------
def box_score(mask: torch.Tensor, box: Sequence[float], alpha: float = 0.5) -> float:
    """Map mass inside `box` ([x, y, w, h], pixel rows int(y):int(y+h), columns int(x):int(x+w))
    divided by (w * h) ** alpha. Parts outside the image count as zero; an empty box scores -inf."""
    x, y, w, h = (float(v) for v in box[:4])
    if w <= 0 or h <= 0:
        return float('-inf')
    # Parity: int() of the float sums. Negative starts are clipped (Python slicing would wrap around).
    inside = mask[max(int(y), 0):max(int(y + h), 0), max(int(x), 0):max(int(x + w), 0)]
    return float(inside.sum()) / (w * h) ** alpha


def pick_box(mask: torch.Tensor, boxes: Sequence[Sequence[float]], alpha: float = 0.5) -> Sequence[float] | None:
    """The proposal with the highest `box_score`, the earliest on ties.

    Parity: a running maximum that starts at 0 with a strict >. When no proposal scores above 0 the
    original keeps a stale or undefined box; here the best-scoring proposal is taken anyway.
    """
    scores = [box_score(mask, box, alpha) for box in boxes]
    if not scores:
        return None
    best, chosen = 0.0, None
    for box, score in zip(boxes, scores):
        if score > best:
            best, chosen = score, box
    if chosen is None:
        chosen = boxes[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    return chosen


def _as_map(pred: torch.Tensor, mask_size: int | None) -> torch.Tensor:
    pred = torch.as_tensor(pred).detach().float()
    if mask_size is not None:
        return pred.view(mask_size, mask_size)
    if pred.dim() == 1:  # a flattened square map
        side = int(round(pred.numel() ** 0.5))
        return pred.view(side, side)
    return pred.view(pred.shape[-2:])


def grounding_eval(results: list[dict], dets: dict, cocos: Any, refer: REFER, alpha: float = 0.5,
                   mask_size: int | None = None) -> dict[str, float]:
    """Accuracy (IoU >= 0.5) of the boxes picked by each result's map, per split.

    Args:
        results: [{'ref_id': int, 'pred': (h, w) map}]; one entry per referring expression.
        dets: {str(image_id): [[x, y, w, h, ...], ...]} proposals.
        cocos: unused (the original's signature).
        refer: a REFER.
        alpha: the area exponent of the box score.
        mask_size: the side of the square maps (the original's 24); None: the maps' own shape.
    Returns:
        {'val_d', 'testA_d', 'testB_d'} as fractions (NaN for a split without results), plus
        '<split>_d' for any other split found.
    """
    correct, total = defaultdict(int), defaultdict(int)
    no_proposals = 0
    for result in results:
        ref = refer.Refs[result['ref_id']]
        gt_box = refer.refToAnn[result['ref_id']]['bbox']
        image = refer.Imgs[ref['image_id']]
        # (h, w) -> (1, 1, h, w) -> bicubic to the image size -> (H, W)
        pred = _as_map(result['pred'], mask_size)[None, None]
        mask = F.interpolate(pred, size=(image['height'], image['width']), mode='bicubic',
                             align_corners=False).squeeze()
        box = pick_box(mask, dets.get(str(ref['image_id']), []), alpha)
        total[ref['split']] += 1
        if box is None:
            no_proposals += 1
        elif computeIoU(gt_box, box[:4]) >= 0.5:
            correct[ref['split']] += 1
    if no_proposals:
        utils.print0(f'{no_proposals} expressions had no detection proposals for their image (counted as wrong)')
    accuracy = {}
    for split in list(SPLITS) + sorted(set(total) - set(SPLITS)):
        accuracy[f'{split}_d'] = correct[split] / total[split] if total[split] else float('nan')
        utils.print0(f'{split}_d: {accuracy[split + "_d"]:.3f}')
    return accuracy
