"""Measuring what an optimizer step costs in memory, on any device (no CUDA allocator needed)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages allocated inside the mode and still alive; `peak` is the maximum.

    A storage first seen as an op's input existed before and is not counted; one first seen as an
    op's output is new, and is followed until Python's last reference to it goes. `allocations`
    counts the new storages.

        with torch.no_grad(), LiveBytes() as tracker:
            optimizer.step()
        tracker.peak  # the most bytes the step held at once beyond what existed before it
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocations = 0
        self._known: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._known.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._known or storage.nbytes() == 0:
                continue
            self._known.add(key)
            self.allocations += 1
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out
