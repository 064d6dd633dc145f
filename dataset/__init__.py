"""Datasets, image transforms, samplers and loaders (dataset/loaders.py) and batches
(dataset/collate.py) of the six tasks (docs/DESIGN.md, "Data").

`create_dataset(name, config)` builds the datasets a task script uses from the original YAML keys
(`train_file`/`val_file`/`test_file`, `image_root`, `vqa_root`, `vg_root`, `answer_list`,
`image_res`), plus these optional keys: `skip_bad_images` (default False), `check_images`
(default: check, except pre-training sets above 100,000 items; see `dataset.base.AnnotationDataset`),
`augment` (default True; false trains without random crops, flips and RandomAugment),
`randaugment_autocontrast` ('original', the default: RandomAugment's AutoContrast as the original
code computes it, which saturates channels whose minimum is above 0; 'pil': PIL's per-channel
stretch) and `jpeg_draft` (default False; see `DraftRandomResizedCrop`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

import tasks
from .base import AnnotationDataset, DataError, ImageError, max_image_pixels
from .caption_dataset import pretrain_dataset, re_eval_dataset, re_train_dataset
from .collate import Batch, CaptionCollate, MaskedCaptionCollate, collate_for
from .grounding_dataset import grounding_dataset
from .loaders import create_loader, create_sampler, eval_loader, train_loader
from .nlvr_dataset import nlvr_dataset
from .randaugment import AUTOCONTRAST_MODES, RandomAugment
from .ve_dataset import ve_dataset
from .vqa_dataset import vqa_dataset

__all__ = ['DataError', 'ImageError', 'create_dataset', 'create_sampler', 'create_loader',
           'vqa_collate_fn', 'build_transform', 'normalize', 'Batch', 'CaptionCollate', 'MaskedCaptionCollate',
           'collate_for', 'ToUint8', 'pretrain_dataset', 're_train_dataset', 're_eval_dataset',
           'vqa_dataset', 've_dataset', 'nlvr_dataset', 'grounding_dataset', 'TASKS', 'train_loader',
           'eval_loader']

# CLIP statistics
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
AUGMENTS = ['Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateX', 'TranslateY', 'Rotate']


class ToUint8:
    """A PIL image or an HxWx3 uint8 array (what RandomAugment returns) as a 3xHxW uint8 tensor:
    images cross to the device as bytes (a quarter of float32) and `normalize` makes them the
    float32 values ToTensor + Normalize would have given."""

    def __call__(self, image) -> torch.Tensor:
        import numpy as np
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


_STATISTICS = {}  # device -> (mean, std), each (3, 1, 1) float32, made on the first call only


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (on any device) -> float32, CLIP-normalised: bit for bit what
    ToTensor() and Normalize(MEAN, STD) give on the CPU. MEAN and STD are copied to each device
    once and kept there: a copy from the host per call would make the host wait for the GPU
    (torch.tensor(..., device='cuda') is a blocking copy)."""
    stats = _STATISTICS.get(images.device)
    if stats is None:
        stats = _STATISTICS[images.device] = tuple(torch.tensor(v, device=images.device)[:, None, None]
                                                   for v in (MEAN, STD))
    mean, std = stats
    return images.to(torch.float32).div(255).sub(mean).div(std)


class DraftRandomResizedCrop:
    """RandomResizedCrop (bicubic) that lets Pillow decode a JPEG at 1/2, 1/4 or 1/8 size
    (`Image.draft`, in the DCT: much less decoding work) when the crop, at that size, still has
    at least `size` pixels each way, so the crop's resolution is not lowered. Give it the image
    as opened, not yet loaded. The crop is drawn with the same random numbers as
    RandomResizedCrop; where no reduction applies (other formats, small crops) the pixels are
    exactly RandomResizedCrop's, where one does they differ slightly (the DCT's downscaling, then
    bicubic), hence opt-in: config key `jpeg_draft: true`."""

    def __init__(self, size: int, scale: tuple, interpolation) -> None:
        from torchvision import transforms
        self.crop = transforms.RandomResizedCrop(size, scale=scale, interpolation=interpolation)
        self.size = size
        self.lazy_decode = True

    def __call__(self, img):
        from PIL import Image
        width, height = img.size
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        factor = 1
        if img.format == 'JPEG' and img.tile:  # opened, not decoded yet
            factor = next((f for f in (8, 4, 2) if w / f >= self.size and h / f >= self.size), 1)
            if factor > 1:
                img.draft('RGB', (-(-width // factor), -(-height // factor)))
        img = img.convert('RGB')
        if factor == 1:  # exactly torchvision's resized_crop on a PIL image
            return img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BICUBIC)
        rx, ry = img.size[0] / width, img.size[1] / height
        return img.resize((self.size, self.size), Image.BICUBIC, box=(j * rx, i * ry, (j + w) * rx, (i + h) * ry))


def build_transform(kind: str, image_res: int, autocontrast: str = 'original', uint8: bool = False,
                    jpeg_draft: bool = False) -> Callable:
    """The image transform `kind` (docs/DESIGN.md, "Image transforms"):
    'pretrain', 'train' (fine-tuning), 'test' or
    'grounding_train'. All PIL-based, bicubic, with CLIP normalisation (with `uint8`: ending in a
    uint8 tensor instead, for `normalize` on the device; with `jpeg_draft`, 'pretrain' and 'train'
    crop with DraftRandomResizedCrop and take the image as opened, not loaded). `autocontrast` is
    RandomAugment's AutoContrast ('original' or 'pil', see dataset/randaugment.py)."""
    from torchvision import transforms  # imported here: torchvision takes seconds to import
    from torchvision.transforms import InterpolationMode

    normalize = transforms.Normalize(MEAN, STD)
    augment = RandomAugment(2, 7, isPIL=True, augs=AUGMENTS, autocontrast=autocontrast)
    bicubic = InterpolationMode.BICUBIC
    square = transforms.Resize((image_res, image_res), interpolation=bicubic)  # not aspect-preserving
    if kind in ('pretrain', 'train'):
        scale = (0.2, 1.0) if kind == 'pretrain' else (0.5, 1.0)
        crop = (DraftRandomResizedCrop if jpeg_draft else transforms.RandomResizedCrop)(
            image_res, scale=scale, interpolation=bicubic)
        steps = [crop, transforms.RandomHorizontalFlip(), augment]
    elif kind == 'grounding_train':
        # Parity: flipping does not swap 'left'/'right' in the referring expression.
        steps = [square, transforms.RandomHorizontalFlip(), augment]
    elif kind == 'test':
        steps = [square]
    else:
        raise ValueError(f"unknown transform {kind!r}; expected 'pretrain', 'train', 'test' or 'grounding_train'")
    composed = transforms.Compose(steps + ([ToUint8()] if uint8 else [transforms.ToTensor(), normalize]))
    composed.lazy_decode = isinstance(steps[0], DraftRandomResizedCrop)
    return composed


@dataclass(frozen=True)
class Split:
    """How `create_dataset` builds one of a task's datasets (a tasks.Split with its class):
    `cls(config[file_key], transform, *[config[k] for k in root_keys], **kwargs, **{arg: config[key]
    for arg, key in config_kwargs})`."""
    name: str
    file_key: str
    cls: type
    transform: str
    root_keys: tuple[str, ...] = ()
    kwargs: dict = field(default_factory=dict)
    config_kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, spec: tasks.Split) -> Split:
        module, _, name = spec.cls.rpartition('.')
        return cls(spec.name, spec.file_key, getattr(importlib.import_module(module), name), spec.transform,
                   spec.root_keys, dict(spec.kwargs), dict(spec.config_kwargs))

    def build(self, config: dict, ann_file: str | Sequence[str] | None = None,
              transform: Callable | None = None, **options: bool) -> AnnotationDataset:
        """The dataset, from `ann_file` (default: the config's) with `transform` and base options."""
        def need(key: str) -> Any:
            if key not in config:
                raise DataError(f"config has no '{key}' (needed by the {self.name} dataset, {self.cls.__name__})")
            return config[key]
        files = need(self.file_key) if ann_file is None else ann_file
        roots = [need(key) for key in self.root_keys]
        extra = {arg: need(key) for arg, key in self.config_kwargs.items()}
        return self.cls(files, transform, *roots, **self.kwargs, **extra, **options)


# task name (tasks.py) -> its datasets, in the order create_dataset returns them
TASKS: dict[str, tuple[Split, ...]] = {task.name: tuple(Split.of(spec) for spec in task.splits)
                                       for task in tasks.TASKS}


def create_dataset(dataset: str, config: dict, uint8: bool = False) -> AnnotationDataset | tuple[AnnotationDataset, ...]:
    """The datasets of task `dataset` (a name of tasks.py, or 're' for retrieval): 'pretrain' and
    'pretrain_nlvr' -> one dataset; 'retrieval', 've', 'nlvr' -> (train, val, test); 'vqa',
    'grounding' -> (train, test). With `uint8` the images come as uint8 tensors (see `normalize`)."""
    try:
        task = tasks.get(dataset)
    except ValueError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(tasks.names(with_aliases=True))}") \
            from None
    if 'image_res' not in config:
        raise DataError("config has no 'image_res'")
    check = config.get('check_images')  # unset: the dataset class decides (see AnnotationDataset)
    options = {'skip_bad_images': bool(config.get('skip_bad_images', False)),
               'check_images': None if check is None else bool(check),
               'max_image_pixels': max_image_pixels(config)}
    # `augment: false` trains on the test transform (the demo world, whose captions hinge on colours
    # and left/right, which colour augmentations and flips would falsify)
    augment = config.get('augment', True)
    autocontrast = config.get('randaugment_autocontrast', 'original')
    if autocontrast not in AUTOCONTRAST_MODES:
        raise DataError(f"config randaugment_autocontrast must be one of {', '.join(AUTOCONTRAST_MODES)}, "
                        f'got {autocontrast!r}')
    draft = bool(config.get('jpeg_draft', False))
    built = tuple(split.build(config, transform=build_transform(split.transform if augment else 'test',
                                                                config['image_res'], autocontrast, uint8=uint8,
                                                                jpeg_draft=draft), **options)
                  for split in TASKS[task.name])
    return built[0] if len(built) == 1 else built


def vqa_collate_fn(batch: Sequence[tuple]) -> tuple[torch.Tensor, list[str], list[str], torch.Tensor, list[int]]:
    """Collate VQA training items: (images [B, 3, H, W], questions, answers flattened over the batch,
    their weights as one float32 tensor, number of answers per question)."""
    images, questions, answers, weights, counts = [], [], [], [], []
    for image, question, item_answers, item_weights in batch:
        images.append(image)
        questions.append(question)
        answers += item_answers
        weights += item_weights
        counts.append(len(item_answers))
    return torch.stack(images, dim=0), questions, answers, torch.tensor(weights, dtype=torch.float32), counts
