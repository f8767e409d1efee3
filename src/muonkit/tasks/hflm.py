"""A transformers causal LM built from a config, trained on characters like charlm.

`--hf-config` picks a tiny built-in preset (PRESETS: llama, qwen2, qwen3-moe, gpt2, phi3, small enough
for the CPU bench budget) or a config.json path. The vocabulary is the text's characters (the
config's vocab_size is replaced by their count) and the context is charlm's. transformers comes
from muonkit's `hf` extra; nothing else in muonkit imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muonkit.tasks.base import DataOptions, TaskError
from muonkit.tasks.charlm import CharLM, TextData

# Two blocks of width 64 each: about the cost of charlm's model per step on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3-moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=176, moe_intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4),
    # Fused qkv_proj and gate_up_proj (read per head and as gate and up apart, docs/API.md).
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                 tie_word_embeddings=False),
}
DEFAULT_PRESET = "llama"


@dataclass
class HFTextData(TextData):
    config: dict[str, Any] = field(default_factory=dict)
    """The transformers config (model_type and fields) the model is built from."""
    source: str = ""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TaskError("hf-lm needs transformers: pip install 'muonkit[hf]'") from None
    return transformers


def read_config(name_or_path: str | None) -> tuple[dict[str, Any], str]:
    """(config fields, where they came from) for a preset name or a config.json path."""
    name = name_or_path or DEFAULT_PRESET
    if name in PRESETS:
        return dict(PRESETS[name]), f"preset {name}"
    path = Path(name)
    if not path.is_file():
        raise TaskError(f"--hf-config {name!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TaskError(f"--hf-config {path}: cannot read it as JSON ({err})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise TaskError(f"--hf-config {path}: a transformers config.json needs a \"model_type\" string")
    return fields, str(path)


class HFLM(CharLM):
    name = "hf-lm"
    summary = ("a transformers causal LM built from --hf-config (presets: " + ", ".join(PRESETS)
               + "; default llama) on characters like charlm; val loss in nats/char")
    default_steps = 200
    sweep_steps = 150
    default_optimizers = ("muon", "adamw", "normuon")
    supports_qk_clip = False
    # Chosen by `muonkit bench hf-lm --hf-config llama --lr-sweep` (and checked on qwen3-moe), see
    # benchmarks/RESULTS.md "hf-lm"; optimizers not swept here keep charlm's lrs.
    lrs = {**CharLM.lrs, "muon": 3e-2, "normuon": 3e-2, "adamw": 3e-3}
    sweep_grid = {**CharLM.sweep_grid, "muon": (1e-2, 3e-2, 1e-1), "normuon": (1e-2, 3e-2, 1e-1),
                  "adamw": (1e-3, 3e-3, 1e-2)}

    def load(self, options: DataOptions, device: torch.device) -> HFTextData:
        transformers = _transformers()
        fields, source = read_config(options.hf_config)
        text = super().load(options, device)
        fields = {**fields, "vocab_size": len(text.vocab)}
        try:
            config = transformers.AutoConfig.for_model(**fields)
        except (ValueError, TypeError, KeyError) as err:
            raise TaskError(f"--hf-config {source}: transformers cannot build a config from it ({err})") from None
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(positions, int) and positions < text.context:
            raise TaskError(f"--hf-config {source}: {positions} positions, fewer than the context {text.context}")
        if type(config) not in transformers.AutoModelForCausalLM._model_mapping:
            raise TaskError(f"--hf-config {source}: model_type {config.model_type!r} has no causal LM in transformers")
        return HFTextData(text.train, text.val, text.vocab, text.context, config=config.to_dict(), source=source)

    def model(self, data: HFTextData) -> nn.Module:
        transformers = _transformers()
        config = transformers.AutoConfig.for_model(**data.config)
        return transformers.AutoModelForCausalLM.from_config(config)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
