"""NLVR2 dataset: two images and one sentence per item (docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from .base import AnnotationDataset
from .utils import pre_caption


class nlvr_dataset(AnnotationDataset):
    """Items {'images': [path0, path1] under image_root, 'sentence', 'label'}.

    Returns (image0, image1, sentence, label); label is 1 for the string 'True', else 0.
    """
    keys = ('images', 'sentence', 'label')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        self.image_root = image_root
        self.max_words = max_words
        super().__init__(ann_file, transform, **options)

    def item_problem(self, item: dict) -> str | None:
        images = item['images']
        if not isinstance(images, list) or len(images) != 2:
            return f"has 'images' {images!r} (expected a list of 2 paths)"
        return None

    def image_paths(self, item: dict) -> list[str]:
        return [os.path.join(self.image_root, path) for path in item['images']]

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        path0, path1 = self.image_paths(ann)
        image0 = self.load_image(path0, index)
        image1 = self.load_image(path1, index)
        sentence = pre_caption(ann['sentence'], self.max_words)
        label = 1 if ann['label'] == 'True' else 0  # Parity: only the string 'True' is positive
        return self.apply_transform(image0), self.apply_transform(image1), sentence, label
