"""Pre-training data in tar shards, read as a stream with the webdataset library.

A shard is a tar file of samples grouped by key, as img2dataset and webdataset's own
`TarWriter`/`ShardWriter` write them: `KEY.jpg` (or `.jpeg`, `.png`, `.webp`), `KEY.txt` (the
caption) and an optional `KEY.json` (with `"captions": [...]` one of them is drawn at random each
time, like a list caption in a JSON annotation file). The config key `train_shards` is one
brace-expanded pattern or a list of them (`data/cc3m/{00000..00331}.tar`; anything webdataset's
`gopen` opens works: local paths, URLs, `pipe:` commands).

How one epoch is split (`ShardStream`): the shard list is shuffled with the run's seed and the
epoch (the same order on every process), then dealt out to the G = processes x loader workers
streams, stream g taking shards g, g + G, ...; the (number of shards mod G) shards left over are
read by every stream, each keeping every G-th of their samples. Either way each sample belongs to
one stream, so the processes together see it once per epoch (exactly once when the shards hold
about equally many samples, as img2dataset and ShardWriter write them: each stream's share is then
what its quota of batches needs). Each stream shuffles its samples in a buffer of
`shuffle_buffer` samples (undecoded bytes), then decodes them. The epoch has `samples_per_epoch`
samples (default: all of them, counted once per shard and cached) and every process takes the same
number of steps, samples_per_epoch // (processes x batch_size); a stream that runs out of samples
before its share starts over on its shards.

Bad data never stops the run and is never silent: a sample whose image does not decode (or that has
no image or caption) and a shard that cannot be read to its end are skipped, logged as a warning
and counted; the count reaches the epoch's log line as `train_skipped_images`.

Resume: the stream position of a checkpoint is (epoch, step). On resume each stream replays the
epoch's shard order and shuffle buffer from the start, passing over the samples it had already
delivered without decoding them, so with the same number of processes and loader workers the run
continues with exactly the batches (and augmentations) it would have had: bit-identical. With a
different number of processes or workers the split differs and the rest of the epoch is a fresh
split of the samples (each seen at most about once more): approximate.

    python -m dataset.shards CONFIG --out DIR [--shard-size N]

converts the JSON annotations and images of a pre-training config into such shards (with
webdataset's ShardWriter), with a progress bar and a summary.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import logging
import os
import random
import sys
import tarfile
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .base import DataError, _one_line
from .utils import cache_dir as default_cache_dir, pre_caption

logger = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
DEFAULT_SHUFFLE_BUFFER = 1000
SAMPLE_LOG_ENV = 'ALBEF_SAMPLE_LOG'  # a folder: every stream writes the keys it delivers there


def expand(patterns: str | Sequence[str]) -> list[str]:
    """The shard URLs of a `train_shards` value (brace patterns expanded, in order)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    urls = [url for pattern in patterns for url in wds.shardlists.expand_urls(str(pattern))]
    if not urls:
        raise DataError('train_shards: no shard given')
    return urls


def _local(url: str) -> str | None:
    if url.startswith('file:'):
        return url[5:]
    return None if ':' in url.split('/')[0] or url.startswith('pipe:') else url


def count_samples(url: str) -> int:
    """Samples (keys with an image) in one shard: from img2dataset's `<shard>_stats.json` when
    there is one, else by reading the tar's member names (no image is decoded)."""
    path = _local(url)
    if path is not None:
        if not os.path.isfile(path):
            raise DataError(f'train_shards: shard not found: {path}')
        stats = os.path.splitext(path)[0] + '_stats.json'
        if os.path.isfile(stats):
            with open(stats) as f:
                return int(json.load(f)['successes'])
    keys = set()
    try:
        with wds.gopen(url, 'rb') as stream, tarfile.open(fileobj=stream, mode='r|*') as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if key is not None and ext and ext.lower() in IMAGE_EXTS:
                    keys.add(key)
    except Exception as error:  # a truncated shard: count what is readable, as the stream will
        logger.warning('shard %s is readable only up to its %d-th sample: %s', url, len(keys), _one_line(error))
    return len(keys)


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
    iterable = urls
    if progress:
        from tqdm import tqdm
        iterable = tqdm(urls, desc='counting shard samples', unit='shard', dynamic_ncols=True)
    sizes = [count_samples(url) for url in iterable]
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f'{cache}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump(sizes, f)
        os.replace(tmp, cache)
    except OSError as error:
        logger.warning('cannot cache the shard sizes in %s: %s', cache_dir, _one_line(error))
    return sizes


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], 'little')


class _Seeded:
    """The global random generators (python, numpy, torch) seeded for one sample and restored
    after it: a sample's augmentation depends only on (seed, epoch, its key)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2 ** 32)
        torch.default_generator.manual_seed(self.seed % 2 ** 63)  # not torch.manual_seed: it records a
        # stack trace for the lazy CUDA seeding, a few ms per sample

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


class ShardStream(torch.utils.data.IterableDataset):
    """Pre-training samples (image, caption) from tar shards, and optionally the items of a JSON
    `pretrain_dataset` too, split over processes and loader workers (see the module docstring).

    Iterating yields ((image, caption), skipped), `skipped` being the bad samples and unreadable
    shards passed over since the previous item (dataset.loaders.CountSkipped sums them). Use it with a
    DataLoader of `batch_size` and `num_workers` as given here, and call `set_epoch(epoch, start)`
    (start: samples of this process already trained in this epoch) before each epoch.
    """

    def __init__(self, urls: Sequence[str], transform: Callable | None, *, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, sizes: Sequence[int] | None = None,
                 samples_per_epoch: int | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 max_words: int = 30, json_dataset: Any = None) -> None:
        self.urls, self.transform = list(urls), transform
        self.batch_size, self.num_workers = batch_size, max(1, num_workers)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sizes = list(sizes) if sizes is not None else None
        self.shuffle_buffer, self.max_words, self.json_dataset = max(1, shuffle_buffer), max_words, json_dataset
        available = (sum(self.sizes) if self.sizes is not None else 0) + len(json_dataset or ())
        self.samples_per_epoch = samples_per_epoch or available
        self.steps = self.samples_per_epoch // (world_size * batch_size)
        if self.steps < 1:
            raise DataError(f'train_shards: {self.samples_per_epoch} samples per epoch are fewer than one batch '
                            f'on each of {world_size} processes (batch_size {batch_size})')
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start_step = epoch, start // self.batch_size

    # ---- the raw stream of one of the G streams -------------------------------------------------
    def _shard_samples(self, urls: Sequence[str], keep: Callable[[int], bool], counter: list) -> Iterator[dict]:
        errors: list[BaseException] = []

        def handler(error: BaseException) -> bool:
            errors.append(error)
            return True  # webdataset stops reading the shard and goes on
        index = 0
        for url in urls:
            for sample in wds.tarfile_samples([{'url': url}], handler=handler):
                if keep(index):
                    yield sample
                index += 1
            if errors:  # one shard may report its error at several levels: counted once
                counter[0] += 1
                logger.warning('skipped the rest of shard %s: %s', url, _one_line(errors[0]))
                errors.clear()

    def _raw(self, g: int, G: int, pass_: int, counter: list) -> Iterator[Any]:
        order = list(self.urls)
        random.Random(_seed(self.seed, self.epoch, pass_, 'shards')).shuffle(order)
        # whole shards dealt out in turn; the len % G left over are read by every stream, each
        # keeping every G-th of their samples (so the streams get about equal shares)
        whole = len(order) // G * G
        mine, rest = order[:whole][g::G], order[whole:]
        size_of = dict(zip(self.urls, self.sizes or [0] * len(self.urls)))
        expected = sum(size_of[url] for url in mine) + sum(size_of[url] for url in rest) // G
        shards = itertools.chain(self._shard_samples(mine, lambda i: True, counter) if mine else (),
                                 self._shard_samples(rest, lambda i: i % G == g, counter) if rest else ())
        indices: list[int] = []
        if self.json_dataset is not None and len(self.json_dataset):
            perm = np.random.default_rng(_seed(self.seed, self.epoch, pass_, 'json')).permutation(len(self.json_dataset))
            indices = perm[g::G].tolist()
        rng = random.Random(_seed(self.seed, self.epoch, pass_, g, G, 'mix'))
        j, shards_left = 0, True
        while shards_left or j < len(indices):
            # interleave the two sources in proportion to what each has left
            left_json = len(indices) - j
            if left_json and (not shards_left or rng.random() * (left_json + max(expected, 1)) < left_json):
                yield ('json', indices[j])
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
            with _Seeded(_seed(self.seed, self.epoch, 'json', index)):
                return f'json:{index}', self.json_dataset[index]
        key = f"{sample.get('__url__', '')}:{sample.get('__key__', '')}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise DataError(f'{key}: no image ({", ".join(IMAGE_EXTS)}) in the sample')
        captions = None
        if 'json' in sample:
            try:
                meta = json.loads(sample['json'])
            except ValueError as error:
                raise DataError(f'{key}: invalid json: {_one_line(error)}') from None
            captions = meta.get('captions') if isinstance(meta, dict) else None
            if captions is None and isinstance(meta, dict) and isinstance(meta.get('caption'), str):
                captions = [meta['caption']]
        if not captions:
            if 'txt' not in sample:
                raise DataError(f'{key}: no caption (txt) in the sample')
            captions = [sample['txt'].decode('utf-8', errors='replace')]
        with _Seeded(_seed(self.seed, self.epoch, key)):
            caption = random.choice(captions) if len(captions) > 1 else captions[0]
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    if getattr(self.transform, 'lazy_decode', False):  # it decodes (jpeg_draft)
                        image = self.transform(img)
                    else:
                        image = img.convert('RGB')
                        if self.transform is not None:
                            image = self.transform(image)
            except Exception as error:  # PIL raises many types
                raise DataError(f'cannot decode image {key}.{ext}: {_one_line(error)}') from None
        return key, (image, pre_caption(caption, self.max_words))

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        W = info.num_workers if info is not None else 1
        # the DataLoader asks its workers for batches in turn, starting with worker 0: after a
        # resume at step s, worker 0 plays the part of the worker whose turn step s was
        logical = ((info.id if info is not None else 0) + self.start_step) % W
        g, G = self.rank * W + logical, self.world_size * W

        def turns(steps: int) -> int:  # how many of steps 0..steps-1 are this worker's
            return max(0, (steps - logical + W - 1) // W)
        skip = turns(self.start_step) * self.batch_size
        wanted = (turns(self.steps) - turns(self.start_step)) * self.batch_size
        log = self._sample_log(logical)
        counter = [0]  # unreadable shards, counted by the webdataset handler
        reported, pass_ = 0, 0
        while wanted > 0:
            rng = random.Random(_seed(self.seed, self.epoch, pass_, g, G, 'buffer'))
            good_in_pass = 0
            for sample in self._shuffled(self._raw(g, G, pass_, counter), rng):
                if skip:
                    # delivered before the checkpoint: passed over without decoding
                    if self._probably_good(sample):
                        skip -= 1
                    if not skip:
                        reported = counter[0]  # those skips are in the checkpoint's count already
                    continue
                try:
                    key, item = self._decode(sample)
                except DataError as error:
                    counter[0] += 1
                    logger.warning('skipped: %s', error)
                    continue
                good_in_pass += 1
                if log is not None:
                    log.write(f'{self.epoch}\t{key}\n')
                    log.flush()
                yield item, counter[0] - reported
                reported = counter[0]
                wanted -= 1
                if wanted == 0:
                    break
            if wanted and not good_in_pass and not skip:
                raise DataError(f'train_shards: no readable sample for stream {g} of {G} '
                                f'({len(self.urls)} shards)')
            pass_ += 1
        if log is not None:
            log.close()

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


# ---- converter: JSON annotations + images -> shards --------------------------------------------
def convert(config: dict, out: str, shard_size: int = 10_000, progress: bool = True) -> dict:
    """Write the pre-training items of `config` (train_file) into `out`/%06d.tar. Returns the
    summary {'samples', 'shards', 'missing', 'unreadable', 'pattern'}."""
    from .caption_dataset import pretrain_dataset
    if 'train_file' not in config:
        raise DataError("config has no 'train_file' (the JSON annotations to convert)")
    dataset = pretrain_dataset(config['train_file'], None, check_images=False)
    os.makedirs(out, exist_ok=True)
    summary = {'samples': 0, 'missing': 0, 'unreadable': 0}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(dataset), desc='writing shards', unit='sample', dynamic_ncols=True)
    with wds.ShardWriter(os.path.join(out, '%06d.tar'), maxcount=shard_size, verbose=0) as sink:
        for index in range(len(dataset)):
            item = dataset.ann[index]
            path = item['image']
            try:
                with open(path, 'rb') as f:
                    data = f.read()
                with Image.open(io.BytesIO(data)) as img:
                    fmt = (img.format or '').lower()
                    img.verify()
            except FileNotFoundError:
                summary['missing'] += 1
                logger.warning('image not found: %s (%s)', path, dataset.where(index))
                data = None
            except Exception as error:
                summary['unreadable'] += 1
                logger.warning('cannot read image %s (%s): %s', path, dataset.where(index), _one_line(error))
                data = None
            if data is not None:
                ext = {'jpeg': 'jpg', 'png': 'png', 'webp': 'webp'}.get(fmt)
                if ext is None:  # another format: stored as a JPEG
                    buffer = io.BytesIO()
                    with Image.open(io.BytesIO(data)) as img:
                        img.convert('RGB').save(buffer, format='JPEG', quality=95)
                    data, ext = buffer.getvalue(), 'jpg'
                captions = item['caption'] if isinstance(item['caption'], list) else [item['caption']]
                sink.write({'__key__': f'{index:09d}', ext: data, 'txt': captions[0],
                            'json': {'captions': captions, 'image': path}})
                summary['samples'] += 1
            if bar is not None:
                bar.update(1)
        shards = sink.shard
    if bar is not None:
        bar.close()
    summary['shards'] = shards
    summary['pattern'] = os.path.join(out, f'{{000000..{max(shards - 1, 0):06d}}}.tar')
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dataset.shards', description=(
        "Convert a pre-training config's JSON annotations (train_file) and images into tar shards."))
    parser.add_argument('config', help='pre-training YAML (its train_file is converted)')
    parser.add_argument('--out', required=True, help='folder for the shards (000000.tar, 000001.tar, ...)')
    parser.add_argument('--shard-size', type=int, default=10_000, help='samples per shard (default 10000)')
    args = parser.parse_args(argv)
    from .check import load_config
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    if args.shard_size < 1:
        print('error: --shard-size must be at least 1', file=sys.stderr)
        return 2
    try:
        summary = convert(load_config(args.config), args.out, args.shard_size)
    except DataError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f"{summary['samples']} samples written to {summary['shards']} shards in {args.out}; "
          f"images missing: {summary['missing']}, unreadable: {summary['unreadable']}")
    print(f"train_shards: '{summary['pattern']}'")
    return 0


if __name__ == '__main__':
    sys.exit(main())
