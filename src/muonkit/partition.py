"""Which parameter goes to Muon and which to AdamW, why, and which parameters are not decayed.

Decisions follow each parameter's role in the model, not its name: Muon for hidden Linear weights,
conv filters and other matrices; AdamW for embeddings (and weights tied to them), the output
layer, the input stem, 0D/1D parameters and matrices too small for orthogonalization to mean
anything (Keller Jordan's Muon post; Moonlight; the seed notebook's split).

A "free" parameter is a >=2D parameter that is not the weight of a layer muonkit knows (Linear,
Conv, ConvTranspose, Embedding, MultiheadAttention, transformers' Conv1D): ViT's pos_embed and
cls_token, stacked expert weights owned by a custom module, a layer-scale table. Its role is not
in its module's type, so it is read from how one forward pass over `example_inputs` uses it
(observed at the ATen level with a TorchDispatchMode): consumed only as a matrix operand of a
matrix product or a convolution -> Muon; added, concatenated, indexed, multiplied elementwise or
fed as the input of a layer -> AdamW. Without example inputs a free parameter goes to AdamW, and
its reason says how to send it to Muon.

Some roles are read from structure that libraries define: transformers' expert modules (one
matrix per expert, gate and up apart) and the MoE router beside them, GPT-2's fused c_attn, the
fused q/k/v and gate/up Linears of Phi-3, GPT-NeoX and Falcon (cut where the model splits them), PEFT's
LoRA adapters, and the evidence that a layer is an output layer (its output is the model's output,
its out size is the config's vocabulary or label count, it ends a head attribute at the top). Only
where no evidence exists does order decide, and then a warning says so.
"""

from __future__ import annotations

import fnmatch
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .layout import Layout, LayoutSpec, matrix_shape, resolve
from .options import ADAMW_FROM, DEFAULTS, adamw_kernel
from .orthogonalize import default_ns_dtype_reason

Choice = Literal["muon", "adamw"]

LORA_ADAPTERS: Choice = "adamw"
"""Where PEFT LoRA adapters go (lora_A, lora_B). Measured by benchmarks/lora_rule.py (a tiny Llama
pretrained on Python source, LoRA r=8 on prose, 100 steps, 3 seeds, lr 1e-3..3e-2): the best lr of
each gave equal loss (Muon 1.877 +- 0.011, AdamW 1.880 +- 0.011 at lr 1e-2), and at lr 1e-3 (muonkit's
default) and 3e-3 AdamW was clearly ahead (1.970 vs 2.077, 1.890 vs 1.917): AdamW is the safer rule."""
PredicateResult = Union[None, Choice, Layout, tuple[Literal["muon"], LayoutSpec]]
Predicate = Callable[[str, nn.Parameter, nn.Module], PredicateResult]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WEIGHT_LAYERS = (nn.Linear, *_CONVS, *_CONV_TRANSPOSES)
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

# ATen ops and the positional operands that are factors of a matrix product: "left" in L @ R is
# stored (out, in), "right" is stored (in, out); a convolution's filter is "conv"; addmm's and
# baddbmm's added term is not a factor.
_MATRIX_OPERANDS: dict[str, dict[int, str]] = {
    "mm": {0: "left", 1: "right"},
    "bmm": {0: "left", 1: "right"},
    "_grouped_mm": {0: "left", 1: "right"},
    "matmul": {0: "left", 1: "right"},
    "mv": {0: "left"},
    "addmm": {1: "left", 2: "right"},
    "addbmm": {1: "left", 2: "right"},
    "baddbmm": {1: "left", 2: "right"},
    "addmv": {1: "left"},
    "linear": {1: "left"},
    "convolution": {1: "conv"},
}
# Ops whose output is the same values as their input (dtype casts, contiguous copies): a later
# use of the output is a use of the parameter it came from.
_COPIES = frozenset({"clone", "_to_copy", "contiguous", "_unsafe_view", "lift_fresh_copy"})
# A sigmoid between a layer and the model's output (DETR's and YOLOS's boxes:
# `bbox_predictor(x).sigmoid()`): the layer's output is still the model's output, for finding output
# layers only (a free parameter squashed is not a copy of it). Not tanh: a backbone's pooler (BERT's,
# ViT's: tanh(dense(x))) is hidden.
_SQUASHES = frozenset({"sigmoid"})
# Ops that pick whole entries of a stacked (>=3D) parameter along its leading axis, such as the
# weights of the experts a token was routed to (`experts.gate_up_proj[expert_ids]`): the result
# holds matrices of the parameter, so its uses are the parameter's uses.
_PICKS = frozenset({"index", "index_select"})


@dataclass(frozen=True)
class Decision:
    """The routing of one parameter.

    Attributes:
        name, shape: as in model.named_parameters().
        optimizer: "muon", "adamw", or "frozen" (requires_grad=False: left out of param_groups).
        reason: why, in words.
        layout: the matrix view of a Muon parameter (a group's `layout` option); None otherwise.
        no_decay: None when the parameter's group weight decay applies; otherwise why its
            weight_decay is 0 ("1D", "model.no_weight_decay()", ...).
    """

    name: str
    shape: tuple[int, ...]
    optimizer: Literal["muon", "adamw", "frozen"]
    reason: str
    layout: LayoutSpec = None
    no_decay: str | None = None


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT-J, ...), recognized without importing transformers: the
    class name, its `nf` (output features) and a 2D weight stored (in, out) = (nx, nf)."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
        and isinstance(nf, int)
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == nf
    )


def _is_weight_layer(module: nn.Module) -> bool:
    """A layer whose weight is a dense linear map: Linear, Conv, ConvTranspose, transformers' Conv1D."""
    return isinstance(module, _WEIGHT_LAYERS) or _is_hf_conv1d(module)


def _transposed(ndim: int) -> Layout:
    """(..., in, out): a batch of matrices stored transposed."""
    return Layout(rows=(ndim - 1,), cols=(ndim - 2,), batch=tuple(range(ndim - 2)))


def _product_layout(p: nn.Parameter, operand: torch.Tensor, side: str) -> LayoutSpec:
    """The matrix view of a free parameter from one matrix-product operand made of it.

    In L @ R the contracted size (L's last axis, R's second-to-last) is the fan_in and the other
    side of the operand the fan_out; einsum and matmul may merge batch axes into either, so each
    is a multiple of the parameter's own axis. (..., in, out) when only that reading fits the
    parameter's last two axes (a, b): fan_in a multiple of a and fan_out of b. When both fit (a
    square matrix) and the operand is a view of the parameter, its strides say whether it holds
    those axes in order or swapped (W or a transposed view of it), which fixes the reading: the scale is the same either way, but
    NorMuon's per-row second moment and Dion2's rows are not. Otherwise None, (..., out, in).
    """
    if operand.ndim < 2 or p.ndim < 2:
        return None
    rows, cols = operand.shape[-2:]
    fan_out, fan_in = (rows, cols) if side == "left" else (cols, rows)
    a, b = p.shape[-2:]
    if a == 0 or b == 0:
        return None
    as_stored = fan_out % a == 0 and fan_in % b == 0
    transposed = fan_out % b == 0 and fan_in % a == 0
    if (as_stored and transposed and (a, b) == (rows, cols) and p.stride()[-2] != p.stride()[-1]
            and _storage(operand) == _storage(p)):  # a view of the parameter (a copy may have been transposed)
        order = {p.stride()[-2:]: True, p.stride()[-2:][::-1]: False}.get(operand.stride()[-2:])
        # In order, the operand's rows are the parameter's axis -2: its fan_out on the left, fan_in on the right.
        transposed = order is not None and order == (side == "right")
        as_stored = not transposed
    return _transposed(p.ndim) if transposed and not as_stored else None


@dataclass(frozen=True)
class _Known:
    """The weight of a layer muonkit knows: what it is, its matrix view, and how that view reads."""

    what: str
    layout: LayoutSpec
    reading: str = ""


def _conv_layout(transposed: bool, ndim: int, groups: int) -> LayoutSpec:
    """A Conv filter (out, in / groups, *kernel), grouped or not, is one out x (in / groups * kernel)
    matrix (Keller Jordan's conv flattening; the seed notebook's). A ConvTranspose filter, stored
    (in, out / groups, *kernel), is one (out / groups) x (in * kernel) matrix per group: fan_out
    is axis 1, and the groups cut axis 0."""
    if not transposed:
        return "conv"
    blocks = ((0, groups),) if groups > 1 else ()
    return Layout(rows=(1,), cols=(0, *range(2, ndim)), blocks=blocks)


# What training measured for the default reading of depthwise and grouped conv filters
# (benchmarks/RESULTS.md, "Depthwise and grouped conv filters").
GROUPED_CONV_EVIDENCE = (
    "measured: it trained better than one matrix per group and than AdamW on the seed notebook's network "
    "and a transformers ConvNeXt on Fashion-MNIST, 3 seeds at each reading's best lr, benchmarks/RESULTS.md; "
    "a predicate returning Layout.per_block(groups, ndim) or 'adamw' picks the others"
)


def _conv_kind(module: nn.Module, transposed: bool) -> _Known:
    groups = module.groups
    name = "transposed-conv filter" if transposed else "conv filter"
    layout = _conv_layout(transposed, module.weight.ndim, groups)
    if transposed:
        stored = "; stored (in, out/groups, *kernel)"
        if groups == 1:
            return _Known(name, layout, f" (out x in*kernel{stored})")
        return _Known(f"grouped {name} (groups={groups})", layout,
                      f" (one (out/groups) x (in/groups*kernel) matrix per group{stored})")
    if groups == 1:
        return _Known(name, layout, " (out x in*kernel)")
    what = "depthwise" if groups == module.in_channels else "grouped"
    return _Known(f"{what} {name} (groups={groups})", layout,
                  f" (out x in/groups*kernel, one matrix for all groups: {GROUPED_CONV_EVIDENCE})")


def _known_weight(module: nn.Module, local_name: str, p: nn.Parameter) -> _Known | None:
    if local_name == "weight" and isinstance(module, _EMBEDDINGS):
        return _Known("embedding", None)
    if local_name == "weight" and isinstance(module, nn.Linear):
        return _Known("Linear weight", "stacked")
    if local_name == "weight" and isinstance(module, _CONVS):
        return _conv_kind(module, transposed=False)
    if local_name == "weight" and isinstance(module, _CONV_TRANSPOSES):
        return _conv_kind(module, transposed=True)
    if local_name == "weight" and _is_hf_conv1d(module):
        return _Known("transformers Conv1D weight", Layout(rows=(1,), cols=(0,)),
                      " (out x in; stored (in, out), read with Layout(rows=(1,), cols=(0,)))")
    if local_name == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
        return _Known("MultiheadAttention in_proj_weight", Layout.per_block(3), " (q, k and v: 3 matrices)")
    if local_name in _ATTENTION_WEIGHTS and isinstance(module, nn.MultiheadAttention):
        return _Known(f"MultiheadAttention {local_name}", "stacked")
    return _expert_weight(module, local_name, p)


# ------------------------------------------------------- roles read from the model's structure

def _expert_weight(module: nn.Module, local_name: str, p: nn.Parameter) -> _Known | None:
    """A weight of transformers' expert modules (classes decorated with use_experts_implementation,
    e.g. Qwen3MoeExperts, MixtralExperts), recognized by their contract without importing
    transformers: an int `num_experts`, a bool `is_transposed`, and (num_experts, out, in)
    tensors `gate_up_proj` / `up_proj` / `down_proj` ((num_experts, in, out) when transposed).

    One matrix per expert; a fused gate_up_proj stores the gate rows then the up rows
    (`is_concatenated`, the default), read as two matrices per expert. Interleaved gate/up rows
    (is_concatenated=False, GPT-OSS) cannot be cut into two blocks: one matrix per expert.
    """
    experts = getattr(module, "num_experts", None)
    transposed = getattr(module, "is_transposed", None)
    if not (isinstance(experts, int) and isinstance(transposed, bool) and p.ndim == 3 and p.shape[0] == experts
            and local_name in ("gate_up_proj", "up_proj", "down_proj")):
        return None
    out_axis, in_axis = (2, 1) if transposed else (1, 2)
    stored = "; stored (experts, in, out)" if transposed else ""
    what = f"{type(module).__name__} expert weights"
    if local_name == "gate_up_proj" and getattr(module, "is_concatenated", True) is True:
        layout = Layout(rows=(out_axis,), cols=(in_axis,), batch=(0,), blocks=((out_axis, 2),))
        return _Known(what, layout, f" (gate and up apart: 2 matrices per expert{stored})")
    interleaved = ", gate and up rows interleaved" if local_name == "gate_up_proj" else ""
    layout = Layout(rows=(out_axis,), cols=(in_axis,), batch=(0,)) if transposed else "stacked"
    return _Known(what, layout, f" (one matrix per expert{interleaved}{stored})")


def _expert_bias(module: nn.Module, local_name: str, p: nn.Parameter) -> str | None:
    """Why a stacked bias of a transformers expert module (GptOssExperts' `gate_up_proj_bias`: one
    bias vector per expert, (experts, out), beside its expert weight) keeps weight decay 0 as 1D
    biases do; None for any other tensor."""
    experts = getattr(module, "num_experts", None)
    weight = getattr(module, local_name.removesuffix("_bias"), None) if local_name.endswith("_bias") else None
    if (isinstance(experts, int) and isinstance(getattr(module, "is_transposed", None), bool) and p.ndim == 2
            and p.shape[0] == experts and isinstance(weight, torch.Tensor) and weight.ndim == 3
            and weight.shape[0] == experts):
        return "a bias per expert (experts x out)"
    return None


def _routers(model: nn.Module) -> dict[int, str]:
    """{id(weight): reason} for MoE routers: a matrix with one row per expert held by a sibling of
    an expert module in the same MoE block, or by the one Linear inside such a sibling: Qwen3-MoE's
    and Mixtral's `gate`, Llama 4's `router`, JetMoE's `router.layer`.
    An expert module has an int `num_experts` and either transformers' bool `is_transposed` (see
    _expert_weight) or a tensor of its own stacking that many matrices (Llama4TextExperts, which
    lacks the flag, and hand-written blocks)."""
    found: dict[int, str] = {}
    for block in model.modules():
        children = list(block.children())
        for experts in children:
            count = getattr(experts, "num_experts", None)
            if isinstance(count, bool) or not isinstance(count, int) or not (
                    isinstance(getattr(experts, "is_transposed", None), bool)
                    or any(w.ndim >= 3 and w.shape[0] == count for w in experts.parameters(recurse=False))):
                continue
            for sibling in children:
                if sibling is experts:
                    continue
                # PEFT's ModulesToSaveWrapper holds the router it trains (and the original) one level down.
                held = getattr(sibling, "modules_to_save", None)
                held = [*held.values(), getattr(sibling, "original_module", None)] if isinstance(held, nn.ModuleDict) else []
                # A gating module around one Linear (JetMoE's router.layer) holds it one level down too.
                matrices = [q for q in sibling.parameters() if q.ndim >= 2]
                if len(matrices) == 1:
                    held += [m for m in sibling.modules() if any(q is matrices[0] for q in m.parameters(recurse=False))]
                for p in [q for m in (sibling, *held) if isinstance(m, nn.Module) for q in m.parameters(recurse=False)]:
                    if p.ndim == 2 and p.shape[0] == count:
                        found[id(p)] = (f"MoE router of {type(block).__name__} ({count} experts x {p.shape[1]}): "
                                        "it scores the experts like an output layer scores classes, so AdamW, "
                                        "with or without example_inputs")
    return found


def _fused_qkv(module: nn.Module, local_name: str, parent_of: dict[int, nn.Module]) -> _Known | None:
    """GPT-2's fused attention projection: the Conv1D `c_attn` of a module with `split_size`,
    nf = 3 * split_size (q, k, v) or 2 * split_size (k, v of cross-attention), read as 3 (or 2)
    matrices split_size x in, as MultiheadAttention's in_proj_weight is. `c_attn` may be a wrapper
    holding it (PEFT's ModulesToSaveWrapper trains a copy of it, two modules further down)."""
    if local_name != "weight" or not _is_hf_conv1d(module):
        return None
    parent, held = parent_of.get(id(module)), module
    for _ in range(2):  # the Conv1D itself, or a wrapper around it (c_attn.modules_to_save.default)
        if parent is None or getattr(parent, "c_attn", None) is held:
            break
        parent, held = parent_of.get(id(parent)), parent
    split = getattr(parent, "split_size", None)
    if parent is None or getattr(parent, "c_attn", None) is not held or not isinstance(split, int) or split <= 0:
        return None
    count, rest = divmod(module.nf, split)
    if rest or count not in (2, 3):
        return None
    parts = "q, k and v" if count == 3 else "k and v"
    return _Known("fused attention weight (transformers Conv1D c_attn)",
                  Layout(rows=(1,), cols=(0,), blocks=((1, count),)),
                  f" ({parts}: {count} matrices out x in; stored (in, {count} * out))")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _attention_heads(attention: nn.Module) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head size) that an attention module declares: its own head size
    (`head_dim` or `head_size`; an MLP declares none) and its head counts (`num_heads` / `n_heads` /
    `num_attention_heads`, `num_kv_heads` / `num_key_value_heads`, else its config's; key/value
    heads default to the query heads). None when it declares no head size or no head count, or when
    its config holds a count per layer (no one value to read)."""
    size = next((v for n in ("head_dim", "head_size") for v in [_count(getattr(attention, n, None))] if v), None)
    if size is None:
        return None
    config = getattr(attention, "config", None)
    owners = (attention, config) if config is not None else (attention,)

    def first(*names: str) -> int | None:
        return next((v for o in owners for n in names for v in [_count(getattr(o, n, None))] if v), None)

    try:
        heads, kv = first("num_heads", "num_attention_heads", "n_heads"), first("num_kv_heads", "num_key_value_heads")
    except RuntimeError:
        # A heterogeneous transformers config refuses a global value of a per-layer attribute
        # (AmbiguousGlobalPerLayerAttributeError, a RuntimeError): the counts are unknown here.
        return None
    if heads is None:
        return None
    return heads, kv or heads, size


def _fused_linear(module: nn.Module, local_name: str, parent_of: dict[int, nn.Module]) -> _Known | None:
    """A Linear that fuses matrices its module splits apart:

    - the q, k and v projection of an attention module (Phi-3's qkv_proj, GPT-NeoX's, Falcon's and
      BLOOM's query_key_value): out size (heads + 2 * kv_heads) * head size of the heads the module
      declares (_attention_heads). Read as one matrix per head's q, k or v: the fused layouts
      transformers uses (q | k | v, Phi-3; q, k, v interleaved per head, GPT-NeoX and BLOOM; per
      key/value group, Falcon) all put a boundary after every head_dim rows, and only there can
      equal blocks cut all of them without mixing q, k and v.
    - the query projection of an attention module that also holds each head's output gate (Qwen3-Next,
      Qwen3.5: out size 2 * heads * head size, read from the hidden states, beside separate k and v
      projections; `q_proj(x).view(..., heads, 2 * head_dim).chunk(2)`): one matrix per head's query
      or gate.
    - an MLP's gate_up_proj beside a down_proj of half its out size (Phi-3, GLM: gate and up are the
      two halves of its output, `chunk(2)`): 2 matrices.

    The Linear may sit in a PEFT wrapper (LoRA's layer around its base_layer, ModulesToSaveWrapper)."""
    if local_name != "weight" or not isinstance(module, nn.Linear):
        return None
    held, parent = module, parent_of.get(id(module))
    for _ in range(3):
        wrapper = parent is not None and (isinstance(parent, nn.ModuleDict) or any(
            getattr(parent, attr, None) is held for attr in ("base_layer", "modules_to_save", "original_module")))
        if not wrapper:
            break
        held, parent = parent, parent_of.get(id(parent))
    if parent is None:
        return None
    out = module.out_features
    down_in = _count(getattr(getattr(parent, "down_proj", None), "in_features", None))
    if getattr(parent, "gate_up_proj", None) is held and down_in is not None and out == 2 * down_in:
        return _Known(f"fused gate and up projection of {type(parent).__name__}", Layout.per_block(2),
                      " (gate and up apart: 2 matrices, the halves of its output that the model splits)")
    heads = _attention_heads(parent)
    if heads is None:
        return None
    h, kv, size = heads
    # A module with separate k and v projections (two Linears of kv_heads * head size outputs) fuses
    # nothing: its output projection may have that out size by coincidence.
    separate = sum(isinstance(m, nn.Linear) and m.out_features == kv * size for m in parent.modules())
    hidden = _count(getattr(getattr(parent, "config", None), "hidden_size", None))
    if separate >= 2 and out == 2 * h * size and module.in_features == hidden:
        return _Known(f"fused query and output gate of {type(parent).__name__}", Layout.per_block(2 * h),
                      f" ({h} heads of {size}, each head's query rows then its gate rows: one matrix per head's "
                      "query or gate, the only equal blocks that never mix the two; a predicate returning a "
                      "muonkit.Layout reads it otherwise)")
    if out != (h + 2 * kv) * size or separate >= 2:
        return None
    return _Known(f"fused q, k and v projection of {type(parent).__name__}", Layout.per_block(h + 2 * kv),
                  f" ({h} query and {kv} key/value heads of {size}: one matrix per head's q, k or v; every fused "
                  "q/k/v layout (q|k|v, or interleaved per head or per key/value group) has a boundary after each "
                  "head and only there, so q, k and v are never mixed; a predicate returning a muonkit.Layout "
                  "reads it otherwise)")


def _lora_adapters(model: nn.Module) -> dict[int, str]:
    """{id(module): "A" | "B"} for PEFT LoRA adapter layers: the entries of the `lora_A` / `lora_B`
    ModuleDicts of a layer that wraps a `base_layer` (peft.tuners.lora.LoraLayer's structure), and the
    `lora_embedding_A` / `lora_embedding_B` ParameterDicts of an adapted Embedding (whose entries are
    its parameters)."""
    found: dict[int, str] = {}
    for layer in model.modules():
        if not isinstance(getattr(layer, "base_layer", None), nn.Module):
            continue
        for which in ("A", "B"):
            table = getattr(layer, f"lora_{which}", None)
            if isinstance(table, nn.ModuleDict):
                for adapter in table.values():
                    found[id(adapter)] = which
            table = getattr(layer, f"lora_embedding_{which}", None)
            if isinstance(table, nn.ParameterDict):
                found[id(table)] = which
    return found


# Names of a model's head at its top (outside numbered blocks): transformers' lm_head,
# classifier, score and qa_outputs, the projections of a dual encoder (CLIP, CLAP, BLIP) whose
# outputs are the embeddings the contrastive loss compares, and DETR's and YOLOS's class and box
# heads; timm's head; torchvision's fc and classifier; the plain output / out of hand-written models.
_HEAD_NAMES = frozenset({"lm_head", "head", "heads", "classifier", "score", "qa_outputs", "fc", "output", "out",
                         "text_projection", "visual_projection", "audio_projection", "image_projection",
                         "text_proj", "vision_proj", "class_labels_classifier", "bbox_predictor"})


def _in_blocks(name: str) -> bool:
    """Whether a module name runs through a numbered container (the blocks of a backbone)."""
    return any(part.isdigit() for part in name.split("."))


def _out_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.nf if _is_hf_conv1d(module) else None


def _config_sizes(model: nn.Module) -> tuple[dict[int, str], bool]:
    """({size: "config.vocab_size" | "config.num_labels"}, whether any module has a config)."""
    sizes: dict[int, str] = {}
    configured = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or isinstance(config, (dict, str)):
            continue
        configured = True
        for key in ("vocab_size", "num_labels"):
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                sizes.setdefault(value, f"config.{key}")
    return sizes, configured


def _output_layers(
    model: nn.Module, seen: _Observation | None, adapters: dict[int, str]
) -> tuple[dict[int, str], bool]:
    """({id(layer): the evidence that it is an output layer}, whether order may stand in).

    Evidence: the forward pass (its output is the model's output), a layer outside the numbered
    blocks whose out size equals the config's vocab_size or num_labels, the last layer of a head
    attribute (_HEAD_NAMES) of the model itself, of the model a name-prefixing wrapper holds
    (torch.compile, DataParallel, DDP), or of a module with a config (a transformers model inside
    a wrapper such as PEFT's). A model with a transformers-style config and none of this
    is a backbone without a head: no output layer, and order may not stand in.
    """
    layers = [(n, m) for n, m in model.named_modules() if _is_weight_layer(m) and id(m) not in adapters]
    found: dict[int, str] = {}
    if seen is not None:
        for u in [m for _, m in layers] + [p for p in model.parameters() if id(p) in seen.uses]:
            if id(u) in seen.outputs:
                found[id(u)] = "its output is the model's output in the forward pass over example_inputs"
    sizes, configured = _config_sizes(model)
    sized: set[int] = set()
    for n, m in layers:
        size = _out_size(m)
        if not _in_blocks(n) and size in sizes:
            found.setdefault(id(m), f"outside the blocks, out size {size} = {sizes[size]}")
            sized.add(id(m))
    tops = [("", model), *_unwrapped(model)] + [(f"{n}.", m) for n, m in model.named_modules() if n and hasattr(m, "config")]
    for prefix, top in tops:
        for child_name, head in top.named_children():
            name = prefix + child_name
            if child_name in _HEAD_NAMES and not _in_blocks(name) and id(head) not in adapters:
                inside = [x for x in head.modules() if _is_weight_layer(x) and id(x) not in adapters]
                within = {id(x) for x in head.modules()}
                # A head attribute beside the vocabulary- or label-sized layer that its output feeds
                # (ModernBERT's `head`, a dense transform before `decoder` or `classifier`) is not the output.
                beside = any(id(x) in sized and id(x) not in within for x in top.modules())
                if inside and (id(inside[-1]) in sized or not beside):
                    found.setdefault(id(inside[-1]), f"the last layer of the head '{name}'")
    return found, not found and not configured and not (seen is not None and seen.outputs)


def _unwrapped(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name prefix, model) of each model held by a wrapper that only prefixes names, outermost first:
    torch.compile's OptimizedModule (`_orig_mod`; told by its class, so torch._dynamo is not imported),
    DataParallel and DistributedDataParallel (`module`)."""
    found, prefix = [], ""
    while True:
        compiled = type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo")
        attr = "_orig_mod" if compiled else "module" if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None
        if attr is None or not isinstance(getattr(model, attr, None), nn.Module):
            return found
        prefix, model = f"{prefix}{attr}.", getattr(model, attr)
        found.append((prefix, model))


def _towers(model: nn.Module) -> list[tuple[str, set[int]]]:
    """(name, ids of its modules and parameters) of each tower of `model`: a transformers model (a
    module with a config and a `main_input_name`) beside another one in the same module, as CLIP's,
    SigLIP's or a LLaVA's text and vision towers, or an encoder and its decoder, each reading an
    input of its own. (A transformers model alone in its module, such as ConvNeXt's encoder, reads
    what the layers before it made.)"""
    is_model = lambda m: hasattr(m, "config") and isinstance(getattr(m, "main_input_name", None), str)  # noqa: E731
    towers = []
    for prefix, parent in model.named_modules():
        children = [(name, child) for name, child in parent.named_children() if is_model(child)]
        if len(children) > 1:
            towers += [(f"{prefix}.{name}" if prefix else name, {id(m) for m in child.modules()}
                        | {id(p) for p in child.parameters()}) for name, child in children]
    return towers


def _input_stems(
    order: list[Any], seen: _Observation | None, outputs: Collection[int], order_source: str,
    towers: list[tuple[str, set[int]]],
) -> dict[int, str]:
    """{id(layer or free parameter): why it is the input stem}: the layers that read the model's
    input in the forward pass; else (or without example_inputs) the first in order, unless that
    is an embedding or an output layer, and so the first of each nested transformers model
    (_towers: a dual encoder's vision tower reads pixels however late it comes in order)."""
    candidates = [u for u in order if id(u) not in outputs]
    if seen is not None:
        reading = {id(m): "it reads the model's input in the forward pass over example_inputs"
                   for m in candidates if id(m) in seen.stems and not isinstance(m, _EMBEDDINGS)}
        if reading:
            return reading
    stems: dict[int, str] = {}
    for where, inside in [("", None), *((f" of '{name}'", ids) for name, ids in towers)]:
        first = next((u for u in candidates if inside is None or id(u) in inside), None)
        if first is not None and not isinstance(first, _EMBEDDINGS):
            kind = type(first).__name__ if isinstance(first, nn.Module) else "matrix"
            stems.setdefault(id(first), f"the first {kind}{where} {order_source}")
    return stems


# ------------------------------------------------------------------ observing one forward pass

@dataclass(frozen=True)
class _Use:
    """One ATen op that consumed a free parameter."""

    op: str
    matrix: bool
    """The parameter was a factor of a matrix product or a convolution's filter."""
    layout: LayoutSpec = None
    """The matrix view that use implies (None: the default)."""
    feeds: str | None = None
    """For a matrix product with a layer's weight as the other factor: that weight's name."""


@dataclass
class _Observation:
    """What one forward pass showed."""

    order: list[Any] = field(default_factory=list)
    """Known layers (modules) and free parameters, in the order the forward pass first runs them."""
    uses: dict[int, list[_Use]] = field(default_factory=dict)
    """Free parameter id -> how the forward pass consumed it, in order."""
    reads: dict[int, set[int]] = field(default_factory=dict)
    """Id of a known layer or of a free parameter used as a matrix -> storages of its inputs."""
    writes: dict[int, set[int]] = field(default_factory=dict)
    """Id of a known layer or of a free parameter used as a matrix -> storages of its outputs."""
    outputs: set[int] = field(default_factory=set)
    """Ids of those whose output is (a view or a copy of) an output of the model."""
    stems: set[int] = field(default_factory=set)
    """Ids of those whose input is (a view or a copy of) an input of the model."""


def _storage(t: Any) -> int | None:
    """The storage address of a strided tensor on a real device, else None."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
        return None
    return t.untyped_storage().data_ptr()


class _UseRecorder(TorchDispatchMode):
    """Records how ATen ops consume the free parameters (and what feeds them).

    A tensor comes from a parameter when it shares the parameter's storage (views: transposes,
    reshapes, expands) or is the output of a copy of it (_COPIES). View ops are not uses.
    """

    def __init__(self, free: dict[int, nn.Parameter], weights: dict[int, str], seen: _Observation):
        super().__init__()
        self.free = free
        self.weights = weights
        self.seen = seen
        self.source: dict[int, int] = {}
        """Storage address -> id of the parameter whose values it holds."""
        self.keep: list[torch.Tensor] = []
        """Copies of parameters and other copies, kept alive so that no other tensor reuses their addresses."""
        self.copies: dict[int, int] = {}
        """Storage address of a copy (a dtype cast, a contiguous copy) -> that of its input."""

    def watch(self, p: nn.Parameter) -> None:
        if p.numel() and p.layout == torch.strided and p.device.type != "meta":
            self.source[p.untyped_storage().data_ptr()] = id(p)

    def root(self, address: int) -> int:
        """The storage whose values a copy (or a copy of a copy) holds."""
        while address in self.copies:
            address = self.copies[address]
        return address

    def _picks(self, op: str, args: tuple, pid: int) -> bool:
        """Whether `op` picks whole matrices of a stacked free parameter along its leading axis."""
        p = self.free.get(pid)
        if p is None or p.ndim < 3 or op not in _PICKS:
            return False
        if op == "index_select":
            return int(args[1]) == 0
        indices = args[1]
        return len(indices) >= 1 and indices[0] is not None and all(i is None for i in indices[1:])

    def _origin(self, t: Any) -> int | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            return None
        return self.source.get(t.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        op = func.overloadpacket.__name__
        operands = [(i, leaf) for i, a in enumerate(args) for leaf in tree_leaves(a)]
        operands += [(None, leaf) for leaf in tree_leaves(kwargs)]
        origins = [(i, self._origin(t)) for i, t in operands]
        factors = _MATRIX_OPERANDS.get(op, {})
        copied, copy = (_storage(operands[0][1]) if operands else None), _storage(out)
        if (op in _COPIES or op in _SQUASHES) and copied is not None and copy is not None and copy != copied:
            self.copies.setdefault(copy, self.root(copied))
            self.keep.append(out)
        for (position, operand), (_, pid) in zip(operands, origins):
            if pid is None:
                continue
            if op in _COPIES or (position == 0 and self._picks(op, args, pid)):
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                        self.source.setdefault(t.untyped_storage().data_ptr(), pid)
                        self.keep.append(t)
                continue
            if pid not in self.free:
                continue
            side = factors.get(position)
            matrix = side is not None
            feeds = next(
                (self.weights[other] for i, other in origins
                 if other in self.weights and i != position and i in factors),
                None,
            )
            p = self.free[pid]
            layout = None
            if side == "conv":
                layout = _conv_layout(bool(args[6]), p.ndim, int(args[8]))
            elif matrix:
                layout = _product_layout(p, operand, side)
            uses = self.seen.uses.setdefault(pid, [])
            if matrix and feeds is None and not any(u.matrix and u.feeds is None for u in uses):
                self.seen.order.append(p)
            if matrix and feeds is None:
                # Like a layer's hooks: what the product reads and writes, for the stem and the output.
                self.seen.reads.setdefault(pid, set()).update(
                    a for (i, t), (_, other) in zip(operands, origins) if i != position and other is None
                    for a in [_storage(t)] if a is not None)
                self.seen.writes.setdefault(pid, set()).update(
                    a for a in map(_storage, tree_leaves(out)) if a is not None)
                self.keep.append(out)
            uses.append(_Use(op, matrix, layout, feeds))
        return out


def _observe(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    free: dict[int, nn.Parameter],
    weights: dict[int, str],
) -> _Observation:
    """One forward pass (eval mode, no grad): execution order of the known layers and of the free
    parameters used as matrices, and every use of each free parameter."""
    seen = _Observation()
    visited: set[int] = set()
    reads, writes = seen.reads, seen.writes
    alive: list[Any] = []

    def record(module: nn.Module, inputs: Any) -> None:
        if id(module) not in visited:
            visited.add(id(module))
            seen.order.append(module)
        reads.setdefault(id(module), set()).update(a for a in map(_storage, _tensors(inputs)) if a is not None)
        alive.append(inputs)

    def produced(module: nn.Module, _inputs: Any, output: Any) -> None:
        writes.setdefault(id(module), set()).update(a for a in map(_storage, _tensors(output)) if a is not None)
        alive.append(output)

    layers = [m for m in model.modules() if isinstance(m, _EMBEDDINGS) or _is_weight_layer(m)]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    handles += [m.register_forward_hook(produced) for m in layers]
    recorder = _UseRecorder(free, weights, seen)
    params = {id(p): p for p in model.parameters()}
    for pid in (*free, *weights):
        recorder.watch(params[pid])
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recorder:
            if isinstance(example_inputs, Mapping):
                result = model(**example_inputs)
            else:
                result = model(*example_inputs)
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    roots = lambda tensors: {recorder.root(a) for a in map(_storage, tensors) if a is not None}  # noqa: E731
    model_outputs, model_inputs = roots(_tensors(_primary(result))), roots(_tensors(example_inputs))
    seen.outputs = {m for m, written in writes.items() if {recorder.root(a) for a in written} & model_outputs}
    seen.stems = {m for m, read in reads.items() if {recorder.root(a) for a in read} & model_inputs}
    return seen


def _primary(result: Any) -> Any:
    """The model's outputs proper: of a transformers ModelOutput (told by its class name, without
    importing transformers), its tensor fields (logits, pred_boxes, image_embeds, last_hidden_state,
    ...) but hidden and attention states and router_logits; the states it returns alongside, as
    tuples (hidden_states, attentions) or as a sub-model's output (a LLaVA's or Gemma 3's
    `image_outputs`, CLIP's `vision_model_output`), are intermediate: the layer that wrote one is not
    an output layer. Any other result as it is."""
    if isinstance(result, Mapping) and any(c.__name__ == "ModelOutput" for c in type(result).__mro__):
        return [value for key, value in result.items() if isinstance(value, torch.Tensor)
                and "hidden_state" not in key and "attention" not in key and key != "router_logits"]
    return result


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and mappings (transformers' ModelOutput is a mapping)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# ------------------------------------------------------------------------------ weight decay

def _no_decay_names(model: nn.Module) -> dict[str, str]:
    """{entry: the module whose no_weight_decay() listed it} over every module of the model, each
    entry made a full name by its module's prefix (timm's convention, read on every module)."""
    entries: dict[str, str] = {}
    for prefix, module in model.named_modules():
        listing = getattr(module, "no_weight_decay", None)
        if listing is None:
            continue
        where = f"{prefix}.no_weight_decay()" if prefix else "model.no_weight_decay()"
        if not callable(listing):
            raise TypeError(f"{where}: no_weight_decay must be a method returning parameter names, got {listing!r}")
        names = listing()
        if isinstance(names, str) or not isinstance(names, Collection):
            raise TypeError(f"{where} must return a collection of names, got {names!r}")
        for entry in names:
            if not isinstance(entry, str):
                raise TypeError(f"{where} returned {entry!r}; expected parameter names (str)")
            if entry:
                entries.setdefault(f"{prefix}.{entry}" if prefix else entry, where)
    return entries


def _listed(name: str, entries: dict[str, str]) -> str | None:
    """Which no_weight_decay() lists `name`: as a name, an fnmatch pattern, or a module prefix."""
    for entry, where in entries.items():
        if name == entry or name.startswith(entry + ".") or fnmatch.fnmatchcase(name, entry):
            return where
    return None


# ----------------------------------------------------------------------------------- routing

# The models whose output layer route() has warned was decided by order alone, and which names.
_WARNED_BY_ORDER: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def route(
    model: nn.Module,
    *,
    muon: Collection[str] = (),
    adamw: Collection[str] = (),
    predicate: Predicate | None = None,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    min_size: int = 2,
    exclude_from_decay: bool = True,
    only: Iterable[torch.Tensor | str] | None = None,
) -> list[Decision]:
    """Decide Muon or AdamW for every parameter of `model`, with a reason for each.

    Rules, first match wins: names in `muon=` / `adamw=`; the predicate; 0D/1D -> AdamW;
    embeddings and weights tied to them -> AdamW; the output layer and the input stem -> AdamW;
    a matrix view with a side < min_size -> AdamW; Linear/Conv/ConvTranspose/transformers Conv1D/
    MultiheadAttention projection weights -> Muon; free parameters -> Muon when example_inputs
    show them consumed only as matrix-product or convolution operands, else AdamW.

    Args:
        muon, adamw: parameter names forced to that optimizer (they win over everything).
        predicate: (name, param, module) -> "muon" | "adamw" | a muonkit.Layout (Muon with that
            matrix view) | ("muon", layout) | None; None falls through to the role-based rules.
        example_inputs: the positional inputs (a tuple) or keyword inputs (a dict) of one forward
            pass, run in eval mode without grad. It records which layer reads the input first and
            which produces the output last, and how free parameters are used. Without it,
            registration order (the order of model.modules()) stands in for execution order and
            free parameters go to AdamW.
        min_size: matrices whose matrix view has a side shorter than this go to AdamW.
        exclude_from_decay: True (default): 0D/1D parameters, the names a module lists in its
            `no_weight_decay()` method (timm's convention: names, fnmatch patterns or module
            prefixes, relative to that module), and free tensors with a leading axis of 1 that go
            to AdamW (learned tokens and position tables: ViT's cls_token and position_embeddings,
            timm's pos_embed), transformers expert modules' stacked biases (GPT-OSS's
            gate_up_proj_bias), and parameters marked `p._no_weight_decay = True` (mamba_ssm's
            A_log) get weight_decay 0 (Decision.no_decay says why). nn.Embedding tables,
            position embeddings included (GPT-2's wpe, BERT's position_embeddings), keep the group's
            weight decay. False: every parameter gets its group's weight decay.
        only: parameters (tensors or names) to decide, each judged in the whole model; the others
            are left out of the result. None (default): every parameter.

    Example:
        >>> for d in muonkit.route(model, example_inputs=(x,)):
        ...     print(d.name, d.optimizer, d.reason)
    """
    if not isinstance(model, nn.Module):
        # torch.optim habit: param_groups(model.parameters()) failed with "'generator' object has no
        # attribute 'named_parameters'".
        raise TypeError(f"muonkit routing (route, param_groups, explain) takes the model (a torch.nn.Module), got "
                        f"{type(model).__name__}: pass the model itself, e.g. muonkit.param_groups(model), not "
                        "model.parameters(); routing reads each parameter's module")
    fsdp1 = next((n for n, m in model.named_modules() if any(
        c.__name__ == "FullyShardedDataParallel" and c.__module__.startswith("torch.distributed.fsdp")
        for c in type(m).__mro__)), None)
    if fsdp1 is not None:
        raise ValueError(
            f"muonkit routing: {f'module {fsdp1!r}' if fsdp1 else 'the model'} is wrapped by FSDP1 "
            "(torch.distributed.fsdp.FullyShardedDataParallel), which flattens its parameters into 1-D "
            "FlatParameters (or, with use_orig_params=True, 1-D views of each rank's shard): every matrix would "
            "look 1-D and go to AdamW. Shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor "
            "parameters keep their shapes, then call param_groups(model)"
        )
    unknown = (set(muon) | set(adamw)) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no parameters named {sorted(unknown)} in the model")
    both = set(muon) & set(adamw)
    if both:
        raise ValueError(f"parameters {sorted(both)} are named in both muon= and adamw=")
    if isinstance(example_inputs, torch.Tensor) or not (
        example_inputs is None or isinstance(example_inputs, (Sequence, Mapping))
    ):
        raise TypeError(
            "example_inputs must be a tuple of positional inputs (e.g. (x,)) or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}"
        )

    selected = None if only is None else _selected(model, only)

    owner: dict[int, tuple[str, nn.Module]] = {}
    owners_of: dict[int, list[nn.Module]] = {}
    known: dict[int, _Known] = {}
    parent_of = {id(child): m for m in model.modules() for child in m.children()}
    adapters = _lora_adapters(model)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local_name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module_name, module))
            owners_of.setdefault(id(p), []).append(module)
            role = (_fused_qkv(module, local_name, parent_of) or _fused_linear(module, local_name, parent_of)
                    or _known_weight(module, local_name, p))
            if role is not None:
                known.setdefault(id(p), role)
    routers = _routers(model)
    embedding_weights = {
        id(m.weight): name for name, m in model.named_modules() if isinstance(m, _EMBEDDINGS)
    }
    names_of = {id(p): n for n, p in model.named_parameters()}
    # A tied weight is listed once, under its first name (GPT-2's lm_head.weight is wte.weight): its
    # row says the other names, so that the table does not seem to leave the head out.
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if names_of.get(id(p)) != n:
            aliases.setdefault(id(p), []).append(n)
    free = {id(p): p for p in model.parameters() if p.ndim >= 2 and id(p) not in known}

    uses: dict[int, list[_Use]] | None = None
    seen: _Observation | None = None
    is_layer = lambda m: (isinstance(m, _EMBEDDINGS) or _is_weight_layer(m)) and id(m) not in adapters  # noqa: E731
    if example_inputs is not None:
        weights = {pid: names_of[pid] for pid in known}
        seen = _observe(model, example_inputs, free, weights)
        order, uses = [u for u in seen.order if not isinstance(u, nn.Module) or is_layer(u)], seen.uses
        order_source = "in the forward pass"
    else:
        order = [m for m in model.modules() if is_layer(m)]
        order_source = "in registration order"
    outputs, order_may_decide = _output_layers(model, seen, adapters)
    by_order = order_may_decide and bool(order) and not isinstance(order[-1], _EMBEDDINGS)
    if by_order:
        kind = type(order[-1]).__name__ if isinstance(order[-1], nn.Module) else "matrix"
        outputs = {id(order[-1]): (f"the last {kind} {order_source}; no other evidence (no head attribute, no "
                                   "config size, no layer whose output is the model's output), so only order is "
                                   "left: name it in adamw= or muon= to decide")}
    stems = _input_stems(order, seen, outputs, order_source, _towers(model))
    no_decay_entries = _no_decay_names(model) if exclude_from_decay else {}

    decisions = []
    for name, p in model.named_parameters():
        if selected is not None and name not in selected:
            continue
        module_name, module = owner[id(p)]
        shape = tuple(p.shape)
        if not p.requires_grad:
            decisions.append(Decision(name, shape, "frozen", "requires_grad=False: not optimized"))
            continue
        units = owners_of[id(p)] + [p]
        rule = _Rule(
            name=name, p=p, module=module,
            known=known.get(id(p)),
            uses=None if uses is None or id(p) not in free else uses.get(id(p), []),
            tied_to=embedding_weights.get(id(p)) if not isinstance(module, _EMBEDDINGS) else None,
            stem=next((stems[id(u)] for u in units if id(u) in stems), None),
            output=next((outputs[id(u)] for u in units if id(u) in outputs), None),
            lora=adapters.get(id(module)),
            router=routers.get(id(p)),
        )
        choice, reason, layout = rule.decide(muon=muon, adamw=adamw, predicate=predicate, min_size=min_size)
        if id(p) in aliases:
            reason += f"; also {', '.join(aliases[id(p)])} (tied: the same tensor)"
        no_decay = None
        if exclude_from_decay:
            local_name = name[len(module_name) + 1:] if module_name else name
            no_decay = (f"{p.ndim}D" if p.ndim < 2 else _listed(name, no_decay_entries)
                        or _expert_bias(module, local_name, p)
                        or ("the parameter's _no_weight_decay=True (mamba_ssm's mark: A_log, D, dt_bias)"
                            if getattr(p, "_no_weight_decay", False) is True else None))
            if no_decay is None and id(p) in free and p.shape[0] == 1 and choice == "adamw":
                no_decay = "learned token or position table: a free tensor with a leading axis of 1"
        decisions.append(Decision(name, shape, choice, reason, layout if choice == "muon" else None, no_decay))
        if (by_order and rule.output is not None and choice == "adamw" and reason.startswith("output layer")
                and name not in _WARNED_BY_ORDER.setdefault(model, set())):
            # Once per model and parameter: explain(model) then param_groups(model) warned twice.
            _WARNED_BY_ORDER[model].add(name)
            warnings.warn(f"muonkit: {type(model).__name__} '{name}': output layer decided by order alone ({reason})",
                          stacklevel=3)
    return decisions


def _selected(model: nn.Module, only: Iterable[torch.Tensor | str] | torch.Tensor | str) -> set[str]:
    """The names of the parameters `only=` lists (tensors or names); ValueError for one not in the model."""
    names = {id(p): n for n, p in model.named_parameters()}
    every = set(names.values())
    selected = set()
    for item in [only] if isinstance(only, (str, torch.Tensor)) else only:
        name = item if isinstance(item, str) else names.get(id(item)) if isinstance(item, torch.Tensor) else None
        if name is None or name not in every:
            shown = (item if isinstance(item, str) else
                     f"a tensor of shape {tuple(item.shape)}" if isinstance(item, torch.Tensor) else repr(item))
            raise ValueError(f"only=: {shown} is not a parameter of the model (add the new module to the model "
                             "first, then route its parameters)")
        selected.add(name)
    return selected


@dataclass
class _Rule:
    """Everything known about one parameter, and the rules that decide it."""

    name: str
    p: nn.Parameter
    module: nn.Module
    known: _Known | None
    uses: list[_Use] | None
    """How the forward pass used a free parameter; None without example_inputs or when not free."""
    tied_to: str | None
    stem: str | None
    """Why the parameter's layer is the input stem; None when it is not."""
    output: str | None
    """The evidence that the parameter's layer is an output layer; None when it is not."""
    lora: str | None
    """"A" or "B" for the weight of a PEFT LoRA adapter layer."""
    router: str | None
    """The reason of an MoE router's weight."""

    @property
    def default_layout(self) -> LayoutSpec:
        if self.known is not None:
            return self.known.layout
        matrix_uses = [u for u in self.uses or () if u.matrix and u.layout is not None]
        return matrix_uses[0].layout if matrix_uses else "stacked"

    def decide(
        self, *, muon: Collection[str], adamw: Collection[str], predicate: Predicate | None, min_size: int
    ) -> tuple[Choice, str, LayoutSpec]:
        name, p = self.name, self.p
        shape = tuple(p.shape)
        if name in muon:
            if p.ndim < 2:
                raise ValueError(f"'{name}' has shape {shape}; only matrices can go to Muon")
            return "muon", "named in muon=", self.default_layout
        if name in adamw:
            return "adamw", "named in adamw=", None
        if predicate is not None:
            decided = self._from_predicate(predicate(name, p, self.module))
            if decided is not None:
                return decided
        kind = type(self.module).__name__
        if p.ndim == 0:
            return "adamw", "scalar (0D)", None
        if p.ndim == 1:
            # transformers' norms are their own classes (LlamaRMSNorm, T5LayerNorm): named as norms too
            # (the wording only; every 1D parameter goes to AdamW).
            is_norm = isinstance(self.module, _NORMS) or kind.endswith("Norm")
            role = "norm gain or shift" if is_norm else "bias or scale vector"
            return "adamw", f"1D {role} of {kind}", None
        if self.known is not None and self.known.what == "embedding":
            return "adamw", f"embedding ({kind}): a lookup table, not a dense linear map", None
        if self.tied_to is not None:
            return "adamw", f"tied to embedding '{self.tied_to}'", None
        if self.lora is not None:
            return self._lora()
        if self.router is not None:
            return "adamw", self.router, None
        if self.known is None:
            verdict = self._free()
            if verdict is not None:
                return "adamw", verdict, None
        if self.output is not None:
            return "adamw", f"output layer ({kind}): {self.output}", None
        if self.stem is not None:
            return "adamw", f"input stem ({kind}): {self.stem}", None
        layout = self.default_layout
        batch, rows, cols = matrix_shape(p.shape, resolve(layout, p.ndim))
        view = f"{batch} matrices {rows}x{cols}" if batch > 1 else f"{rows}x{cols}"
        if min(rows, cols) < min_size:
            what = f"{self.known.what}: " if self.known is not None else ""
            reading = self.known.reading if self.known is not None else ""
            return "adamw", f"{what}matrix view {view}{reading} too small to orthogonalize (side < {min_size})", None
        if self.known is not None:
            return "muon", f"hidden {self.known.what} {view}{self.known.reading}", layout
        ops = sorted({f"aten.{u.op}" for u in self.uses or ()})
        if any(u.op == "convolution" for u in self.uses or ()):
            reading = "a conv filter (out x in/groups*kernel; per group when transposed)"
        elif isinstance(layout, Layout):
            reading = "stored (..., in, out)"
        else:
            reading = "read as (..., out, in)"
        return "muon", (f"free parameter of {kind}, a matrix operand of {', '.join(ops)} "
                        f"in the forward pass: {view}, {reading}"), layout

    def _lora(self) -> tuple[Choice, str, LayoutSpec]:
        """A PEFT LoRA adapter: lora_A (r x in) or lora_B (out x r), of a Linear or, a filter
        (r, in, *kernel) or (out, r, *kernel), of a conv layer, by the rule measured in
        benchmarks/lora_rule.py (RESULTS.md, "LoRA adapters")."""
        conv = self.p.ndim > 2
        rows, cols = self.p.shape[0], torch.Size(self.p.shape[1:]).numel()
        reading = ("r x in" if self.lora == "A" else "out x r") + ("*kernel, a conv layer's" if conv else "")
        what = f"LoRA adapter lora_{self.lora} ({rows}x{cols}, {reading})"
        if LORA_ADAPTERS == "adamw":
            return "adamw", (f"{what}: AdamW, as measured (benchmarks/lora_rule.py): Muon on the adapters was no "
                             "better at the best lr and worse below it; muon= or a predicate sends them to Muon"), None
        return "muon", f"{what}: Muon, as measured (benchmarks/lora_rule.py)", "conv" if conv else "stacked"

    def _free(self) -> str | None:
        """The AdamW reason of a free parameter that is not used as a matrix, else None."""
        kind = type(self.module).__name__
        how_to = (f"send it to Muon with muon=['{self.name}'], a predicate, or example_inputs "
                  "that show it consumed as a matrix product operand")
        if self.uses is None:
            return (f"free parameter of {kind}: not a layer's weight, and without example_inputs "
                    f"muonkit cannot tell a matrix from a table or an offset; {how_to}")
        if not self.uses:
            return f"free parameter of {kind}, not used by the forward pass over example_inputs; {how_to}"
        fed = next((u for u in self.uses if u.feeds is not None), None)
        if fed is not None:
            return (f"free parameter of {kind}, the input of a matrix product with '{fed.feeds}' "
                    f"(aten.{fed.op}): data such as learned tokens, not a weight")
        other = next((u for u in self.uses if not u.matrix), None)
        if other is not None:
            return (f"free parameter of {kind}, used by aten.{other.op} in the forward pass (added, "
                    "concatenated, indexed or multiplied elementwise): not a linear map")
        return None

    def _from_predicate(self, result: PredicateResult) -> tuple[Choice, str, LayoutSpec] | None:
        name, shape = self.name, tuple(self.p.shape)
        if result is None:
            return None
        if result == "adamw":
            return "adamw", "chosen by predicate", None
        if result == "muon":
            layout, how = self.default_layout, "chosen by predicate"
        elif isinstance(result, Layout):
            layout = result
        elif isinstance(result, tuple) and len(result) == 2 and result[0] == "muon":
            layout = result[1]
        else:
            raise ValueError(
                f"predicate returned {result!r} for '{name}'; expected 'muon', 'adamw', a muonkit.Layout, "
                "('muon', layout) or None"
            )
        if self.p.ndim < 2:
            raise ValueError(f"predicate sent '{name}' with shape {shape} to Muon; only matrices can go")
        try:
            resolved = resolve(layout, self.p.ndim)
            resolved.check_shape(self.p.shape)
        except ValueError as err:
            raise ValueError(f"predicate gave '{name}' with shape {shape} the layout {layout!r}: {err}") from None
        if result != "muon":
            batch, rows, cols = matrix_shape(self.p.shape, resolved)
            how = f"chosen by predicate: {batch} matrices {rows}x{cols} with layout {layout!r}"
        return "muon", how, layout


# ------------------------------------------------------------------------------ param groups

def param_groups(
    model: nn.Module,
    *,
    muon: Collection[str] = (),
    adamw: Collection[str] = (),
    predicate: Predicate | None = None,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    min_size: int = 2,
    exclude_from_decay: bool = True,
    muon_options: dict[str, Any] | None = None,
    adamw_options: dict[str, Any] | None = None,
    only: Iterable[torch.Tensor | str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for muonkit.Muon: Muon groups by matrix layout, AdamW groups, split by decay.

    Returns plain dicts ({"params", "param_names", "use_muon", ...}) that can be printed, edited
    and passed to muonkit.Muon as they are. `muon_options` / `adamw_options` are merged into the
    Muon / AdamW groups (e.g. {"lr": 0.02}; not "layout", which routing chooses per parameter:
    ValueError). Parameters that are not decayed (see `route`'s
    `exclude_from_decay`) sit in groups of their own with "weight_decay": 0.0, which neither the
    options nor Muon(weight_decay=...) change; the other groups take the weight decay of the options
    or of Muon's constructor.

    `only=` (parameters or names) returns the groups of just those parameters, each judged in the
    whole model (a new head is an output layer, a new block's Linear a hidden one): the groups of a
    module added after the optimizer was built, ready for `opt.add_param_group`.

    Example:
        >>> opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-3, weight_decay=0.1)
        >>> model.head = nn.Linear(768, 10)          # later: a new head
        >>> for group in muonkit.param_groups(model, only=model.head.parameters()):
        ...     opt.add_param_group(group)
    """
    if muon_options and "layout" in muon_options:
        raise ValueError(
            f"param_groups: muon_options={{'layout': {muon_options['layout']!r}}} would replace the layout routing "
            "chose for every Muon parameter (a Conv1D's transposed view, a fused qkv's blocks, stacked experts); "
            "give parameters their layout with predicate= returning a muonkit.Layout, or set 'layout' in one of "
            "the returned groups"
        )
    decisions = route(
        model, muon=muon, adamw=adamw, predicate=predicate,
        example_inputs=example_inputs, min_size=min_size, exclude_from_decay=exclude_from_decay, only=only,
    )
    params = dict(model.named_parameters())
    groups: dict[Any, dict[str, Any]] = {}
    for d in decisions:
        if d.optimizer == "frozen":
            continue
        decayed = d.no_decay is None
        key = ("muon", d.layout, decayed) if d.optimizer == "muon" else ("adamw", decayed)
        if key not in groups:
            extra = (muon_options if d.optimizer == "muon" else adamw_options) or {}
            group: dict[str, Any] = {"params": [], "param_names": [], "use_muon": d.optimizer == "muon"}
            if d.optimizer == "muon":
                group["layout"] = d.layout
            group.update(extra)
            if not decayed:
                group["weight_decay"] = 0.0
            groups[key] = group
        groups[key]["params"].append(params[d.name])
        groups[key]["param_names"].append(d.name)
    return list(groups.values())


def format_table(decisions: Sequence[Decision]) -> str:
    """The routing table: name, shape, optimizer, decay, reason, and a summary line."""
    header = ("Parameter name", "Shape", "Optimizer", "Decay", "Reason")
    rows = [
        (d.name, str(list(d.shape)), {"muon": "Muon", "adamw": "AdamW"}.get(d.optimizer, "-"),
         "-" if d.optimizer == "frozen" else "default" if d.no_decay is None else f"0 ({d.no_decay})",
         d.reason)
        for d in decisions
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = lambda r: "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + f"  {r[4]}"  # noqa: E731
    body = [line(header), "-" * (sum(widths) + 8 + len(header[4]))] + [line(r) for r in rows]
    counts: dict[str, tuple[int, int]] = {}
    for d in decisions:
        n, c = counts.get(d.optimizer, (0, 0))
        counts[d.optimizer] = (n + 1, c + int(torch.Size(d.shape).numel()))
    summary = ", ".join(f"{k}: {n} tensor{'s' * (n != 1)}, {c:,} value{'s' * (c != 1)}"
                        for k, (n, c) in sorted(counts.items()))
    note = ("Decay: 'default' is the weight_decay of the parameter's group (Muon(weight_decay=...), "
            "adamw_weight_decay=, or muon_options/adamw_options); '0 (...)' groups keep weight_decay 0.")
    return "\n".join(body + [summary, note])


def _low_precision_note(model: nn.Module) -> str:
    """A line on how muonkit.Muon writes 16-bit parameters, when the model has any."""
    low = [p for p in model.parameters() if p.requires_grad and p.is_floating_point() and p.dtype.itemsize < 4]
    if not low:
        return ""
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in low}))
    return (f"\n{len(low)} trainable tensors are {dtypes}: muonkit.Muon writes them by stochastic rounding of the "
            "float32 update by default (stochastic_rounding=False for round-to-nearest) and keeps their state in "
            "their own dtype unless state_dtype=torch.float32.")


def _ns_dtype_note(model: nn.Module) -> str:
    """A line on the dtype muonkit.Muon's Newton-Schulz runs in by default on the model's device, and why."""
    device = next((p.device for p in model.parameters() if p.is_floating_point()), torch.device("cpu"))
    return "\n" + default_ns_dtype_reason(device)


def _adamw_kernel_note(model: nn.Module, decisions: Sequence[Decision]) -> str:
    """A line on the AdamW kernel muonkit.Muon's defaults give the model's AdamW parameters, and why
    (muonkit.options.adamw_kernel), when it has any."""
    params = dict(model.named_parameters())
    names = [d.name for d in decisions if d.optimizer == "adamw" and d.name in params]
    if not names:
        return ""
    group = {key: DEFAULTS[source] for key, source in ADAMW_FROM.items()}
    group.update(params=[params[name] for name in names], param_names=names, use_muon=False)
    fused, why = adamw_kernel(group, DEFAULTS["capturable"])
    if fused:
        return (f"\nAdamW groups step with torch's fused AdamW kernel by default ({why}); fused=False gives torch's "
                "default AdamW (torch.optim.AdamW()) bit for bit.")
    return f"\nAdamW groups step with torch's default AdamW by default ({why})."


def explain(
    model: nn.Module,
    *,
    file: TextIO | None = sys.stdout,
    **routing: Any,
) -> str:
    """Print (to `file`, unless None) and return the routing table of `model`.

    Takes the same keyword arguments as `route`.

    Example:
        >>> muonkit.explain(model, example_inputs=(x,))
    """
    decisions = route(model, **routing)
    text = format_table(decisions) + _low_precision_note(model) + _ns_dtype_note(model) + _adamw_kernel_note(model, decisions)
    if file is not None:
        print(text, file=file)
    return text


ROUTING_KEYWORDS = tuple(
    name for name, prm in inspect.signature(param_groups).parameters.items() if prm.kind is prm.KEYWORD_ONLY
)
"""The keyword arguments of param_groups (muonkit.MuonFactory tells them from Muon's)."""
