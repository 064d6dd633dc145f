"""The batches of the seven tasks, made in the DataLoader workers (docs/ARCHITECTURE.md, "A script,
top to bottom").

Every task's collate turns a list of dataset items into one `Batch` whose fields say what they are
(`batch.image`, `batch.text`, `batch.targets`, ...), with the texts already tokenised (the
tokenizer's BatchEncoding of tensors) and, for pre-training, the MLM masks already drawn. A
task's record in tasks.py names its collate (`Task.collate`: 'dataset.module.Class', one of this
module's or a new task's own, with the `for_task` constructor of `_TextCollate`), and
`collate_for(task, tokenizer, config, train)` builds it. A `train_step` moves the batch
(`batch.to(device)`) and calls the model.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

import tasks
import utils
from models.losses import mask_tokens

__all__ = ['Batch', 'CaptionCollate', 'MaskedCaptionCollate', 'RetrievalCollate', 'GroundingCollate',
           'VQACollate', 'VECollate', 'NLVRCollate', 'collate_for']


@dataclass
class Batch:
    """One step's data. Unused fields are None.

    image    images [B, 3, H, W] (float, or uint8 for `dataset.normalize` on the device); NLVR: the
             two images of each pair stacked as [image0 ; image1], [2B, 3, H, W]
    text     the tokenised captions, questions, hypotheses or referring expressions
    idx      retrieval and grounding training: each caption's image number (the positives);
             retrieval evaluation: each image's index in the split
    targets  VE, NLVR: the class of each pair
    answer   VQA training: the tokenised answers, flattened over the questions
    weights  VQA training: each answer's weight; k: the number of answers of each question
    ids      VQA and grounding evaluation: question_id / ref_id of each item
    mlm      pre-training: (input_ids, labels), the masked captions and their MLM labels (-100:
             not masked), drawn in the collate
    """
    image: Any = None
    text: Any = None
    idx: Any = None
    targets: Any = None
    answer: Any = None
    weights: Any = None
    k: Any = None
    ids: Any = None
    mlm: Any = None

    def to(self, device, keep: Sequence[str] = ()) -> Batch:
        """The batch with its tensors on `device` (non-blocking copies, see utils.to_device); the
        fields named in `keep` stay where they are."""
        return dataclasses.replace(self, **{f.name: utils.to_device(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self)
                                            if f.name not in keep and getattr(self, f.name) is not None})

    def pin_memory(self) -> Batch:
        """The batch with its CPU tensors in pinned memory (the DataLoader's pin_memory=True calls
        it), so that `to` copies them to a GPU without the host waiting."""
        return dataclasses.replace(self, **{f.name: _pinned(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _pinned(obj):
    if torch.is_tensor(obj):
        return obj.pin_memory()
    if isinstance(obj, Mapping):  # the tokenizer's BatchEncoding
        return type(obj)({key: _pinned(value) for key, value in obj.items()})
    if isinstance(obj, tuple):
        return tuple(_pinned(value) for value in obj)
    return obj


class _TextCollate:
    """Tokenises in the loader workers: the tokenizer's tensors, padded to the longest text (or
    to `max_length` with padding='max_length', for static shapes under --compile)."""
    max_length: int | None = None
    truncation: bool = False

    def __init__(self, tokenizer, train: bool = True, padding: str = 'longest') -> None:
        self.tokenizer, self.train, self.padding = tokenizer, train, padding

    @classmethod
    def for_task(cls, tokenizer, config: dict, train: bool, padding: str) -> _TextCollate:
        return cls(tokenizer, train=train, padding=padding)

    def tokenize(self, texts, padding=None, max_length=-1, truncation=None):
        """`padding`, `max_length` (None: no limit), `truncation`: the collate's own unless given."""
        max_length = self.max_length if max_length == -1 else max_length
        return self.tokenizer(list(texts), padding=padding or self.padding, return_tensors='pt',
                              truncation=self.truncation if truncation is None else truncation,
                              **({'max_length': max_length} if max_length else {}))


class CaptionCollate(_TextCollate):
    """(image, caption) items -> Batch(image, text): the pre-training captions, at most
    `max_length` tokens."""

    def __init__(self, tokenizer, max_length: int = 25, padding: str = 'longest', train: bool = True) -> None:
        super().__init__(tokenizer, train, padding)
        self.max_length, self.truncation = max_length, True

    def __call__(self, items: Sequence[tuple]) -> Batch:
        images, captions = zip(*items)
        return Batch(image=torch.stack(images, dim=0), text=self.tokenize(captions))


class MaskedCaptionCollate(CaptionCollate):
    """CaptionCollate that also draws the MLM masks (`Batch.mlm`: masked input_ids, labels) with
    probability `mlm_probability`, random tokens below `vocab_size` (the text encoder's). The
    draws come from torch's global CPU generator: the training loader seeds it for each batch
    from (seed, epoch, the batch's first sample), so a resumed run draws the same masks."""

    def __init__(self, tokenizer, mlm_probability: float, vocab_size: int, max_length: int = 25,
                 padding: str = 'longest', train: bool = True) -> None:
        super().__init__(tokenizer, max_length, padding, train)
        self.mlm_probability, self.vocab_size = mlm_probability, vocab_size

    @classmethod
    def for_task(cls, tokenizer, config, train, padding):
        from models.base import read_bert_config  # the text encoder's vocabulary, as the model reads it
        return cls(tokenizer, config['mlm_probability'], read_bert_config(config).vocab_size, padding=padding,
                   train=train)

    def __call__(self, items: Sequence[tuple]) -> Batch:
        batch = super().__call__(items)
        input_ids = batch.text.input_ids.clone()
        labels = input_ids.clone()
        mask_tokens(input_ids, self.vocab_size, self.tokenizer.pad_token_id, self.tokenizer.cls_token_id,
                    self.tokenizer.mask_token_id, targets=labels,
                    probability_matrix=torch.full(labels.shape, self.mlm_probability))
        return dataclasses.replace(batch, mlm=(input_ids, labels))


class RetrievalCollate(_TextCollate):
    """Training (image, caption, image number) -> Batch(image, text, idx), captions padded to the
    longest (max_length 30 without truncation truncates nothing, as in the original); evaluation
    (image, index) -> Batch(image, idx)."""
    max_length = 30

    def __call__(self, items):
        if not self.train:
            images, index = zip(*items)
            return Batch(image=torch.stack(images), idx=torch.tensor(index))
        images, captions, idx = zip(*items)
        return Batch(image=torch.stack(images), text=self.tokenize(captions, padding='longest'),
                     idx=torch.tensor(idx))


class GroundingCollate(RetrievalCollate):
    """Training as retrieval; evaluation (image, expression, ref_id) -> Batch(image, text, ids)."""

    def __call__(self, items):
        if self.train:
            return super().__call__(items)
        images, texts, ref_ids = zip(*items)
        return Batch(image=torch.stack(images), text=self.tokenize(texts, max_length=None), ids=list(ref_ids))


class VQACollate(_TextCollate):
    """Training items (see dataset.vqa_collate_fn) -> Batch(image, text: the questions (at most 25
    tokens), answer, weights, k); test (image, question, question_id) -> Batch(image, text, ids)."""

    def __call__(self, items):
        if not self.train:
            images, questions, question_ids = zip(*items)
            return Batch(image=torch.stack(images), text=self.tokenize(questions, padding='longest'),
                         ids=list(question_ids))
        from . import vqa_collate_fn
        image, questions, answers, weights, k = vqa_collate_fn(items)
        return Batch(image=image, text=self.tokenize(questions, max_length=25, truncation=True),
                     answer=self.tokenize(answers, padding='longest'), weights=weights, k=k)


class VECollate(_TextCollate):
    """(image, hypothesis, label) -> Batch(image, text, targets)."""

    def __call__(self, items):
        images, texts, targets = zip(*items)
        return Batch(image=torch.stack(images), text=self.tokenize(texts, padding='longest'),
                     targets=torch.tensor(targets))


class NLVRCollate(_TextCollate):
    """(image0, image1, sentence, label) -> Batch(image: [image0 ; image1] on dim 0, text, targets)."""

    def __call__(self, items):
        images0, images1, texts, targets = zip(*items)
        return Batch(image=torch.cat([torch.stack(images0), torch.stack(images1)]),
                     text=self.tokenize(texts, padding='longest'), targets=torch.tensor(targets))


def collate_for(task: str | tasks.Task, tokenizer, config: dict, train: bool = True,
                padding: str = 'longest') -> _TextCollate:
    """The collate the task's record names (tasks.py, `collate`), for its training (`train`) or
    evaluation loaders; `padding` (e.g. engine.text_padding) applies to the texts that honour it."""
    module, _, name = tasks.get(task).collate.rpartition('.')
    return getattr(importlib.import_module(module), name).for_task(tokenizer, config, train, padding)
