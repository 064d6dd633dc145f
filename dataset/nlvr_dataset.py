"""NLVR2 dataset: two images and one sentence per item (docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

import os

from .base import ImageRootDataset
from .utils import pre_caption


class nlvr_dataset(ImageRootDataset):
    """Items {'images': [path0, path1] under image_root, 'sentence', 'label'}.

    Returns (image0, image1, sentence, label); label is 1 for the string 'True', else 0.
    """
    keys = ('images', 'sentence', 'label')

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
