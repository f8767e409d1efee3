"""What every benchmark task provides to the training loop, and the error for bad input."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class TaskError(ValueError):
    """Bad user input (missing data, bad file, bad option): one line naming the problem and the fix."""


@dataclass(frozen=True)
class DataOptions:
    """Where a task finds its data; None means the task's default."""

    data_dir: Path | None = None
    text: Path | None = None
    hf_config: str | None = None
    """hf-lm: a built-in preset name or the path of a transformers config.json."""


class Task:
    """A model, its data and its metric.

    Subclasses set the class attributes and implement `load`, `model`, `batch`, `loss` and
    `evaluate`. The training loop (muonkit.tasks.training) calls them in that order; nothing in a
    task knows which optimizer runs it.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    metric: ClassVar[str]
    """Name of the validation metric, e.g. "val_loss" or "val_acc"."""
    higher_is_better: ClassVar[bool]
    target: ClassVar[float]
    """The metric value that counts as "reached" for steps- and seconds-to-target."""
    default_steps: ClassVar[int]
    sweep_steps: ClassVar[int]
    """The shorter budget an lr sweep runs at."""
    eval_every: ClassVar[int]
    weight_decay: ClassVar[float]
    default_optimizers: ClassVar[tuple[str, ...]]
    lrs: ClassVar[dict[str, float]]
    """Default lr per optimizer, chosen by `muonkit bench TASK --lr-sweep` (see benchmarks/RESULTS.md)."""
    sweep_grid: ClassVar[dict[str, tuple[float, ...]]]
    routing: ClassVar[dict[str, Any]] = {}
    """Keyword arguments for muonkit.param_groups / muonkit.route (e.g. explicit muon=(...) names)."""
    supports_qk_clip: ClassVar[bool] = False
    """The model has attention blocks (muonkit.tasks.charlm.Block), so `--qk-clip` and `--per-head` apply."""
    stop_at_target: ClassVar[bool] = False
    """Stop a run once the target is reached (for tasks whose result is the step count)."""
    evaluation: ClassVar[str] = ""
    """How `evaluate` differs from a plain forward pass in eval mode, if it does (shown with the results)."""
    sweep_by_steps: ClassVar[bool] = False
    """Score an lr sweep by the steps to reach the target instead of the final metric (always so when
    `stop_at_target`): for tasks where every workable lr ends at the same floor."""

    def load(self, options: DataOptions, device: torch.device) -> Any:
        """Read and check the data; raise TaskError naming the problem and the fix."""
        raise NotImplementedError

    def model(self, data: Any) -> nn.Module:
        """A freshly initialized model (the caller seeds torch first)."""
        raise NotImplementedError

    def explain_model(self, options: DataOptions) -> nn.Module:
        """The model `muonkit explain` shows; tasks whose model does not depend on data skip loading."""
        return self.model(self.load(options, torch.device("cpu")))

    def steps_per_epoch(self, data: Any) -> int:
        raise NotImplementedError

    def batch(self, data: Any, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets for `step`, drawn with `generator` (augmented, on device)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any) -> float:
        """The validation metric; the caller puts the model in eval mode and disables grad."""
        raise NotImplementedError

    def lr_multiplier(self, step: int, total: int) -> float:
        """Learning-rate schedule shared by every optimizer: 5% linear warmup, then linear decay to 0."""
        warmup = max(1, total // 20)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    def reached(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of `inputs` whose argmax prediction equals `labels`, in chunks of `batch_size`."""
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start:start + batch_size])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / len(inputs)


@contextmanager
def batchnorm_statistics_from(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> Iterator[None]:
    """Inside the block, every BatchNorm of `model` normalizes with the mean and variance of `images`
    as they reach it (the model's current weights), instead of its running averages; on exit the
    running averages are put back, so training goes on as if nothing happened.

    The running averages trail the weights by ~1/momentum steps (10 for torch's default 0.1): after
    a few dozen steps they still describe the initial network, and an eval-mode model scores near
    chance. Recomputing them with the final weights ("precise BN") is right after any number of
    steps. Only the BatchNorm layers run in train mode here (dropout stays off, no random numbers
    are drawn), and the averages are cumulative over the batches (momentum None).

    References:
        Wu and Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, section 3 (precise BN).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
        for m, (_, training, _) in zip(norms, saved):
            m.train(training)
        yield
    finally:
        for m, (momentum, training, buffers) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
            for name, value in buffers.items():
                getattr(m, name).copy_(value)
