"""Samplers and loaders of the training and evaluation data (docs/DESIGN.md, "Data").

- Training (`train_loader`): shuffled, resumable batches. With a JSON dataset each sample's random
  augmentation is a function of (seed, epoch, index) alone (`SeededSamples`, `ResumableSampler`),
  so an interrupted run continues with exactly the batches it would have seen; with the config key
  `train_shards` the batches stream from tar shards (`dataset.shards.ShardStream`). Iterating yields
  the batches; the loader's `skipped` counts the bad images skipped this epoch on this process.
- Evaluation (`eval_loader`): file order; across processes each takes every world-th item, with
  no padding, so nothing is counted twice.
- `create_sampler` / `create_loader`: the original's helpers, on the same loader construction.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import weakref
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import utils

from .base import DataError, max_image_pixels
from .utils import Seeded

def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_033 + index


def collate_seed(first_sample_seed: int) -> int:
    """The seed of a batch's collate (its random draws, e.g. the MLM masks), from its first sample's
    seed: a function of (seed, epoch, that sample) alone, and apart from the sample's own stream."""
    return (first_sample_seed * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) % 2 ** 63


class SeededSamples(Dataset):
    """Makes the random augmentation of each sample a function of (seed, epoch, index) alone.

    Indices arrive as (epoch, index) pairs from ResumableSampler; the global random generators
    (python, numpy, torch) are seeded for the sample and restored afterwards. Sample k of an epoch
    is therefore the same tensor whether the run was interrupted or not, whatever the number of
    workers. Each item comes as (item, bad images skipped to produce it (`skip_bad_images`), its
    seed): `SeededCollate` sums the counts, so they reach the main process, and seeds the collate
    from the first seed.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's attributes (text, img2txt, ...)
        if name in ('dataset', 'seed'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        skipped = getattr(self.dataset, 'num_skipped', 0)
        with Seeded(seed):
            item = self.dataset[index]
        return item, getattr(self.dataset, 'num_skipped', 0) - skipped, seed


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that yields (epoch, index) and can start
    mid-epoch: `set_epoch(epoch, start)` skips the first `start` samples of this rank."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in indices])


class SeededCollate:
    """Collate SeededSamples' (item, skipped, seed) triples into (batch, total skipped): the batch
    is made by `collate_fn` with the global generators seeded from the first sample's seed
    (`collate_seed`), so its random draws are the same on a resumed run."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, triples):
        items, skipped, seeds = zip(*triples)
        with Seeded(collate_seed(seeds[0])):
            batch = self.collate_fn(list(items))
        return batch, sum(skipped)


def local_processes() -> int:
    """The processes started on this node (torchrun's LOCAL_WORLD_SIZE, SLURM's SLURM_NTASKS_PER_NODE)."""
    value = os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0]
    return max(int(value or 1), 1)


def default_num_workers() -> int:
    """The CPUs this process may use, shared with the other processes of its node, at least 1
    (not capped: one GPU's step can use 12 to 28 cores' worth of JPEG decoding; see the README)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // local_processes())


def num_workers_of(config: dict) -> int:
    """The config's `num_workers`, else `default_num_workers()`."""
    value = config.get('num_workers')
    if value is None:
        return default_num_workers()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f'num_workers: expected a whole number >= 0, got {value!r}')
    return value


def _worker_init(worker_id):
    # the main process decides when to stop (SIGINT from Ctrl-C and SLURM's SIGTERM reach the workers too)
    # and ends its workers itself (shutdown_workers); if it dies, they notice within seconds (DataLoader's watchdog)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # one OpenCV thread per worker (RandomAugment): the workers already fill the cores, and
    # OpenCV's own thread pool per worker would oversubscribe them
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass


class _Loader(DataLoader):
    """A DataLoader whose worker processes `shutdown_workers` can end (DataLoader has no public way:
    its workers end only when its iterator is garbage-collected, which an exception's traceback
    or a persistent-workers loader can put off past the interpreter's exit, where the workers,
    ignoring SIGTERM, would be waited for forever)."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _ITERATORS.add(iterator)
        return iterator


_ITERATORS = weakref.WeakSet()  # the multi-process iterators of this process's loaders


def shutdown_workers():
    """End the worker processes of every loader of this process, now: each is asked to stop (as
    the DataLoader does when its iterator goes away) and killed if it has not within a few seconds.
    engine.launch calls it whatever ends a run; it also runs at interpreter exit."""
    for iterator in list(_ITERATORS):
        workers = list(getattr(iterator, '_workers', ()))
        try:
            iterator._shutdown_workers()  # the DataLoader's own protocol: a stop message, join, SIGTERM
        except Exception:  # a queue already broken: the kill below ends them
            pass
        for worker in workers:
            if worker.is_alive():  # busy or stuck, and ignoring SIGTERM (_worker_init)
                worker.kill()
                worker.join(5)
    _ITERATORS.clear()


# registered after torch's and multiprocessing's own exit handlers, so it runs before them
# (atexit runs last-in first-out): before torch's stops shutting workers down and before
# multiprocessing's waits for every child
atexit.register(shutdown_workers)


class _CountingLoader(_Loader):
    """A training DataLoader whose collate returns (batch, bad images skipped) (`SeededCollate`):
    iterating yields the batches, and `skipped` counts the skips of the epoch so far on this
    process (None unless `count_skipped`: data that skip nothing report no count)."""

    def __init__(self, *args, count_skipped: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.count_skipped = count_skipped
        self.skipped = 0 if count_skipped else None

    def __iter__(self):
        if self.count_skipped:
            self.skipped = 0
        for batch, skipped in super().__iter__():
            if self.count_skipped:
                self.skipped += skipped
            yield batch


def make_loader(dataset, batch_size: int, *, train: bool, sampler=None, num_workers: int = 0,
                collate_fn: Callable | None = None, pin_memory: bool = False, seed: int | None = None,
                count_skipped: bool | None = None) -> DataLoader:
    """The one DataLoader construction: training loaders drop the last partial batch, shuffle when
    they have no sampler and keep their workers between epochs; evaluation loaders do none of it.
    Workers ignore SIGINT/SIGTERM (the main process stops training between steps). With
    `count_skipped` (True or False) the collate returns (batch, skipped) and the loader is a
    `_CountingLoader`."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    options = dict(batch_size=batch_size, sampler=sampler, shuffle=train and sampler is None, num_workers=num_workers,
                   collate_fn=collate_fn, drop_last=train, pin_memory=pin_memory,
                   persistent_workers=train and num_workers > 0, generator=generator, worker_init_fn=_worker_init)
    if count_skipped is None:
        return _Loader(dataset, **options)
    return _CountingLoader(dataset, count_skipped=count_skipped, **options)


class StreamCollate:
    """Collate a shard stream's (item, info) pairs into (batch, (skipped, ids, short shards, ids
    delivered before a resume)); see dataset.shards.ShardStream. The batch is made by `collate_fn`
    with the global generators seeded from (the stream's seed, its epoch, the batch's first sample),
    so its random draws are the same on a resumed run."""

    def __init__(self, stream, collate_fn=None):
        self.stream = stream
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, pairs):
        items, infos = zip(*pairs)
        ids = [i[1] for i in infos]
        with Seeded(collate_seed(sample_seed(self.stream.seed, self.stream.epoch, int(ids[0])))):
            batch = self.collate_fn(list(items))
        return batch, (sum(i[0] for i in infos), ids, [e for i in infos for e in i[2]],
                       [k for i in infos for k in i[3]])


class StreamLoader:
    """Training batches from a `dataset.shards.ShardStream`: a DataLoader made afresh each epoch
    (its workers read the epoch and start position); the stream stands in for the sampler
    (`loader.sampler.set_epoch(epoch, start)`), as the training loop expects. Iterating yields
    the batches of `collate_fn` (see StreamCollate); `skipped` counts the bad samples skipped this
    epoch so far, and `epoch_counts` the samples trained, which of them are distinct and the shards
    found shorter than their count (each reported once per run)."""

    def __init__(self, stream, collate_fn=None, **loader_kwargs):
        self.stream = self.sampler = self.dataset = stream
        self.batch_size = stream.batch_size
        self.loader_kwargs = dict(loader_kwargs, collate_fn=StreamCollate(stream, collate_fn))
        self.reported = set()
        self._reset()

    def _reset(self):
        self.trained = self.skipped = 0
        self.marks = np.zeros(self.stream.available + len(self.stream.urls), dtype=np.uint8)  # samples, shards

    def __len__(self):
        return self.stream.steps

    def __iter__(self):
        self._reset()
        # its own generator: making the iterator must not draw from the global one (exact resume)
        loader = _Loader(self.stream, batch_size=self.batch_size, drop_last=True,
                         generator=torch.Generator().manual_seed(self.stream.seed), **self.loader_kwargs)
        for batch, (skipped, ids, short, earlier) in loader:
            self.skipped += skipped
            self.trained += len(ids) + len(earlier)
            self.marks[ids + earlier] = 1
            for shard, found, counted in short:
                self.marks[self.stream.available + shard] = 1
                if shard not in self.reported:
                    self.reported.add(shard)
                    utils.print0(f'warning: shard {self.stream.urls[shard]} has {found} samples, its count says '
                          f'{counted} (cut short after it was counted?); the epoch trains others in their place',
                          file=sys.stderr, flush=True)
            yield batch

    def epoch_counts(self):
        """The epoch's counts over all processes (a collective: every rank calls it): samples
        trained, distinct samples among them, samples left out (the remainder, trained first
        next epoch) and shards cut short."""
        counts = torch.tensor([self.trained], dtype=torch.int64)
        marks = torch.from_numpy(self.marks)
        if dist.is_available() and dist.is_initialized():
            device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
            counts, marks = counts.to(device), marks.to(device)
            dist.all_reduce(counts)
            dist.all_reduce(marks, op=dist.ReduceOp.MAX)
        available = self.stream.available
        return {'samples': int(counts[0]), 'distinct_samples': int(marks[:available].sum()),
                'left_out_samples': available - self.stream.steps * self.batch_size * self.stream.world_size,
                'shards_cut_short': int(marks[available:].sum())}


def shard_loader(dataset, batch_size, config, rank=0, world_size=1, seed=0, pin_memory=False, collate_fn=None):
    """The `train_shards` loader (with a JSON `dataset`, its items join the shards' samples)."""
    from . import build_transform
    from .shards import DEFAULT_SHUFFLE_BUFFER, ShardStream, check_first_samples, expand, shard_sizes
    urls = expand(config['train_shards'])
    sizes = None
    if rank == 0:
        check_first_samples(urls[0])
        sizes = shard_sizes(urls, progress=True)
    if world_size > 1:
        shared = [sizes]
        dist.broadcast_object_list(shared, src=0)
        sizes = shared[0]
    num_workers = num_workers_of(config)
    transform = build_transform('pretrain' if config.get('augment', True) else 'test', config['image_res'],
                                config.get('randaugment_autocontrast', 'original'), uint8=True,
                                jpeg_draft=bool(config.get('jpeg_draft', False)))
    stream = ShardStream(urls, transform, batch_size=batch_size, num_workers=num_workers, rank=rank,
                         world_size=world_size, seed=seed, sizes=sizes,
                         samples_per_epoch=config.get('samples_per_epoch'),
                         shuffle_buffer=config.get('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER), json_dataset=dataset,
                         max_image_pixels=max_image_pixels(config))
    used = stream.steps * batch_size * world_size
    rest = f', leaving {stream.available - used} for the next' if used < stream.available else ''
    utils.print0(f'{stream.samples_per_epoch} samples per epoch ({sum(sizes)} in {len(urls)} shards'
          f'{f", {len(dataset)} from train_file" if dataset is not None else ""}): {stream.steps} steps of '
          f'{batch_size} x {world_size} processes, {num_workers} loader workers each; each epoch trains '
          f'{used} of them once{rest}')
    return StreamLoader(stream, num_workers=num_workers, collate_fn=collate_fn,
                        pin_memory=pin_memory, worker_init_fn=_worker_init)


def check_batch_count(num_items, batch_size, world_size=1, files=None, config_path='the config'):
    """Too few items for one batch per process is an error; the items that drop_last leaves out of
    every epoch are reported once."""
    where = f" in {', '.join(map(str, files))}" if files else ''
    per_process = -(-num_items // world_size)  # DistributedSampler pads every rank to this
    if num_items < batch_size * world_size:
        raise DataError(f'{num_items} training items{where} are too few for one batch of {batch_size} in each of '
                        f'{world_size} process(es) (at least {batch_size * world_size} needed): lower '
                        f'batch_size in {config_path} or add items')
    steps = per_process // batch_size
    used = steps * batch_size * world_size
    if used < num_items:
        utils.print0(f'drop_last: {num_items - used} of {num_items} training items are left out of each epoch '
              f'({steps} batches of {batch_size} in each of {world_size} process(es))')


def check_vocabulary(dataset, tokenizer, text_encoder, limit=0.05):
    """Warn once when more than `limit` of the word pieces of the training texts are [UNK]."""
    from .check import unk_report
    message = unk_report(dataset, tokenizer, text_encoder, limit=limit)
    if message:
        utils.print0(f'warning: {message}', file=sys.stderr, flush=True)


def train_loader(dataset, batch_size, config, rank=0, world_size=1, seed=0, pin_memory=False, collate_fn=None,
                 tokenizer=None, check_batches=True, config_path='the config'):
    """Shuffled, resumable training batches; the loader's `skipped` counts the epoch's bad images
    skipped (with `skip_bad_images`; None without). With the
    config key `train_shards` the batches stream from tar shards (`shard_loader`). `check_batches`
    checks there is a batch for every process; `tokenizer` also reports a vocabulary that turns
    many of the texts' words into [UNK]."""
    if config.get('train_shards'):
        return shard_loader(dataset, batch_size, config, rank, world_size, seed, pin_memory, collate_fn)
    if check_batches:
        check_batch_count(len(dataset), batch_size, world_size, getattr(dataset, 'ann_files', None), config_path)
    if tokenizer is not None:
        check_vocabulary(dataset, tokenizer, config.get('text_encoder'))
    return make_loader(SeededSamples(dataset, seed), batch_size, train=True,
                       sampler=ResumableSampler(dataset, world_size, rank, seed=seed),
                       num_workers=num_workers_of(config), collate_fn=SeededCollate(collate_fn),
                       pin_memory=pin_memory, seed=seed, count_skipped=bool(config.get('skip_bad_images')))


def eval_loader(dataset, batch_size, config, rank=0, world_size=1, pin_memory=False, collate_fn=None,
                distributed=True):
    """Evaluation batches in file order; with `distributed` and several processes, each rank takes
    every world-th item (no padding, so nothing is counted twice)."""
    sampler = list(range(rank, len(dataset), world_size)) if distributed and world_size > 1 else None
    return make_loader(dataset, batch_size, train=False, sampler=sampler, num_workers=num_workers_of(config),
                       collate_fn=collate_fn, pin_memory=pin_memory)


def create_sampler(datasets: Sequence[Dataset], shuffles: Sequence[bool], num_tasks: int,
                   global_rank: int) -> list[DistributedSampler]:
    """The original's helper: one DistributedSampler per dataset."""
    return [DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=shuffle)
            for dataset, shuffle in zip(datasets, shuffles)]


def create_loader(datasets: Sequence[Dataset], samplers: Sequence[Sampler | None],
                  batch_size: int | Sequence[int], num_workers: int | Sequence[int],
                  is_trains: Sequence[bool], collate_fns: Sequence[Callable | None]) -> list[DataLoader]:
    """The original's helper: one `make_loader` per dataset (per-loader lists; an int applies to all)."""
    n = len(datasets)
    sizes = [batch_size] * n if isinstance(batch_size, int) else batch_size
    workers = [num_workers] * n if isinstance(num_workers, int) else num_workers
    return [make_loader(d, bs, train=train, sampler=s, num_workers=w, collate_fn=c, pin_memory=torch.cuda.is_available())
            for d, s, bs, w, train, c in zip(datasets, samplers, sizes, workers, is_trains, collate_fns)]
