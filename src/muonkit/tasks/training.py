"""One training run (task, optimizer, lr, seed): the step loop, timing, evaluation, progress bar."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import muonkit
from muonkit.diagnostics import TensorBoardWriter, stats_scalars
from muonkit.tasks.base import Task, TaskError
from muonkit.tasks.charlm import attach_qk_clip, per_head_routing
from muonkit.tasks.optimizers import SGDW, build_optimizers, state_bytes


@dataclass
class RunResult:
    """Everything one run measured. Lists with one entry per step are `loss`, `data_s`, `fwd_bwd_s`,
    `opt_s` and, with QK-Clip, `max_logit` (the largest attention logit of the step's forward pass,
    over layers and heads, before the clip); `evals` holds (step, train seconds so far, metric) after
    every `eval_every` steps. `update_rms[name]` holds each parameter's update RMS (before lr, without
    weight decay) at the steps `update_rms_steps`. `diagnosed_steps`: the steps whose optimizer step
    also computed a muonkit optimizer's statistics (with a TensorBoard directory); the summary's
    optimizer time leaves them out."""

    task: str
    optimizer: str
    lr: float
    seed: int
    steps: int
    notes: list[str]
    loss: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    fwd_bwd_s: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    diverged: bool = False
    stopped_at_target: bool = False
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    """What `peak_memory_mb` measured: PEAK_CUDA, PEAK_CPU_RSS, or None when nothing could be measured."""
    optimizer_state_mb: float = 0.0
    qk_clip: float | None = None
    max_logit: list[float] = field(default_factory=list)
    update_rms_steps: list[int] = field(default_factory=list)
    update_rms: dict[str, list[float]] = field(default_factory=dict)
    diagnosed_steps: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PEAK_CUDA = "cuda max allocated"
PEAK_CPU_RSS = "cpu peak rss above start"
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_heap() -> None:
    """Free unreachable objects and hand glibc's free heap pages back to the kernel, so that memory a
    previous run freed but malloc kept does not hide this run's allocations from the RSS."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def start_peak_rss() -> int | None:
    """Reset the process's peak resident set size (VmHWM) to its current RSS and return that RSS in
    bytes; None where Linux's /proc/self/clear_refs cannot do it (another OS, no permission, a
    kernel older than 4.0). Pair with `peak_rss_since`."""
    _release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS only (Documentation/filesystems/proc.rst)
    except OSError:
        return None
    rss, peak = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    # A kernel that accepted the write but did not reset leaves the old, higher peak in place.
    if rss is None or peak is None or peak > rss + 4 * 2**20:
        return None
    return rss


def peak_rss_since(start: int | None) -> int | None:
    """Bytes by which the process's peak RSS since `start_peak_rss()` exceeded the RSS it returned."""
    if start is None:
        return None
    peak = _status_bytes("VmHWM")
    return None if peak is None else max(0, peak - start)


def _writer(directory: Path) -> TensorBoardWriter:
    """A TensorBoardWriter for `directory`, its earlier event files removed (a rerun replaces them)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("events.out.tfevents.*"):
            old.unlink()
    except OSError as e:
        raise TaskError(f"cannot use TensorBoard directory {directory}: {e.strerror or e}; pass --tensorboard with a "
                        "writable directory") from None
    return TensorBoardWriter(directory)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


UPDATE_RMS_POINTS = 100
"""How many times a run measures its update RMS (the bench plot's panel): every steps // 100 steps."""


class _Watch:
    """What a run records beside its loss, all outside the timed step: each parameter's update RMS
    every `every` steps, from its weights before and after the step,

        u = (W_before (1 - lr wd) - W_after) / lr,

    exact for every optimizer the bench runs (decoupled decay, then W -= lr u); and, with a
    TensorBoard writer, the scalars of every step, plus on those same steps the statistics of
    muonkit optimizers (`Muon.last_stats`: grad, momentum and update RMS, orthogonality error),
    whose diagnostics are switched on for those steps only. Assumes every trainable parameter
    steps (each bench model uses all of its parameters in every forward pass)."""

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], result: RunResult,
                 every: int, writer: TensorBoardWriter | None) -> None:
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.optimizers = optimizers
        self.result = result
        self.every = every
        self.writer = writer
        self._before: dict[str, torch.Tensor] = {}
        self._rates: dict[int, tuple[float, float]] = {}
        self.diagnosed = [opt for opt in optimizers if isinstance(opt, muonkit.Muon) and opt.defaults["diagnostics"]]
        _diagnose(self.diagnosed, False)

    def records(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == self.result.steps

    def before_step(self, step: int) -> None:
        if not self.records(step):
            return
        self._rates = _lr_and_decay(self.optimizers)
        self._before = {name: p.detach().clone() for name, p in self.params}
        _diagnose(self.diagnosed, True)

    def after_step(self, step: int, loss: float, max_logit: float | None) -> None:
        scalars: dict[str, float] = {}
        if self.writer is not None:
            scalars = {"loss/train": loss, **_lr_scalars(self.optimizers)}
            if max_logit is not None:
                scalars["attention/max_logit"] = max_logit
        if self._before:
            self.result.update_rms_steps.append(step + 1)
            with torch.no_grad():
                for name, p in self.params:
                    lr, decay = self._rates[id(p)]
                    before = self._before[name].double()
                    rms = float((before * (1 - lr * decay) - p.double()).div(lr).square().mean().sqrt()) if lr else math.nan
                    self.result.update_rms.setdefault(name, []).append(rms)
                    scalars[f"update_rms/{name}"] = rms
            self._before = {}
            if self.diagnosed:
                _diagnose(self.diagnosed, False)
                self.result.diagnosed_steps.append(step + 1)
                for opt in self.diagnosed:
                    scalars.update(stats_scalars(opt.last_stats))
        if self.writer is not None:
            self.writer.add_scalars(step + 1, scalars)

    def evaluated(self, step: int, metric_name: str, metric: float) -> None:
        if self.writer is not None:
            self.writer.add_scalars(step + 1, {f"metric/{metric_name}": metric})


def _diagnose(optimizers: list[muonkit.Muon], on: bool) -> None:
    """Switch the statistics of muonkit optimizers on or off for the next steps."""
    for opt in optimizers:
        opt.diagnostics = on


def _lr_and_decay(optimizers: list[torch.optim.Optimizer]) -> dict[int, tuple[float, float]]:
    """{id(parameter): (lr, decoupled weight decay)} of the coming step."""
    out = {}
    for opt in optimizers:
        for group in opt.param_groups:
            decay = group["decoupled_weight_decay"] if isinstance(opt, SGDW) else group["weight_decay"]
            for p in group["params"]:
                out[id(p)] = (float(group["lr"]), float(decay))
    return out


def _lr_scalars(optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """The learning rate of each group: "lr/muon" and "lr/adamw" for muonkit.Muon's kinds of group,
    "lr/<class>" for torch's optimizers; a group number is added where the groups of a kind (e.g.
    decayed and not decayed) have different lrs."""
    labels = []
    for opt in optimizers:
        for group in opt.param_groups:
            if isinstance(opt, muonkit.Muon):
                labels.append(("muon" if group["use_muon"] else "adamw", float(group["lr"])))
            else:
                labels.append((type(opt).__name__.lower(), float(group["lr"])))
    lrs = {label: {lr for other, lr in labels if other == label} for label, _ in labels}
    seen: dict[str, int] = {}
    out = {}
    for label, lr in labels:
        index = seen.get(label, 0)
        seen[label] = index + 1
        out[f"lr/{label}" if len(lrs[label]) == 1 else f"lr/{label}.{index}"] = lr
    return out


def run_directory(root: Path, task: str, optimizer: str, lr: float, seed: int) -> Path:
    """The TensorBoard directory of one run under `--tensorboard ROOT`."""
    return root / f"{task}-{optimizer}-lr{lr:g}-seed{seed}"


def train_run(task: Task, data: Any, optimizer: str, lr: float, seed: int, steps: int, device: torch.device,
              *, adamw_lr: float, progress: bool = True, stop_at_target: bool | None = None,
              eval_every: int | None = None, qk_clip: float | None = None,
              tensorboard: Path | None = None, per_head: bool = False) -> RunResult:
    """Train a fresh model for `steps` steps; a non-finite loss ends the run as diverged.

    `per_head`: attention's fused qkv weights are read per head (muonkit.tasks.charlm.per_head_routing).
    `qk_clip`: QK-Clip's tau (math.inf: record the max logits, never clip); the clip runs after
    each optimizer step and counts as optimizer time. `tensorboard`: a directory under which this
    run writes its scalars (loss, lr, metric, update RMS, max logit) to `run_directory(...)`, its
    earlier event files removed first.

    Peak memory: on CUDA, max_memory_allocated (everything on the device, data included); on CPU,
    how far the process's resident memory rose above its level just before the model was built
    (parameters, gradients, optimizer state, activations, temporaries, batches)."""
    rss_start = start_peak_rss() if device.type == "cpu" else None
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = task.model(data).to(device)
    routing = {**task.routing, **per_head_routing(model)} if per_head else task.routing
    optimizers, notes = build_optimizers(optimizer, model, lr, adamw_lr=adamw_lr, weight_decay=task.weight_decay,
                                         routing=routing, statistics=tensorboard is not None)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: task.lr_multiplier(s, steps)) for opt in optimizers]
    clip = None if qk_clip is None else attach_qk_clip(model, qk_clip)
    stop = task.stop_at_target if stop_at_target is None else stop_at_target
    result = RunResult(task.name, optimizer, lr, seed, steps, notes, qk_clip=qk_clip)
    writer = None if tensorboard is None else _writer(run_directory(tensorboard, task.name, optimizer, lr, seed))
    watch = _Watch(model, optimizers, result, max(1, steps // UPDATE_RMS_POINTS), writer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds = 0.0
    shown: dict[str, str] = {}
    bar = tqdm(total=steps, desc=f"{task.name} {optimizer} lr={lr:g} seed={seed}", file=sys.stderr,
               disable=not progress, leave=False, dynamic_ncols=True)
    with bar, (contextlib.closing(writer) if writer is not None else contextlib.nullcontext()):
        for step in range(steps):
            model.train()
            watch.before_step(step)
            t0 = time.perf_counter()
            inputs, targets = task.batch(data, step, generator)
            _sync(device)
            t1 = time.perf_counter()
            loss = task.loss(model, inputs, targets)
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            for opt in optimizers:
                opt.step()
            maxima = None if clip is None else clip.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for schedule in schedules:
                schedule.step()
            _sync(device)
            t3 = time.perf_counter()
            value = float(loss.detach())
            result.loss.append(value)
            result.data_s.append(t1 - t0)
            result.fwd_bwd_s.append(t2 - t1)
            result.opt_s.append(t3 - t2)
            if maxima is not None:
                result.max_logit.append(max(float(m.max()) for m in maxima if m is not None))
            watch.after_step(step, value, result.max_logit[-1] if maxima is not None else None)
            train_seconds += t3 - t0
            bar.update(1)
            if not math.isfinite(value):
                result.diverged = True
                result.evals.append((step + 1, train_seconds, math.nan))
                break
            if (step + 1) % (eval_every or task.eval_every) == 0 or step + 1 == steps:
                model.eval()
                with torch.inference_mode():
                    metric = task.evaluate(model, data)
                result.evals.append((step + 1, train_seconds, metric))
                watch.evaluated(step, task.metric, metric)
                shown[task.metric] = f"{metric:.4f}"
                if stop and task.reached(metric):
                    result.stopped_at_target = True
                    break
            if step % 10 == 0 or step + 1 == steps:
                shown["loss"] = f"{value:.4f}"
                bar.set_postfix(shown)
    result.optimizer_state_mb = state_bytes(optimizers) / 2**20
    if device.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        result.peak_memory_kind = PEAK_CUDA
    elif (peak := peak_rss_since(rss_start)) is not None:
        result.peak_memory_mb = peak / 2**20
        result.peak_memory_kind = PEAK_CPU_RSS
    return result
