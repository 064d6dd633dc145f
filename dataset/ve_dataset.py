"""SNLI-VE visual entailment dataset (docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from .base import AnnotationDataset
from .utils import pre_caption

LABELS = {'entailment': 2, 'neutral': 1, 'contradiction': 0}


class ve_dataset(AnnotationDataset):
    """Items {'image': image id (file image_root/'<id>.jpg'), 'sentence', 'label'}.

    Returns (image, sentence, label) with label entailment 2, neutral 1, contradiction 0.
    """
    keys = ('image', 'sentence', 'label')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        self.image_root = image_root
        self.max_words = max_words
        super().__init__(ann_file, transform, **options)

    def item_problem(self, item: dict) -> str | None:
        if item['label'] not in LABELS:
            return f"has label {item['label']!r} (expected 'entailment', 'neutral' or 'contradiction')"
        return None

    def image_paths(self, item: dict) -> list[str]:
        return [os.path.join(self.image_root, f"{item['image']}.jpg")]

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        image = self.load_image(self.image_paths(ann)[0], index)
        sentence = pre_caption(ann['sentence'], self.max_words)
        return self.apply_transform(image), sentence, LABELS[ann['label']]
