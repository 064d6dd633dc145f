"""SNLI-VE visual entailment dataset (docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

import os

from .base import ImageRootDataset
from .utils import pre_caption

LABELS = {'entailment': 2, 'neutral': 1, 'contradiction': 0}


class ve_dataset(ImageRootDataset):
    """Items {'image': image id (file image_root/'<id>.jpg'), 'sentence', 'label'}.

    Returns (image, sentence, label) with label entailment 2, neutral 1, contradiction 0.
    """
    keys = ('image', 'sentence', 'label')

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
