"""Image-caption datasets: pre-training and image-text retrieval
(docs/DESIGN.md, "Datasets and annotation formats")."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from configuration import cache_dir as default_cache_dir, one_line
from .annotation_cache import write_table
from .base import (DEFAULT_MAX_IMAGE_PIXELS, AnnotationDataset, DataError, ImageError, ImageRootDataset,
                   StringColumn, list_problem, open_image, read_json_list, type_problem)
from .utils import pre_caption


class CaptionTable:
    """Pre-training items {'image', 'caption'} held in numpy arrays, not one dict per item.

    Image paths are split into a folder (stored once per distinct folder, numbered) and a file
    name; captions are one StringColumn, and item i owns captions [first[i], first[i + 1]) (one
    for a plain string, several for a list). `table[i]` rebuilds the item as a dict (a list
    caption comes back as a list). At 14M web items this is about 1 GB in one process instead
    of about 17 GB of dicts, and forked loader workers share it.
    """

    first: np.ndarray | None = None  # None: one caption per item

    def __init__(self, images: Sequence[str] = (), captions: Sequence = ()) -> None:
        folders: dict[str, int] = {}
        split = [path.rpartition('/') for path in images]
        self.folder_of = np.fromiter((folders.setdefault(head + sep, len(folders)) for head, sep, _ in split),
                                     dtype=np.int32, count=len(split))
        self.folders = list(folders)
        self.names = StringColumn([name for _, _, name in split])
        del split
        self.is_list = np.fromiter((type(c) is list for c in captions), dtype=bool, count=len(captions))
        if not self.is_list.any():  # one caption per item (web data): caption i is item i's
            self.captions = StringColumn(captions)
            return
        counts = np.fromiter((len(c) if type(c) is list else 1 for c in captions), dtype=np.int64,
                             count=len(captions))
        self.first = np.zeros(len(captions) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.first[1:])
        self.captions = StringColumn([s for c in captions for s in (c if type(c) is list else (c,))])

    @classmethod
    def concat(cls, tables: Sequence['CaptionTable']) -> 'CaptionTable':
        if len(tables) == 1:
            return tables[0]
        out = cls()
        folders: dict[str, int] = {}
        codes = []
        for t in tables:
            remap = np.array([folders.setdefault(f, len(folders)) for f in t.folders] or [0], dtype=np.int32)
            codes.append(remap[t.folder_of])
        out.folders = list(folders)
        out.folder_of = np.concatenate(codes) if codes else out.folder_of
        out.names = StringColumn.concat([t.names for t in tables])
        out.captions = StringColumn.concat([t.captions for t in tables])
        out.is_list = np.concatenate([t.is_list for t in tables]) if tables else out.is_list
        if any(t.first is not None for t in tables):
            starts = np.cumsum([0] + [len(t.captions) for t in tables[:-1]])
            out.first = np.concatenate([np.zeros(1, dtype=np.int64)] + [
                (t.first[1:] if t.first is not None else np.arange(1, len(t) + 1)) + s for t, s in zip(tables, starts)])
        return out

    def __len__(self) -> int:
        return len(self.folder_of)

    def image(self, index: int) -> str:
        return self.folders[self.folder_of[index]] + self.names[index]

    def caption(self, index: int) -> str | list[str]:
        if self.first is None:
            return self.captions[index]
        first, end = self.first[index], self.first[index + 1]
        if not self.is_list[index]:
            return self.captions[first]
        return [self.captions[k] for k in range(first, end)]

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return {'image': self.image(index), 'caption': self.caption(index)}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    ARRAYS = ('folder_of', 'is_list', 'first', 'names.data', 'names.offsets', 'captions.data', 'captions.offsets')

    def save(self, folder: str) -> None:
        """Write the table as .npy files (and folders.json) into `folder`."""
        os.makedirs(folder, exist_ok=True)
        for name in self.ARRAYS:
            obj, _, attr = name.rpartition('.')
            value = getattr(getattr(self, obj) if obj else self, attr)
            if value is not None:
                np.save(os.path.join(folder, name + '.npy'), value)
        with open(os.path.join(folder, 'folders.json'), 'w') as f:
            json.dump(self.folders, f)

    @classmethod
    def load(cls, folder: str) -> 'CaptionTable':
        """A table saved by `save`, memory-mapped: every process of the machine shares its pages."""
        out = cls()
        for name in cls.ARRAYS:
            path = os.path.join(folder, name + '.npy')
            if os.path.isfile(path):
                obj, _, attr = name.rpartition('.')
                setattr(getattr(out, obj) if obj else out, attr, np.load(path, mmap_mode='r'))
        with open(os.path.join(folder, 'folders.json')) as f:
            out.folders = json.load(f)
        return out

    @property
    def nbytes(self) -> int:
        return (self.folder_of.nbytes + self.names.nbytes + self.captions.nbytes + self.is_list.nbytes
                + (self.first.nbytes if self.first is not None else 0) + sum(len(f) for f in self.folders))


def lazy_transform(source, where: str, transform: Callable, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """`transform` applied to the image at `source` (a path or a file object) as opened, before
    it is decoded (for DraftRandomResizedCrop); ImageError naming `where` if it is unusable (as
    `open_image`: missing, unreadable or over `max_pixels`)."""
    with open_image(source, where, max_pixels) as img:
        try:
            return transform(img)
        except Exception as e:
            raise ImageError(f'cannot read image {source} ({where}): {one_line(e)}') from None


def _rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def _all_of(values: list, kind: type) -> bool:
    return set(map(type, values)) <= {kind}


class pretrain_dataset(AnnotationDataset):
    """Items {'image': full path, 'caption': str or list of str (one is drawn at random)}.

    Returns (image, caption). The items are held in a `CaptionTable` (`self.ann[i]` is still the
    item's dict). Above `check_images_above` items the image files are not checked at start-up
    (unless `check_images=True`): a missing or unreadable image stops the run when it is reached,
    with the same one-line error, or is skipped and counted with `skip_bad_images=True`;
    `python -m dataset.check CONFIG` scans them all offline.
    """
    keys = ('image', 'caption')
    check_images_above = 100_000
    cache_above = 1 << 20  # annotation files above 1 MiB are converted once and cached (see _load_file)

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, max_words: int = 30,
                 cache_dir: str | None = None, **options: bool) -> None:
        self.max_words = max_words
        self.cache_dir = cache_dir or default_cache_dir()
        self._tables: list[CaptionTable] = []
        super().__init__(ann_file, transform, **options)

    def _load_file(self, file_index: int, path: str) -> None:
        """A big annotation file is parsed once, in a forked child process, incrementally (a chunk
        of items at a time, dataset.annotation_cache), into a CaptionTable saved under `cache_dir`
        (keyed by the file's path, size and modification time); every later start, and every other
        process of the machine, memory-maps it (no JSON parsing, and the pages are shared). Neither
        the parent nor the child ever holds the whole file's dicts. Errors are the same one-line
        DataErrors."""
        if not self.strict or not os.path.isfile(path) or os.path.getsize(path) <= self.cache_above \
                or not hasattr(os, 'fork'):
            return super()._load_file(file_index, path)
        stat = os.stat(path)
        key = hashlib.sha256(f'v2\0{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode()).hexdigest()
        folder = os.path.join(self.cache_dir, 'annotations', key[:24])
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        import fcntl
        with open(folder + '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; the others wait, then map it
            if not os.path.isfile(os.path.join(folder, 'folders.json')):
                self._convert_in_child(file_index, path, folder)
        table = CaptionTable.load(folder)
        self._starts.append(self._count)
        self._count += len(table)
        self._tables.append(table)

    def _convert_in_child(self, file_index: int, path: str, folder: str) -> None:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: parse, validate, save; report an error through the pipe
            os.close(read_end)
            status = 0
            try:
                import resource
                import time
                start, rss = time.perf_counter(), _rss_mib()
                tmp = f'{folder}.tmp{os.getpid()}'
                self._starts.append(self._count)  # store_items names the file by its position
                try:
                    items = write_table(path, tmp, self._store_chunk)
                except DataError:
                    raise
                except ValueError:  # not one valid JSON list: read whole, for the exact error
                    read_json_list(path)
                    raise
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                with open(os.path.join(tmp, 'conversion.json'), 'w') as f:  # for the record
                    json.dump({'file': path, 'items': items, 'seconds': time.perf_counter() - start,
                               'cpu_seconds': time.process_time(), 'peak_memory_growth_mib': peak - rss}, f)
                os.replace(tmp, folder)
            except BaseException as error:  # noqa: B902 - everything goes back to the parent
                os.write(write_end, (str(error) or type(error).__name__).encode())
                status = 1
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, 'rb') as f:
            message = f.read().decode(errors='replace')
        _, status = os.waitpid(pid, 0)
        if status != 0:
            shutil.rmtree(f'{folder}.tmp{pid}', ignore_errors=True)
            raise DataError(message or f'{path}: converting the annotations failed')

    def _store_chunk(self, items: list) -> CaptionTable:
        self._tables = []
        self.store_items(items, validated=False)
        return self._tables.pop()

    def store_items(self, items: list, validated: bool) -> None:
        # validated in bulk (C-speed type sets); the per-item check runs only to name a bad item
        try:
            images = [item['image'] for item in items]
            captions = [item['caption'] for item in items]
        except (KeyError, TypeError):
            self.first_problem(items)
            raise
        if not validated:
            path = self.ann_files[len(self._starts) - 1]
            caption_types = set(map(type, captions))
            if not caption_types <= {str, list}:
                self.first_problem(items)
            if list in caption_types and not all(c and _all_of(c, str) for c in captions if type(c) is list):
                self.first_problem(items)  # names the item: an empty list, or an element that is not a string
                i = next(i for i, c in enumerate(captions) if type(c) is list and not _all_of(c, str))
                raise DataError(f"{path}: item {i} has a 'caption' list with an element that is not a string")
            if not _all_of(images, str):
                i = next(i for i, p in enumerate(images) if type(p) is not str)
                raise DataError(f"{path}: item {i} has 'image' of type {type(images[i]).__name__} (expected a string)")
        self._tables.append(CaptionTable(images, captions))

    def finish_items(self, stored) -> CaptionTable:
        table = CaptionTable.concat(self._tables) if self._tables else CaptionTable()
        self._tables = []
        return table

    def item_problem(self, item: dict) -> str | None:
        caption = item['caption']
        if isinstance(caption, list) and not caption:
            return "has an empty 'caption' list"
        return (type_problem(item, 'caption', (str, list), 'a string or a list of strings')
                or list_problem(item, 'caption'))

    def image_paths(self, item: dict) -> list[str]:
        return [item['image']]

    def get_item(self, index: int) -> tuple:
        if getattr(self.transform, 'lazy_decode', False):  # the transform decodes (jpeg_draft)
            path = self.ann.image(index)
            image = lazy_transform(path, self.where(index), self.transform, self.max_image_pixels)
        else:
            image = self.apply_transform(self.load_image(self.ann.image(index), index))
        caption = self.ann.caption(index)
        if isinstance(caption, list):
            caption = random.choice(caption)
        return image, pre_caption(caption, self.max_words)


class re_train_dataset(ImageRootDataset):
    """Items {'image': path under image_root, 'caption': str, 'image_id'}.

    Returns (image, caption, img_idx); img_idx numbers the distinct `image_id`s 0..n-1 in order of
    first appearance.
    """
    keys = ('image', 'caption', 'image_id')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        super().__init__(ann_file, transform, image_root, max_words, **options)
        self.img_ids: dict = {}
        for ann in self.ann:
            self.img_ids.setdefault(ann['image_id'], len(self.img_ids))

    def item_problem(self, item: dict) -> str | None:
        return type_problem(item, 'caption', str, 'a string')

    def get_item(self, index: int) -> tuple:
        ann = self.ann[index]
        image = self.load_image(self.image_paths(ann)[0], index)
        caption = pre_caption(ann['caption'], self.max_words)
        return self.apply_transform(image), caption, self.img_ids[ann['image_id']]


class re_eval_dataset(ImageRootDataset):
    """Items {'image': path under image_root, 'caption': list of str}, one per image.

    Returns (image, index). Also builds, in file order, `text` (all preprocessed captions), `image`
    (the image paths as given), `txt2img` {text index: image index} and `img2txt` {image index:
    [text indices]}.
    """
    keys = ('image', 'caption')

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        super().__init__(ann_file, transform, image_root, max_words, **options)
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
        return type_problem(item, 'caption', list, 'a list of strings') or list_problem(item, 'caption') or \
            (None if item['caption'] else "has an empty 'caption' list (each image needs at least one caption)")

    def get_item(self, index: int) -> tuple:
        image = self.load_image(self.image_paths(self.ann[index])[0], index)
        return self.apply_transform(image), index
