"""Text preprocessing and evaluation helpers (docs/DESIGN.md, "Text preprocessing", "Evaluation").

`pre_caption`/`pre_question` reproduce the original's cleaning exactly, quirks included, because the
tokenised text (and so every score) depends on them. `collect_result` merges per-rank result files
and also works with one process and no `torch.distributed` group.
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Sequence

import numpy as np
import torch

import utils

# Characters deleted outright (before '-' and '/' become spaces).
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r'\s{2,}')


class Seeded:
    """The global random generators (python, numpy, torch's CPU generator) seeded with `seed` for one
    sample and restored after it, so that a sample's random augmentation depends on its seed alone
    (dataset.loaders.SeededSamples, dataset.shards.ShardStream)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2 ** 32)
        torch.default_generator.manual_seed(self.seed % 2 ** 63)  # not torch.manual_seed: it would also
        # queue a lazy CUDA seeding, recording a stack trace each time (milliseconds per sample)

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


CAPTION_WORDS = 30  # the caption limit of ALBEF's datasets, of models.load and the demo (pre_caption's default is 50)


def _truncate(text: str, max_words: int) -> str:
    # Parity: split on single spaces, so the empty strings between consecutive spaces count as words.
    words = text.split(' ')
    if len(words) > max_words:
        text = ' '.join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Lowercase, delete punctuation, collapse whitespace runs and keep at most `max_words` words."""
    caption = _DELETED.sub('', caption.lower()).replace('-', ' ').replace('/', ' ')
    caption = caption.replace('<person>', 'person')
    # Parity: only runs of >= 2 whitespace characters are collapsed; a lone tab or newline stays.
    caption = _WHITESPACE_RUN.sub(' ', caption)
    caption = caption.rstrip('\n').strip(' ')
    return _truncate(caption, max_words)


def pre_question(question: str, max_ques_words: int = 50) -> str:
    """Like `pre_caption` without '<person>', whitespace collapsing or left strip
    (docs/DESIGN.md, "Text preprocessing")."""
    question = _DELETED.sub('', question.lower()).replace('-', ' ').replace('/', ' ')
    question = question.rstrip(' ')  # Parity: spaces only, so "x \n" keeps its trailing space
    return _truncate(question, max_ques_words)


# ---- result files -----------------------------------------------------------------------------

def _write_rank_file(result: Any, result_dir: str, filename: str, is_json: bool) -> None:
    """Write this rank's part to `{filename}_rank{rank}.json` (or `.pth`)."""
    os.makedirs(result_dir, exist_ok=True)
    ext = 'json' if is_json else 'pth'
    path = os.path.join(result_dir, f'{filename}_rank{utils.get_rank()}.{ext}')
    if is_json:
        with open(path, 'w') as f:
            json.dump(result, f)
    else:
        torch.save(result, path)


def _merge_rank_files(result_dir: str, filename: str, is_json: bool, is_list: bool) -> list | dict:
    """Concatenate the lists (or update the dicts) of every rank's file, in rank order."""
    merged: list | dict = [] if is_list else {}
    for rank in range(utils.get_world_size()):
        if is_json:
            with open(os.path.join(result_dir, f'{filename}_rank{rank}.json')) as f:
                part = json.load(f)
        else:
            # The file was written a moment ago by this run's own ranks (results may hold tensors).
            part = torch.load(os.path.join(result_dir, f'{filename}_rank{rank}.pth'), weights_only=False)
        if is_list:
            merged += part
        else:
            merged.update(part)
    return merged


def collect_result(result: list | dict, result_dir: str, filename: str, is_json: bool = True,
                   is_list: bool = True) -> list | dict | None:
    """Write this rank's `result` and return the merge of all ranks on the main process (None on
    the others). No merged file is written."""
    _write_rank_file(result, result_dir, filename, is_json)
    utils.barrier()
    if utils.is_main_process():
        return _merge_rank_files(result_dir, filename, is_json, is_list)
    return None


# ---- grounding -------------------------------------------------------------------------------

def computeIoU(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes with inclusive pixel bounds
    (docs/DESIGN.md, "Grounding evaluation and IoU").

    Parity: the intersection counts only when x1 < x2 and y1 < y2 strictly, so boxes sharing a
    single pixel column or row do not overlap.
    """
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union
