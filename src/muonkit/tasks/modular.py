"""Grokking: a one-layer transformer learns (a + b) mod 97 from half of all pairs; the result is the
number of steps until validation accuracy (on the other half) reaches 99%."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muonkit.tasks.base import DataOptions, Task, accuracy
from muonkit.tasks.charlm import Block
from muonkit.tasks.data import Shuffler

MODULUS = 97
TRAIN_FRACTION = 0.5
# The split is part of the task, not of the run: every seed and optimizer sees the same pairs.
SPLIT_SEED = 1234


@dataclass
class PairData:
    train_inputs: torch.Tensor  # (N, 3): a, b, "=" token
    train_labels: torch.Tensor
    val_inputs: torch.Tensor
    val_labels: torch.Tensor
    shuffler: Shuffler


class PairTransformer(nn.Module):
    """Embeds the sequence (a, b, =) and reads the answer from the last position."""

    def __init__(self, modulus: int, width: int = 128, depth: int = 1, heads: int = 4):
        super().__init__()
        self.token = nn.Embedding(modulus + 1, width)
        self.position = nn.Embedding(3, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, modulus, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.position(torch.arange(ids.size(1), device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -1]))


class Modular(Task):
    name = "modular"
    summary = f"(a + b) mod {MODULUS} from {TRAIN_FRACTION:.0%} of all pairs (grokking); steps to 99% val accuracy"
    metric = "val_acc"
    higher_is_better = True
    target = 0.99
    default_steps = 1500
    sweep_steps = 1000
    eval_every = 25
    weight_decay = 1.0
    batch_size = 512
    stop_at_target = True
    supports_qk_clip = True
    default_optimizers = ("muon", "adamw")
    lrs = {"muon": 3e-2, "normuon": 1e-2, "adamuon": 1e-2, "muon+cwd": 1e-2, "muon-kj": 1e-1, "adamw": 1e-2, "sgd": 1e-1, "torch-muon": 3e-2}
    sweep_grid = {"muon": (3e-3, 1e-2, 3e-2, 1e-1), "normuon": (3e-3, 1e-2, 3e-2, 1e-1), "adamuon": (3e-3, 1e-2, 3e-2, 1e-1), "muon-kj": (3e-2, 1e-1, 3e-1, 1.0),
                  "adamw": (1e-3, 3e-3, 1e-2, 3e-2), "sgd": (1e-2, 3e-2, 1e-1, 0.3), "torch-muon": (1e-2, 3e-2, 1e-1)}

    def load(self, options: DataOptions, device: torch.device) -> PairData:
        a, b = torch.meshgrid(torch.arange(MODULUS), torch.arange(MODULUS), indexing="ij")
        inputs = torch.stack([a.flatten(), b.flatten(), torch.full((MODULUS ** 2,), MODULUS)], dim=1)
        labels = (a.flatten() + b.flatten()) % MODULUS
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_train = int(TRAIN_FRACTION * len(inputs))
        train, val = order[:n_train], order[n_train:]
        return PairData(inputs[train].to(device), labels[train].to(device), inputs[val].to(device),
                        labels[val].to(device), Shuffler(n_train, self.batch_size))

    def model(self, data: PairData | None) -> nn.Module:
        return PairTransformer(MODULUS)

    def explain_model(self, options: DataOptions) -> nn.Module:
        return self.model(None)

    def steps_per_epoch(self, data: PairData) -> int:
        return data.shuffler.per_epoch

    def batch(self, data: PairData, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = data.shuffler.indices(step, generator).to(data.train_inputs.device)
        return data.train_inputs[idx], data.train_labels[idx]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)

    def evaluate(self, model: nn.Module, data: PairData) -> float:
        return accuracy(model, data.val_inputs, data.val_labels, batch_size=len(data.val_inputs))

    def lr_multiplier(self, step: int, total: int) -> float:
        """Constant after a 50-step warmup: the budget is a cap, not a schedule length."""
        return min(1.0, (step + 1) / 50)
