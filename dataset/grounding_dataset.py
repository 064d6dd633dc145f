"""RefCOCO+ referring expressions for weakly-supervised grounding
(docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

from typing import Callable, Sequence

from .base import ImageRootDataset
from .utils import pre_caption


class grounding_dataset(ImageRootDataset):
    """Items {'image': path under image_root, 'text'} plus 'ref_id' in test mode.

    Returns (image, caption, img_idx) in 'train' mode, where img_idx numbers the distinct image
    file names (last path component) in order of first appearance, and (image, caption, ref_id)
    in 'test' mode.
    """

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, mode: str = 'train', **options: bool) -> None:
        if mode not in ('train', 'test'):
            raise ValueError(f"grounding_dataset mode must be 'train' or 'test', got {mode!r}")
        self.mode = mode
        super().__init__(ann_file, transform, image_root, max_words, **options)
        self.img_ids: dict[str, int] = {}
        for ann in self.ann:
            self.img_ids.setdefault(self.image_name(ann), len(self.img_ids))

    @staticmethod
    def image_name(item: dict) -> str:
        return item['image'].split('/')[-1]

    def required_keys(self, item: dict) -> tuple[str, ...]:
        return ('image', 'text') if self.mode == 'train' else ('image', 'text', 'ref_id')

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        image = self.apply_transform(self.load_image(self.image_paths(ann)[0], index))
        caption = pre_caption(ann['text'], self.max_words)
        if self.mode == 'train':
            return image, caption, self.img_ids[self.image_name(ann)]
        return image, caption, ann['ref_id']
