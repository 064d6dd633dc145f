"""Pre-training data in tar shards, read as a stream with the webdataset library.

A shard is a tar file of samples grouped by key, as img2dataset and webdataset's own
`TarWriter`/`ShardWriter` write them: `KEY.jpg` (or `.jpeg`, `.png`, `.webp`), `KEY.txt` (the
caption) and an optional `KEY.json` (with `"captions": [...]` one of them is drawn at random each
time, like a list caption in a JSON annotation file). The config key `train_shards` is one
pattern or a list of them: brace patterns (`data/cc3m/{00000..00331}.tar`), globs
(`/data/cc12m/*.tar`, sorted) or anything webdataset's `gopen` opens (URLs, `pipe:` commands).

How one epoch is split: samples, not shards, are dealt out to the G = processes x loader workers
streams, each taking exactly the samples its batches need (`dataset.dealing`), from the per-shard
counts (img2dataset's `<shard>_stats.json`, else one pass over the tar headers, cached). Every
sample the epoch uses is delivered once; the remainder (fewer than one global batch) starts the
next epoch. Each stream shuffles its samples in a buffer of `shuffle_buffer` samples (undecoded
bytes), then decodes them. Every process takes the same number of steps,
samples_per_epoch // (processes x batch_size) (default: all samples).

Bad data never stops the run and is never silent: a sample whose image does not decode (or that
has no image or caption) and a shard that cannot be read to its end are skipped, logged and
counted; a shard with fewer samples than its count is reported with both numbers. A stream left
short of its quota reads on through the rest of the epoch's samples (those are then trained twice,
which the epoch's counts show), so no process ever waits on another. Iterating yields
((image, caption), (skipped, sample id, short shards, ids delivered before a resume)), which
`dataset.loaders.StreamLoader` turns into the epoch's counts.

Resume: the stream position of a checkpoint is (epoch, step). On resume each stream replays the
epoch's deal and shuffle buffer from the start, passing over the samples it had already
delivered without decoding them, so with the same number of processes and loader workers the run
continues with exactly the batches (and augmentations) it would have had: bit-identical. With a
different number of processes or workers the split differs and the rest of the epoch is a fresh
split of the samples (each seen at most about once more): approximate.

    python -m dataset.shards CONFIG --out DIR [--shard-size N]

converts the JSON annotations and images of a pre-training config into such shards (with
webdataset's ShardWriter), with a progress bar and a summary.
"""
from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import os
import random
import sys
import tarfile
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from configuration import cache_dir as default_cache_dir, one_line
from .base import DEFAULT_MAX_IMAGE_PIXELS, DataError, allow_in_pillow, too_many_pixels
from .dealing import EpochPlan, Share, quotas_of, seed_of as _seed
from .shard_writer import convert, main  # noqa: F401 - `python -m dataset.shards` runs main
from .utils import Seeded, pre_caption

logger = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
DEFAULT_SHUFFLE_BUFFER = 1000
SAMPLE_LOG_ENV = 'ALBEF_SAMPLE_LOG'  # a folder: every stream writes the keys it delivers there
HELD_WARNINGS = 20  # warnings a stream holds back until its first good sample (all bad: one error)


def _local(url: str) -> str | None:
    if url.startswith('file:'):
        return url[5:]
    return None if ':' in url.split('/')[0] or url.startswith('pipe:') else url


def expand(patterns: str | Sequence[str]) -> list[str]:
    """The shard URLs of a `train_shards` value: brace patterns expanded in order, local globs
    sorted. A local file that does not exist, or a glob that matches nothing, is an error naming
    the pattern (checked here, before any progress bar starts)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    urls = []
    for pattern in map(str, patterns):
        for url in wds.shardlists.expand_urls(pattern):
            path = _local(url)
            if path is not None and glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f'train_shards: no file matches {url}')
                urls += [url[:len(url) - len(path)] + match for match in matches]
                continue
            if path is not None and not os.path.isfile(path):
                raise DataError(f'train_shards: shard not found: {path}'
                                + (f' (from {pattern})' if pattern != url else ''))
            urls.append(url)
    if not urls:
        raise DataError('train_shards: no shard given')
    return urls


def count_samples(url: str) -> int:
    """Samples (keys with an image) in one shard: from img2dataset's `<shard>_stats.json` when
    there is one, else by reading the tar's member names (no image is decoded)."""
    path = _local(url)
    if path is not None:
        if not os.path.isfile(path):
            raise DataError(f'train_shards: shard not found: {path}')
        stats = os.path.splitext(path)[0] + '_stats.json'
        if os.path.isfile(stats):
            try:
                with open(stats) as f:
                    return int(json.load(f)['successes'])
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(f"train_shards: {stats}: expected img2dataset's stats with a number "
                                f"'successes' ({one_line(error)})") from None
    keys, members = set(), 0
    try:
        with wds.gopen(url, 'rb') as stream, tarfile.open(fileobj=stream, mode='r|*') as tar:
            for member in tar:
                members += 1
                key, ext = base_plus_ext(member.name)
                if key is not None and ext and ext.lower() in IMAGE_EXTS:
                    keys.add(key)
    except Exception as error:
        if not members:
            raise DataError(f'train_shards: {url} is not a tar file ({one_line(error)})') from None
        # a truncated shard: count what is readable, as the stream will
        logger.warning('shard %s is readable only up to its %d-th sample: %s', url, len(keys), one_line(error))
    return len(keys)


def parts_of(sample: dict, key: str) -> tuple[str, list]:
    """(image extension, captions) of a raw sample; DataError naming what it lacks."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f'{key}: no image ({", ".join(IMAGE_EXTS)}) in the sample')
    captions = None
    if 'json' in sample:
        try:
            meta = json.loads(sample['json'])
        except ValueError as error:
            raise DataError(f'{key}: invalid json: {one_line(error)}') from None
        captions = meta.get('captions') if isinstance(meta, dict) else None
        if captions is None and isinstance(meta, dict) and isinstance(meta.get('caption'), str):
            captions = [meta['caption']]
    if not captions:
        if 'txt' not in sample:
            raise DataError(f'{key}: no caption (txt, or json with "caption" or "captions") in the sample')
        captions = [sample['txt'].decode('utf-8', errors='replace')]
    return ext, captions


def check_first_samples(url: str, count: int = 10) -> None:
    """Start-up check of the first `count` samples of a shard (no image decoded): if none has an
    image and a caption, nothing will train (a wrong extension, say): one error naming the first."""
    problems = []
    for sample in itertools.islice(wds.tarfile_samples([{'url': url}], handler=lambda e: False), count):
        try:
            parts_of(sample, f"{url}:{sample.get('__key__')}")
            return
        except DataError as error:
            problems.append(error)
    if problems:
        raise DataError(f'train_shards: none of the first {len(problems)} samples can be trained on; '
                        f'the first: {problems[0]}')


def shard_sizes(urls: Sequence[str], cache_dir: str | None = None, progress: bool = False) -> list[int]:
    """The sample count of every shard, cached in `cache_dir` (default $ALBEF_CACHE, else
    ~/.cache/albef) under the URL list and, for local files, their sizes and modification times."""
    cache_dir = cache_dir or default_cache_dir()
    signature = hashlib.sha256()
    for url in urls:
        path = _local(url)
        stat = os.stat(path) if path is not None and os.path.isfile(path) else None
        signature.update(f'{url}\0{stat.st_size if stat else ""}\0{stat.st_mtime_ns if stat else ""}\n'.encode())
    cache = os.path.join(cache_dir, f'shard_sizes_{signature.hexdigest()[:24]}.json')
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    bar = None
    if progress:
        import utils
        bar = utils.progress(total=len(urls), desc='counting shard samples', unit='shard')
    try:
        sizes = []
        for url in urls:
            sizes.append(count_samples(url))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:  # ends its line: an error goes on a line of its own
            bar.close()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f'{cache}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump(sizes, f)
        os.replace(tmp, cache)
    except OSError as error:
        logger.warning('cannot cache the shard sizes in %s: %s', cache_dir, one_line(error))
    return sizes


class ShardStream(torch.utils.data.IterableDataset):
    """Pre-training samples (image, caption) from tar shards, and optionally the items of a JSON
    `pretrain_dataset` too, dealt out over processes and loader workers (see the module docstring).

    Iterating yields ((image, caption), info), info = (bad samples and unreadable shards skipped
    since the previous item, the sample's id, shards found shorter than their count as
    (shard, found, counted), ids delivered before a resume); dataset.loaders.StreamLoader sums them.
    Use it with a DataLoader of `batch_size` and `num_workers` as given here, and call
    `set_epoch(epoch, start)` (start: samples of this process already trained in this epoch)
    before each epoch.
    """

    def __init__(self, urls: Sequence[str], transform: Callable | None, *, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, sizes: Sequence[int] | None = None,
                 samples_per_epoch: int | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 max_words: int = 30, json_dataset: Any = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.urls, self.transform = list(urls), transform
        self.batch_size, self.num_workers = batch_size, max(1, num_workers)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sizes = list(sizes) if sizes is not None else shard_sizes(self.urls)
        self.shuffle_buffer, self.max_words, self.json_dataset = max(1, shuffle_buffer), max_words, json_dataset
        self.num_json = len(json_dataset) if json_dataset is not None else 0
        self.max_image_pixels = max_image_pixels
        self.available = sum(self.sizes) + self.num_json
        self.samples_per_epoch = min(samples_per_epoch or self.available, self.available)
        self.steps = self.samples_per_epoch // (world_size * batch_size)
        if self.steps < 1:
            raise DataError(f'train_shards: {self.samples_per_epoch} samples per epoch are fewer than one batch '
                            f'on each of {world_size} processes (batch_size {batch_size})')
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start_step = epoch, start // self.batch_size

    def plan(self, num_workers: int, epoch: int | None = None) -> EpochPlan:
        """The epoch's deal over world_size x num_workers streams."""
        quotas = quotas_of(self.steps, self.batch_size, self.world_size, num_workers)
        return EpochPlan(self.sizes, self.num_json, quotas, self.seed, self.epoch if epoch is None else epoch)

    # ---- the raw stream of one of the G streams -------------------------------------------------
    def _shard_samples(self, plan: EpochPlan, ranges: Sequence, counter: list, events: list,
                       warn: Callable[[str], None]) -> Iterator[dict]:
        """The samples first..end-1 (counting those with an image) of each (shard, first, end)."""
        for shard, first, end in ranges:
            url, errors = self.urls[shard], []
            index, samples = 0, wds.tarfile_samples([{'url': url}], handler=lambda e: errors.append(e) or True)
            for sample in samples:
                if not any(ext in sample for ext in IMAGE_EXTS):
                    if first <= index < end:  # counted by the one stream whose range holds this position
                        counter[0] += 1
                        warn(f"skipped: {url}:{sample.get('__key__')}: no image ({', '.join(IMAGE_EXTS)}) "
                             f"in the sample")
                    continue
                if index >= end:
                    break
                if index >= first:
                    sample['__id__'] = plan.ident(shard, index)
                    yield sample
                index += 1
            samples.close()  # stopped early: the file is closed now
            if errors:  # one shard may report its error at several levels: counted once
                counter[0] += 1
                warn(f'skipped the rest of shard {url}: {one_line(errors[0])}')
            if index < end:
                events.append((shard, index, self.sizes[shard]))

    def _raw(self, plan: EpochPlan, share: Share, mix_seed: int, counter: list, events: list,
             warn: Callable[[str], None]) -> Iterator[Any]:
        shards = self._shard_samples(plan, share.ranges, counter, events, warn)
        expected, indices = share.shard_samples, share.json.tolist()
        rng = random.Random(mix_seed)
        j, shards_left = 0, bool(share.ranges)
        while shards_left or j < len(indices):
            # interleave the two sources in proportion to what each has left
            left_json = len(indices) - j
            if left_json and (not shards_left or rng.random() * (left_json + max(expected, 1)) < left_json):
                yield ('json', indices[j], plan.shard_total + indices[j])
                j += 1
                continue
            sample = next(shards, None)
            if sample is None:
                shards_left = False
                continue
            expected = max(expected - 1, 0)
            yield sample

    def _shuffled(self, data: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        buffer: list = []
        for sample in data:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], sample = sample, buffer[k]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    # ---- decoding ---------------------------------------------------------------------------
    def _decode(self, sample: Any) -> tuple[str, Any]:
        """(key, (image, caption)); DataError for a sample that cannot be used."""
        if isinstance(sample, tuple):  # an item of the JSON dataset
            index = sample[1]
            with Seeded(_seed(self.seed, self.epoch, 'json', index)):
                return f'json:{index}', self.json_dataset[index]
        key = f"{sample.get('__url__', '')}:{sample.get('__key__', '')}"
        ext, captions = parts_of(sample, key)
        with Seeded(_seed(self.seed, self.epoch, key)):
            caption = random.choice(captions) if len(captions) > 1 else captions[0]
            allow_in_pillow(self.max_image_pixels)
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    if problem := too_many_pixels(img, self.max_image_pixels):
                        raise DataError(problem)
                    if getattr(self.transform, 'lazy_decode', False):  # it decodes (jpeg_draft)
                        image = self.transform(img)
                    else:
                        image = img.convert('RGB')
                        if self.transform is not None:
                            image = self.transform(image)
            except Image.DecompressionBombError:
                raise DataError(f'cannot decode image {key}.{ext}: {too_many_pixels(None, self.max_image_pixels)}') \
                    from None
            except Exception as error:  # PIL raises many types
                raise DataError(f'cannot decode image {key}.{ext}: {one_line(error)}') from None
        return key, (image, pre_caption(caption, self.max_words))

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        W = info.num_workers if info is not None else 1
        # the DataLoader asks its workers for batches in turn, starting with worker 0: after a
        # resume at step s, worker 0 plays the part of the worker whose turn step s was
        logical = ((info.id if info is not None else 0) + self.start_step) % W
        g, G = self.rank * W + logical, self.world_size * W
        plan = self.plan(W)
        quota = plan.quotas[g]
        skip = quotas_of(self.start_step, self.batch_size, 1, W)[logical]
        wanted = quota - skip
        log = self._sample_log(logical)
        counter, events = [0], []  # bad samples and unreadable shards; short shards
        held: list[str] = []  # warnings before the first good sample: all bad ends in one error
        held_count = [0]

        def warn(message: str) -> None:
            if held_count[0] < 0:
                logger.warning('%s', message)
                return
            held_count[0] += 1
            if len(held) < HELD_WARNINGS:
                held.append(message)
        reported, pass_, earlier = 0, 0, []
        while wanted > 0:
            share = plan.share(g) if pass_ == 0 else plan.refill(g)
            rng = random.Random(_seed(self.seed, self.epoch, pass_, g, G, 'buffer'))
            raw = self._raw(plan, share, _seed(self.seed, self.epoch, pass_, g, G, 'mix'), counter, events, warn)
            good_in_pass = 0
            for sample in self._shuffled(raw, rng):
                if skip:
                    # delivered before the checkpoint: passed over without decoding
                    if self._probably_good(sample):
                        skip -= 1
                        earlier.append(self._ident(sample))
                    if not skip:
                        reported = counter[0]  # those skips are in the checkpoint's count already
                    continue
                try:
                    key, item = self._decode(sample)
                except DataError as error:
                    counter[0] += 1
                    warn(f'skipped: {error}')
                    continue
                good_in_pass += 1
                if held_count[0] >= 0:  # the first good sample: the held warnings go out
                    for message in held:
                        logger.warning('%s', message)
                    if held_count[0] > len(held):
                        logger.warning('... and %d more skipped', held_count[0] - len(held))
                    held_count[0] = -1
                if log is not None:
                    log.write(f'{self.epoch}\t{key}\n')
                    log.flush()
                yield item, (counter[0] - reported, self._ident(sample), tuple(events), tuple(earlier))
                reported, earlier = counter[0], []
                events.clear()
                wanted -= 1
                if wanted == 0:
                    break
            if wanted and not good_in_pass and not skip and pass_ > 0:
                first = f': {held_count[0]} skipped, the first: {held[0]}' if held else ''
                raise DataError(f'train_shards: no readable sample for stream {g} of {G} '
                                f'({len(self.urls)} shards){first}')
            pass_ += 1
        if log is not None:
            log.close()

    @staticmethod
    def _ident(sample: Any) -> int:
        return sample[2] if isinstance(sample, tuple) else sample['__id__']

    def _probably_good(self, sample: Any) -> bool:
        """Whether a sample passed over on resume had been delivered, judged from its parts and
        the image header alone (no decoding): exact unless the skipped part held an image whose
        header is sound but whose data does not decode."""
        if isinstance(sample, tuple):
            return True
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or not ('txt' in sample or 'json' in sample):
            return False
        try:
            with Image.open(io.BytesIO(sample[ext])):
                return True
        except Exception:
            return False

    def _sample_log(self, logical: int):
        folder = os.environ.get(SAMPLE_LOG_ENV)
        if not folder:
            return None
        os.makedirs(folder, exist_ok=True)
        return open(os.path.join(folder, f'samples_rank{self.rank}_worker{logical}.tsv'), 'a')


if __name__ == '__main__':
    sys.exit(main())
