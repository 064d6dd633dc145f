"""Image-caption datasets: pre-training and image-text retrieval (SPEC 5.4)."""
from __future__ import annotations

import os
import random
from typing import Callable, Sequence

from .base import AnnotationDataset, list_problem, type_problem
from .utils import pre_caption


class pretrain_dataset(AnnotationDataset):
    """Items {'image': full path, 'caption': str or list of str (one is drawn at random)}.

    Returns (image, caption).
    """
    keys = ('image', 'caption')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, max_words: int = 30,
                 **options: bool) -> None:
        self.max_words = max_words
        super().__init__(ann_file, transform, **options)

    def item_problem(self, item: dict) -> str | None:
        caption = item['caption']
        if isinstance(caption, list) and not caption:
            return "has an empty 'caption' list"
        return (type_problem(item, 'caption', (str, list), 'a string or a list of strings')
                or list_problem(item, 'caption'))

    def image_paths(self, item: dict) -> list[str]:
        return [item['image']]

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        image = self.load_image(ann['image'], index)
        caption = ann['caption']
        if isinstance(caption, list):
            caption = random.choice(caption)
        return self.apply_transform(image), pre_caption(caption, self.max_words)


class re_train_dataset(AnnotationDataset):
    """Items {'image': path under image_root, 'caption': str, 'image_id'}.

    Returns (image, caption, img_idx); img_idx numbers the distinct `image_id`s 0..n-1 in order of
    first appearance.
    """
    keys = ('image', 'caption', 'image_id')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        self.image_root = image_root
        self.max_words = max_words
        super().__init__(ann_file, transform, **options)
        self.img_ids: dict = {}
        for ann in self.ann:
            self.img_ids.setdefault(ann['image_id'], len(self.img_ids))

    def item_problem(self, item: dict) -> str | None:
        return type_problem(item, 'caption', str, 'a string')

    def image_paths(self, item: dict) -> list[str]:
        return [os.path.join(self.image_root, item['image'])]

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        image = self.load_image(self.image_paths(ann)[0], index)
        caption = pre_caption(ann['caption'], self.max_words)
        return self.apply_transform(image), caption, self.img_ids[ann['image_id']]


class re_eval_dataset(AnnotationDataset):
    """Items {'image': path under image_root, 'caption': list of str}, one per image.

    Returns (image, index). Also builds, in file order, `text` (all preprocessed captions), `image`
    (the image paths as given), `txt2img` {text index: image index} and `img2txt` {image index:
    [text indices]}.
    """
    keys = ('image', 'caption')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        self.image_root = image_root
        self.max_words = max_words
        super().__init__(ann_file, transform, **options)
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_id, ann in enumerate(self.ann):
            self.image.append(ann['image'])
            self.img2txt[img_id] = []
            for caption in ann['caption']:
                txt_id = len(self.text)
                self.text.append(pre_caption(caption, self.max_words))
                self.img2txt[img_id].append(txt_id)
                self.txt2img[txt_id] = img_id

    def item_problem(self, item: dict) -> str | None:
        return type_problem(item, 'caption', list, 'a list of strings') or list_problem(item, 'caption')

    def image_paths(self, item: dict) -> list[str]:
        return [os.path.join(self.image_root, item['image'])]

    def get_item(self, index: int) -> tuple:
        image = self.load_image(self.image_paths(self.ann[index])[0], index)
        return self.apply_transform(image), index
