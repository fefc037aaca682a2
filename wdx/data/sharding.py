"""Which samples each (rank, loader worker) reads in an epoch.

An epoch's shards are put in a seeded order and laid end to end; the samples of that
sequence are cut into one contiguous range per *slot* (rank x worker). A slot opens only
the shards its range touches, so no sample is decoded twice and a shard is read by at most
two slots. Training ranges all have the same length (the remainder, < slots samples, is
left out that epoch and rotates with the shuffle), so every rank yields the same number of
batches: a rank that runs dry first would hang DDP. Evaluation ranges cover every sample
once, lengths differing by at most one.

This module and the loader are the only places that know the rank; they are given it by
the caller instead of asking torch.distributed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard number `shard` (an index into Split.urls)."""

    shard: int
    start: int
    stop: int


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order shards are laid out in for `epoch`: seeded, the same on every rank."""
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def slot_bounds(total: int, n_slots: int, slot: int, equal: bool) -> tuple[int, int]:
    """[begin, end) of `slot`'s range in the epoch's sample sequence."""
    if equal:
        length = total // n_slots
        return slot * length, (slot + 1) * length
    return slot * total // n_slots, (slot + 1) * total // n_slots


def slot_segments(counts: list[int] | tuple[int, ...], order: list[int], begin: int, end: int) -> list[Segment]:
    """Cut the shards, laid out in `order`, down to the samples in [begin, end)."""
    segments, offset = [], 0
    for shard in order:
        lo, hi = max(begin, offset), min(end, offset + counts[shard])
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset))
        offset += counts[shard]
    return segments


def batch_sizes(n_samples: int, batch_size: int) -> list[int]:
    """Batch sizes that cover `n_samples` exactly: full batches, then one partial one."""
    full, rest = divmod(n_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])
