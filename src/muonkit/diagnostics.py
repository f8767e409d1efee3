"""Watching an optimizer: its per-parameter statistics as flat scalars for any logger, a TensorBoard
writer, and what a step costs in memory on any device (no CUDA allocator needed).

    opt = muonkit.Muon(groups, diagnostics=True, orthogonality_every=100)
    with TensorBoardWriter("runs/muon") as tb:
        for step in range(steps):
            ...; opt.step()
            tb.add_scalars(step, {"loss/train": loss.item()})
            tb.add_scalars(step, stats_scalars(opt.last_stats))   # or wandb.log(stats_scalars(...))
"""

from __future__ import annotations

import numbers
import os
import weakref
from collections.abc import Mapping
from typing import Any

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


def stats_scalars(stats: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-parameter statistics as flat scalars named "<statistic>/<parameter>".

    `stats` maps a parameter name to its statistics, as `Muon.last_stats` does ({"blocks.0.fc.weight":
    {"update_rms": 0.2, "orthogonality_error": 0.01, ...}, ...}). The flat form suits any logger
    (TensorBoard, W&B's `wandb.log`, MLflow's `log_metrics`); with the statistic first, TensorBoard
    groups every layer's value of one statistic in one section.

    Example:
        >>> stats_scalars({"fc.weight": {"grad_rms": 0.5, "update_rms": 0.2}})
        {'grad_rms/fc.weight': 0.5, 'update_rms/fc.weight': 0.2}
    """
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping of parameter name -> {{statistic: value}}, got {type(stats).__name__}")
    out: dict[str, float] = {}
    for name, values in stats.items():
        if not isinstance(name, str) or not isinstance(values, Mapping):
            raise TypeError(f"stats[{name!r}] must be a {{statistic: value}} mapping under a str name, "
                            f"got {type(values).__name__}")
        for stat, value in values.items():
            out[f"{stat}/{name}"] = _real(value, f"stats[{name!r}][{stat!r}]")
    return out


def _real(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(value).__name__}")
    return float(value)


TENSORBOARD_EXTRA = "pip install 'muonkit[tensorboard]' (or pip install tensorboard)"


def require_tensorboard() -> None:
    """Raise ImportError naming the `tensorboard` extra unless TensorBoard logging can work here."""
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it; ask for it by name)
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as e:
        raise ImportError(f"TensorBoard logging needs the tensorboard package, which is not installed ({e}); "
                          f"{TENSORBOARD_EXTRA}") from None


class TensorBoardWriter:
    """Scalars into TensorBoard event files under `log_dir`, through torch.utils.tensorboard.SummaryWriter.

    One directory per run: `tensorboard --logdir PARENT` then overlays the runs. Needs the
    `tensorboard` package (the `tensorboard` extra of muonkit); without it the constructor raises
    ImportError saying how to install it.

    Args:
        log_dir: the run's directory (created if needed).
        flush_secs: how often pending events are written to disk (default 30; `flush()` and
            `close()` write them at once).

    Example:
        >>> with TensorBoardWriter("runs/charlm-muon") as tb:
        ...     tb.add_scalars(step, {"loss/train": 2.31, **stats_scalars(opt.last_stats)})
    """

    def __init__(self, log_dir: str | os.PathLike, *, flush_secs: int = 30) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.fspath(log_dir)
        self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write each `tag: value` at `step` (an int >= 0). Non-finite values are written as they are."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        values = {str(tag): _real(value, f"scalars[{tag!r}]") for tag, value in scalars.items()}
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
