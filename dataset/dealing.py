"""How one epoch of pre-training samples is dealt out to the streams (processes x loader workers).

Own code, because no library deals a sample stream by per-stream quotas: webdataset splits by whole
shards, which gives each stream a different number of samples (the source of the duplicates and
misses this module exists to prevent).

Samples, not shards, are dealt. Every sample has a fixed position in a canonical order (the
shards in an order drawn once from the run's seed, each shard's samples in file order, then the
JSON items). An epoch uses `sum(quotas)` of the T samples: the cyclic window of the canonical order
that starts where the previous epoch's window ended, so what one epoch cannot use (the remainder,
fewer than one global batch when all samples make the epoch) is the start of the next epoch's
window: every sample is trained within two epochs. The window's shards are then put in an order
drawn from (seed, epoch), their samples laid end to end, and the sequence is cut into one piece
per stream, piece g holding exactly `quotas[g]` samples (a shard may be split between two streams
by sample index). JSON items are dealt the same way, in a permutation drawn from (seed, epoch),
each stream taking shard samples and JSON items in the proportion of the whole window.

A stream's share is a list of (shard, first, end) sample ranges, read in that order, and an array
of JSON item indices. `ident(shard, index)` is a sample's canonical position: its identity in the
epoch's counts.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], 'little')


@dataclass
class Share:
    ranges: list        # [(shard index, first sample, end sample)], in reading order
    json: np.ndarray    # JSON item indices, in delivery order

    @property
    def shard_samples(self) -> int:
        return sum(end - first for _, first, end in self.ranges)


def _cut(sequence: Sequence[tuple[int, int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Samples lo..hi-1 of the ranges laid end to end, as ranges."""
    out, position = [], 0
    for shard, first, end in sequence:
        a, b = max(lo, position), min(hi, position + end - first)
        if a < b:
            out.append((shard, first + a - position, first + b - position))
        position += end - first
        if position >= hi:
            break
    return out


class EpochPlan:
    """The deal of one epoch: `share(g)` is stream g's part, `refill(g)` what the stream reads
    after it (the whole window, starting at its own part) when bad or missing samples left it
    short of its quota."""

    def __init__(self, sizes: Sequence[int], num_json: int, quotas: Sequence[int], seed: int, epoch: int) -> None:
        self.sizes, self.num_json, self.quotas = list(sizes), num_json, list(quotas)
        self.shard_total = sum(self.sizes)
        self.total = self.shard_total + num_json
        self.used = sum(self.quotas)
        if self.used > self.total:
            raise ValueError(f'the streams want {self.used} samples of {self.total}')
        canonical = list(range(len(self.sizes)))
        random.Random(seed_of(seed, 'canonical')).shuffle(canonical)
        self.start = np.zeros(len(self.sizes), dtype=np.int64)  # canonical position of each shard's sample 0
        position = 0
        for shard in canonical:
            self.start[shard] = position
            position += self.sizes[shard]
        # the epoch's window of canonical positions: one or two intervals
        offset = epoch * self.used % max(self.total, 1)
        window = [(offset, min(offset + self.used, self.total))]
        if offset + self.used > self.total:
            window.append((0, offset + self.used - self.total))
        used_of: dict[int, list] = {}
        for shard in canonical:
            first = int(self.start[shard])
            for a, b in window:
                lo, hi = max(a, first), min(b, first + self.sizes[shard])
                if lo < hi:
                    used_of.setdefault(shard, []).append((lo - first, hi - first))
        order = list(used_of)
        random.Random(seed_of(seed, epoch, 'shards')).shuffle(order)
        self.sequence = [(shard, a, b) for shard in order for a, b in sorted(used_of[shard])]
        json_used = np.concatenate([np.arange(max(a, self.shard_total), b) - self.shard_total
                                    for a, b in window if b > self.shard_total] or [np.zeros(0, np.int64)])
        self.json = np.random.default_rng(seed_of(seed, epoch, 'json')).permutation(json_used)
        shard_used = self.used - len(self.json)
        bounds = np.concatenate([[0], np.cumsum(self.quotas)])
        self.shard_cut = [int(shard_used * int(q) // max(self.used, 1)) for q in bounds]
        self.json_cut = [int(q) - s for q, s in zip(bounds, self.shard_cut)]

    @property
    def left_out(self) -> int:
        return self.total - self.used

    def ident(self, shard: int, index: int) -> int:
        return int(self.start[shard]) + index

    def share(self, g: int) -> Share:
        return Share(_cut(self.sequence, self.shard_cut[g], self.shard_cut[g + 1]),
                     self.json[self.json_cut[g]:self.json_cut[g + 1]])

    def refill(self, g: int) -> Share:
        total = self.shard_cut[-1]
        return Share(_cut(self.sequence, self.shard_cut[g], total) + _cut(self.sequence, 0, self.shard_cut[g]),
                     np.roll(self.json, -self.json_cut[g]))


def quotas_of(steps: int, batch_size: int, world_size: int, num_workers: int) -> list[int]:
    """Samples each stream g = rank * num_workers + worker delivers in an epoch of `steps` steps:
    the DataLoader asks its workers for batches in turn, so worker w makes steps w, w + W, ..."""
    per_worker = [max(0, (steps - w + num_workers - 1) // num_workers) * batch_size for w in range(num_workers)]
    return per_worker * world_size
