"""What the dataset classes share: reading annotation files and images, with errors that name the
file, the item and the key or image at fault.

Every error is a `DataError` (a ValueError) with a one-line message. A dataset validates all of its
annotation items when it is built and, unless `check_images=False`, checks that every image file
exists (a class may leave that check out by default above `check_images_above` items: the
pre-training sets do, so that 14M items start in seconds; a missing image then stops the run
with the same one-line error when it is reached). An image over `max_image_pixels` pixels is
unreadable. With `skip_bad_images=True` an item whose image is missing or unreadable is replaced
by the next readable item instead of stopping the run; `num_skipped` counts the replacements.
"""
from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from configuration import one_line

# The original sets LOAD_TRUNCATED_IMAGES globally, which trains on a cut-off file's missing part
# as grey without a word; here a truncated image is unreadable (an error, or skipped with
# `skip_bad_images`).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# A dataset's limit on an image's pixels against decompression bombs (a 10 MB PNG can declare
# gigapixels): Pillow's own refusal threshold, 2 x PIL.Image.MAX_IMAGE_PIXELS (about 13,400^2). A
# config may raise it (`max_image_pixels: N`, null: none); the demo and models.load keep Pillow's.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485

# modes with more than 8 bits per sample (16-bit and 32-bit greyscale, float)
HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F')

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """An annotation file, annotation item or image that cannot be used. The message is one line."""


class ImageError(DataError):
    """An image file is missing or unreadable (what `skip_bad_images` skips)."""


@dataclass(frozen=True)
class Problem:
    """One problem found in the data. `index` is the item's position in `file` (None for a problem
    with the whole file). `kind` is 'file', 'item', 'missing_image' or 'bad_image', or 'note' for
    something that is not wrong but worth knowing (a 16-bit image)."""
    kind: str
    file: str
    index: int | None
    message: str


def as_file_list(ann_file: str | Sequence[str]) -> list[str]:
    """A config's `*_file` value (one path or a list of paths) as a list."""
    return [ann_file] if isinstance(ann_file, (str, os.PathLike)) else list(ann_file)


def _json_type(value: Any) -> str:
    names = {dict: 'an object', list: 'a list', str: 'a string', bool: 'a boolean', int: 'a number',
             float: 'a number', type(None): 'null'}
    return names.get(type(value), type(value).__name__)


def read_json(path: str) -> Any:
    """Parse the JSON file at `path`, raising DataError for a missing file or invalid JSON."""
    if not os.path.isfile(path):
        raise DataError(f'annotation file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason})') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read file: {one_line(e)}') from None


def read_json_list(path: str) -> list:
    """A JSON file whose top level must be a list."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list, got {_json_type(data)}')
    return data


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB. A high-bit-depth greyscale image (a 16-bit PNG, mode I;16) is scaled by its
    actual range, darkest pixel to 0 and brightest to 255 (PIL's own conversion clips it to 255,
    an all-white image); a flat image keeps its level relative to the mode's full scale."""
    if img.mode not in HIGH_BIT_DEPTH_MODES:
        return img.convert('RGB')
    values = np.asarray(img, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high > low:
        values = (values - low) * (255.0 / (high - low))
    else:
        full = 65535.0 if img.mode.startswith('I;16') else (1.0 if img.mode == 'F' else 2.0 ** 31 - 1)
        values = np.full_like(values, min(max(low / full, 0.0), 1.0) * 255.0)
    return Image.fromarray(np.rint(values).astype(np.uint8), 'L').convert('RGB')


def max_image_pixels(config: dict) -> int | None:
    """A config's limit on an image's pixels: `max_image_pixels`, else the default; null: none."""
    return config.get('max_image_pixels', DEFAULT_MAX_IMAGE_PIXELS)


def allow_in_pillow(max_pixels: int | None) -> None:
    """Pillow refuses an image over 2 x PIL.Image.MAX_IMAGE_PIXELS (process-wide) before a dataset sees
    it: a higher limit raises Pillow's to match in the process that reads (training); the default doesn't."""
    guard = Image.MAX_IMAGE_PIXELS
    if guard is not None and (max_pixels is None or max_pixels > 2 * guard):
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else -(-max_pixels // 2)


def too_many_pixels(img: Image.Image | None, max_pixels: int | None) -> str | None:
    """Why an opened image (None: one Pillow refused as too large) is over `max_pixels`, else None."""
    if max_pixels is None or (img is not None and img.width * img.height <= max_pixels):
        return None
    size = '' if img is None else f'{img.width} x {img.height}, '
    return f'{size}more than max_image_pixels = {max_pixels} pixels (a decompression bomb? raise the key to read it)'


def open_image(source: Any, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """`Image.open(source)`, not decoded; ImageError naming `where` if missing, unreadable or over `max_pixels`."""
    allow_in_pillow(max_pixels)
    try:
        img = Image.open(source)
    except FileNotFoundError:
        raise ImageError(f'image not found: {source} ({where})') from None
    except Image.DecompressionBombError:
        raise ImageError(f'cannot read image {source} ({where}): {too_many_pixels(None, max_pixels)}') from None
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
        raise ImageError(f'cannot read image {source} ({where}): {one_line(e)}') from None
    if problem := too_many_pixels(img, max_pixels):
        img.close()
        raise ImageError(f'cannot read image {source} ({where}): {problem}')
    return img


def load_rgb(path: str, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode `path` as an 8-bit RGB PIL image (`to_rgb8`); `where` ('item i of
    file') goes into the error message. A truncated file, or one over `max_pixels`, is unreadable."""
    with open_image(path, where, max_pixels) as img:
        try:
            img.load()
            return to_rgb8(img)
        except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
            raise ImageError(f'cannot read image {path} ({where}): {one_line(e)}') from None


def probe_image(path: str, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
    """Check that `path` exists and that PIL can verify it and decode it fully, as training does (under
    `max_pixels`). None if so, else (kind, message), kind 'missing_image', 'bad_image', or 'note' (a
    high-bit-depth image, which training scales to 8 bits by its range)."""
    if not os.path.isfile(path):
        return 'missing_image', f'image not found: {path} ({where})'
    try:
        with open_image(path, where, max_pixels) as img:
            img.verify()
        with open_image(path, where, max_pixels) as img:
            img.load()
            mode = img.mode
    except ImageError as e:
        return 'bad_image', str(e)
    except Exception as e:
        return 'bad_image', f'cannot read image {path} ({where}): {one_line(e)}'
    if mode in HIGH_BIT_DEPTH_MODES:
        return 'note', f'image {path} ({where}) has mode {mode}: scaled to 8 bits by its range of values'
    return None


def type_problem(item: dict, key: str, expected: type | tuple[type, ...], what: str) -> str | None:
    """'has <key> of type X (expected <what>)' when item[key] is not an instance of `expected`."""
    if isinstance(item[key], expected):
        return None
    return f"has '{key}' of type {type(item[key]).__name__} (expected {what})"


def list_problem(item: dict, key: str) -> str | None:
    """'has a non-string in <key> ...' when item[key] is a list with an element that is not a string."""
    value = item[key]
    if not isinstance(value, list):
        return None
    for position, element in enumerate(value):
        if not isinstance(element, str):
            return f"has {_json_type(element)} at position {position} of its '{key}' list (expected strings)"
    return None


class StringColumn:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets) instead of one Python object
    each: about 1 byte per character plus 8 per string, shared by forked DataLoader workers
    without copy-on-write growth (no reference counts live in the arrays)."""

    def __init__(self, strings: Sequence[str] = ()) -> None:
        encoded = [s.encode('utf-8') for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=self.offsets[1:])
        self.data = np.frombuffer(b''.join(encoded), dtype=np.uint8)

    @classmethod
    def concat(cls, columns: Sequence['StringColumn']) -> 'StringColumn':
        out = cls()
        out.data = np.concatenate([c.data for c in columns]) if columns else out.data
        starts = np.cumsum([0] + [len(c.data) for c in columns[:-1]])
        out.offsets = np.concatenate([out.offsets[:1]] + [c.offsets[1:] + s for c, s in zip(columns, starts)])
        return out

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.data[self.offsets[index]:self.offsets[index + 1]].tobytes().decode('utf-8')

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


class AnnotationDataset(Dataset):
    """Base of the dataset classes: annotation items from one or more JSON files, plus images.

    A subclass sets its own attributes (image roots, split, ...), calls `super().__init__`, and
    defines `keys` (or `required_keys`), `image_paths(item)` and `get_item(index)`; it may define
    `item_problem(item)` for value checks.

    Args:
        ann_file: a JSON file or a list of them (concatenated in order); each is a list of objects.
        transform: applied to every PIL image (None returns the PIL image).
        skip_bad_images: replace an item whose image is missing or unreadable by the next readable
            item (index + 1, wrapping) and count it in `num_skipped` (per process: each DataLoader
            worker counts in its own copy). Missing images found at construction are then reported
            as a count (a warning) instead of an error.
        check_images: check at construction that every image file exists. None (the default)
            checks unless the dataset has more than `check_images_above` items (a class attribute;
            None: always check).
        strict: False records each problem in `problems` and leaves the bad items out instead of
            raising (used by `dataset.check`).
        max_image_pixels: an image with more pixels is unreadable (None: no limit).
    """
    keys: tuple[str, ...] = ()
    check_images_above: int | None = None

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, *,
                 skip_bad_images: bool = False, check_images: bool | None = None, strict: bool = True,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.max_image_pixels = max_image_pixels
        self.strict = strict
        self.num_skipped = 0
        self.num_missing_images = 0
        self.problems: list[Problem] = []
        self.ann_files = as_file_list(ann_file)
        self.ann: Sequence[dict] = []
        self._starts: list[int] = []                     # first index of each file's items
        self._origins: list[tuple[int, int]] | None = None if strict else []  # (file, item) per index
        self._count = 0
        for file_index, path in enumerate(self.ann_files):
            self._load_file(file_index, path)
        self.ann = self.finish_items(self.ann)
        if check_images is None:
            check_images = self.check_images_above is None or len(self.ann) <= self.check_images_above
        if check_images:
            self.check_images_exist()

    # ---- subclass hooks --------------------------------------------------------------------
    def required_keys(self, item: dict) -> Iterable[str]:
        return self.keys

    def item_problem(self, item: dict) -> str | None:
        """What is wrong with an item's values (after its keys were found), as 'has ...', or None."""
        return None

    def image_paths(self, item: dict) -> list[str]:
        raise NotImplementedError

    def get_item(self, index: int) -> tuple:
        raise NotImplementedError

    def store_items(self, items: list, validated: bool) -> None:
        """Add one file's items to `self.ann`; with `validated` False (strict mode) they are not
        checked yet: a subclass with its own storage may check them in bulk, and must raise the
        error `_problem_of` would give for the first bad one (`first_problem` finds it)."""
        if not validated:
            self.first_problem(items)
        self.ann.extend(items)

    def finish_items(self, stored: Any) -> Sequence[dict]:
        """What `self.ann` becomes once every file is stored (a subclass's compact table)."""
        return stored

    def first_problem(self, items: list, path: str | None = None) -> None:
        """Raise DataError for the first item of `items` that has a problem (a no-op if none has)."""
        path = self.ann_files[len(self._starts) - 1] if path is None else path
        for i, item in enumerate(items):
            problem = self._problem_of(item)
            if problem is not None:
                raise DataError(f'{path}: item {i} {problem}')

    # ---- annotations -----------------------------------------------------------------------
    def report(self, problem: Problem) -> None:
        """Raise the problem (strict) or record it."""
        if self.strict:
            raise DataError(problem.message)
        self.problems.append(problem)

    def _problem_of(self, item: Any) -> str | None:
        if not isinstance(item, dict):
            return f'is not an object (got {_json_type(item)})'
        for key in self.required_keys(item):
            if key not in item:
                keys = ', '.join(repr(k) for k in item) or 'none'
                return f"has no '{key}' (keys: {keys})"
        if 'image' in item and not isinstance(item['image'], str):  # e.g. null: not a path to join
            return type_problem(item, 'image', str, 'a string')
        return self.item_problem(item)

    def _load_file(self, file_index: int, path: str) -> None:
        try:
            items = read_json_list(path)
        except DataError as e:
            self.report(Problem('file', path, None, str(e)))
            return
        self._starts.append(self._count)
        if self.strict:
            self._count += len(items)
            self.store_items(items, validated=False)
            return
        good = []
        for i, item in enumerate(items):
            problem = self._problem_of(item)
            if problem is not None:
                self.problems.append(Problem('item', path, i, f'{path}: item {i} {problem}'))
                continue
            good.append(item)
            self._origins.append((file_index, i))
        self._count += len(good)
        self.store_items(good, validated=True)

    def origin(self, index: int) -> tuple[str, int]:
        """(annotation file, position in that file) of item `index`."""
        if self._origins is not None:
            file_index, i = self._origins[index]
            return self.ann_files[file_index], i
        # the last file starting at or before `index` (empty files share the next file's start)
        k = bisect.bisect_right(self._starts, index) - 1
        return self.ann_files[k], index - self._starts[k]

    def where(self, index: int) -> str:
        path, i = self.origin(index)
        return f'item {i} of {path}'

    # ---- images ----------------------------------------------------------------------------
    def load_image(self, path: str, index: int) -> Image.Image:
        """The RGB image of item `index` (ImageError naming the item if missing or unreadable)."""
        return load_rgb(path, self.where(index), self.max_image_pixels)

    def apply_transform(self, image: Image.Image) -> Any:
        return self.transform(image) if self.transform is not None else image

    def check_images_exist(self) -> None:
        """Check that every image file exists (consecutive repeats of a path are checked once)."""
        last, last_ok = None, True
        first_missing = None
        for index, item in enumerate(self.ann):
            ok = True
            for path in self.image_paths(item):
                if path != last:
                    last, last_ok = path, os.path.isfile(path)
                if not last_ok:
                    ok = False
                    message = f'image not found: {path} ({self.where(index)})'
                    if not self.skip_bad_images:
                        self.report(Problem('missing_image', *self.origin(index), message))
                    first_missing = first_missing or message
            self.num_missing_images += not ok
        if self.num_missing_images and self.skip_bad_images:
            logger.warning('%d of %d items have a missing image and will be skipped (first: %s)',
                           self.num_missing_images, len(self.ann), first_missing)

    def image_problems(self, workers: int = 8, progress: bool = False, desc: str = 'images',
                       chunk: int = 1024) -> Iterator[Problem]:
        """Open and verify every image with PIL (in `workers` threads); yield one problem per bad
        (item, image) pair, in item order."""
        jobs = ((index, path) for index, item in enumerate(self.ann) for path in self.image_paths(item))
        bar = None
        if progress:
            import utils
            total = sum(len(self.image_paths(item)) for item in self.ann)
            bar = utils.progress(total=total, desc=desc, unit='img')

        def probe(job: tuple[int, str]) -> Problem | None:
            index, path = job
            found = probe_image(path, self.where(index), self.max_image_pixels)
            return None if found is None else Problem(found[0], *self.origin(index), found[1])

        with ThreadPoolExecutor(max(1, workers)) as pool:
            while batch := list(itertools.islice(jobs, chunk)):
                yield from (problem for problem in pool.map(probe, batch) if problem is not None)
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()

    # ---- torch Dataset ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple:
        if not self.skip_bad_images:
            return self.get_item(index)
        for _ in range(len(self)):
            try:
                return self.get_item(index)
            except ImageError as e:
                self.num_skipped += 1
                logger.warning('skipped: %s', e)
                index = (index + 1) % len(self)
        raise DataError(f"no readable image in {', '.join(self.ann_files)}")


class ImageRootDataset(AnnotationDataset):
    """An AnnotationDataset whose items name their image under `image_root` (by default the item's
    'image', joined to the root) and whose text is cut to `max_words` words."""

    def __init__(self, ann_file: str | Sequence[str], transform: Callable | None, image_root: str,
                 max_words: int = 30, **options: bool) -> None:
        self.image_root = image_root
        self.max_words = max_words
        super().__init__(ann_file, transform, **options)

    def image_paths(self, item: dict) -> list[str]:
        return [os.path.join(self.image_root, item['image'])]
