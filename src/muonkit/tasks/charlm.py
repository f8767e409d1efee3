"""A small GPT on the characters of a text corpus; validation loss in nats per character.

The default corpus is the Python standard library's own top-level source files (every Python
installation ships them), so the task runs offline; `--text FILE` trains on any UTF-8 file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import muonkit
from muonkit.qkclip import QKClip, attention_max_logits
from muonkit.tasks.base import DataOptions, Task, TaskError
from muonkit.tasks.data import read_text, stdlib_corpus

MAX_CHARS = 1_500_000
VAL_FRACTION = 0.1
VAL_WINDOWS = 256


@dataclass
class TextData:
    train: torch.Tensor  # int64 character ids on device
    val: torch.Tensor
    vocab: list[str]
    context: int


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP, each added to the residual.

    `qkv` is fused: query rows, then key rows, then value rows, head h owning rows h*d .. (h+1)*d - 1
    of each block. When `max_logit_observer` is set, every training forward pass calls it with the
    per-head max attention logits (shape (heads,)), as QK-Clip needs.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp_norm = nn.RMSNorm(width)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.fc_proj = nn.Linear(4 * width, width, bias=False)
        self.max_logit_observer: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (3, b, heads, t, head_dim): the views SDPA takes
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.max_logit_observer is not None and self.training:
            self.max_logit_observer(attention_max_logits(q, k, is_causal=True))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.mlp_norm(x))))


def per_head_routing(model: nn.Module) -> dict[str, Any]:
    """muonkit.route keywords that read each Block's fused qkv weight (3 * heads * head_dim, width) per
    head: 3 * heads matrices of head_dim x width (q heads, then k, then v: the order `Block.forward`
    splits them in), each orthogonalized and scaled on its own."""
    layouts = {id(b.qkv.weight): muonkit.Layout.per_block(3 * b.heads) for b in model.modules() if isinstance(b, Block)}
    if not layouts:
        raise TaskError(f"--per-head needs attention blocks; {type(model).__name__} has none")
    return {"predicate": lambda name, p, module: layouts.get(id(p))}


def attach_qk_clip(model: nn.Module, tau: float) -> QKClip:
    """A QKClip (fused qkv) over every Block of `model`, fed by the blocks' training forward passes;
    call its `step()` after each optimizer step. Raises TaskError if the model has no Block."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise TaskError(f"--qk-clip needs attention blocks; {type(model).__name__} has none")
    clip = QKClip([block.qkv.weight for block in blocks], heads=blocks[0].heads, tau=tau, fused=True, model=model)
    for i, block in enumerate(blocks):
        block.max_logit_observer = functools.partial(clip.observe, i)
    return clip


class GPT(nn.Module):
    """Token and position embeddings, `depth` blocks, a final norm and an untied linear head."""

    def __init__(self, vocab: int, context: int, width: int = 128, depth: int = 4, heads: int = 4):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                # GPT-2's init; the residual output projections shrink with depth.
                std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.token(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class CharLM(Task):
    name = "charlm"
    summary = "a 4-layer width-128 GPT (context 64) on characters (default corpus: the Python stdlib's source); val loss in nats/char"
    metric = "val_loss"
    higher_is_better = False
    target = 2.0
    default_steps = 300
    sweep_steps = 200
    eval_every = 50
    weight_decay = 0.1
    batch_size = 16
    context = 64
    width = 128
    depth = 4
    default_optimizers = ("muon", "adamw")
    supports_qk_clip = True
    lrs = {"muon": 1e-2, "normuon": 1e-2, "adamuon": 1e-2, "muon-kj": 3e-2, "adamw": 1e-3, "sgd": 0.3, "torch-muon": 3e-2}
    sweep_grid = {"muon": (3e-3, 1e-2, 3e-2), "normuon": (3e-3, 1e-2, 3e-2), "adamuon": (3e-3, 1e-2, 3e-2), "muon-kj": (1e-2, 3e-2, 1e-1), "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
                  "sgd": (1e-2, 3e-2, 1e-1, 0.3), "torch-muon": (1e-2, 3e-2, 1e-1)}

    def load(self, options: DataOptions, device: torch.device) -> TextData:
        if options.text is None:
            text, source = stdlib_corpus(MAX_CHARS), "the standard library"
        else:
            text, source = read_text(options.text, MAX_CHARS), str(options.text)
        needed = int(2 * (self.context + 1) / VAL_FRACTION)
        if len(text) < needed:
            raise TaskError(f"text from {source} has {len(text)} characters; charlm needs at least {needed} "
                            f"(two {self.context + 1}-character windows in the 10% validation split); "
                            "pass --text with a longer file")
        vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
        split = int(len(ids) * (1 - VAL_FRACTION))
        return TextData(ids[:split].to(device), ids[split:].to(device), vocab, self.context)

    def model(self, data: TextData) -> nn.Module:
        return GPT(len(data.vocab), data.context, width=self.width, depth=self.depth)

    def steps_per_epoch(self, data: TextData) -> int:
        return max(1, len(data.train) // (self.batch_size * data.context))

    def batch(self, data: TextData, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data.train) - data.context - 1, (self.batch_size,), generator=generator)
        windows = torch.stack([data.train[s:s + data.context + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def evaluate(self, model: nn.Module, data: TextData) -> float:
        """Mean cross-entropy over up to VAL_WINDOWS evenly spaced windows of the validation split."""
        span = data.context + 1
        count = min(VAL_WINDOWS, len(data.val) // span)
        stride = (len(data.val) - span) // max(1, count - 1) if count > 1 else 0
        windows = torch.stack([data.val[i * stride:i * stride + span] for i in range(count)])
        return float(self.loss(model, windows[:, :-1], windows[:, 1:]))
