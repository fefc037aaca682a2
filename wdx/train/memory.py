"""Counting memory without a GPU: live tensor bytes, simulated or measured.

- `LiveBytes` follows every tensor storage created while it is active (and any added by
  hand, such as the parameters), freeing each one's bytes when the storage is collected.
  Under `FakeTensorMode` nothing is allocated, so it prices a whole training step of any
  model size in seconds: that is how `--plan` works (wdx.train.plan).
- `measured_peak` is the independent check: torch.profiler's memory events come from the
  CPU allocator itself (every allocation and free, kernel workspaces included), so their
  running sum is the allocated-bytes curve that `torch.cuda.max_memory_allocated` reports
  on a GPU. The tests compare the two on real steps of small models.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages (`now`) and their maximum (`peak`) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.now = self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen[storage] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.now -= size

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.add, out)
        return out


def measured_peak(step: Callable[[], None]) -> int:
    """Peak bytes the CPU allocator handed out during `step()`, above what was live before it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors`."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr() if not t.is_meta else id(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())
