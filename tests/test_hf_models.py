"""Routing of real transformers (5.x) and peft models built from configs (no downloads).

For each model the whole routing table (optimizer, number of matrices, decay) is checked against
a table written here, with and without example inputs; then the MoE expert reading (gate and up
apart, every way torch multiplies by a stacked weight), output layers by evidence, `only=` for
later additions, LoRA adapters and GPT-2's fused c_attn.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import muonkit
from muonkit.layout import matrix_shape, resolve, to_matrices

transformers = pytest.importorskip("transformers")


def tiny(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A one-block model of each family and the inputs of one forward pass."""
    T = transformers
    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(0, 64, (2, 8))}
    if name in ("llama", "llama-tied", "llama-model"):
        cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=name == "llama-tied")
        return (T.LlamaModel if name == "llama-model" else T.LlamaForCausalLM)(cfg), ids
    if name == "qwen2":
        cfg = T.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
        return T.Qwen2ForCausalLM(cfg), ids
    if name == "qwen3-moe":
        cfg = T.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                               num_experts_per_tok=2, head_dim=8)
        return T.Qwen3MoeForCausalLM(cfg), ids
    if name == "mixtral":
        cfg = T.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        return T.MixtralForCausalLM(cfg), ids
    if name == "phi3":  # fused qkv_proj (q | k | v) and gate_up_proj (gate | up)
        cfg = T.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=0)
        return T.Phi3ForCausalLM(cfg), ids
    if name == "gpt-neox":  # fused query_key_value, q, k, v interleaved per head
        cfg = T.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4)
        return T.GPTNeoXForCausalLM(cfg), ids
    if name == "falcon":  # fused query_key_value, per key/value group: 2 queries, then its k and v
        cfg = T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2,
                             new_decoder_architecture=True)
        return T.FalconForCausalLM(cfg), ids
    if name in ("gpt2", "gpt2-model"):
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
        return (T.GPT2Model if name == "gpt2-model" else T.GPT2LMHeadModel)(cfg), ids
    if name == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=16, num_labels=3)
        return T.BertForSequenceClassification(cfg), ids
    if name == "t5":
        cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4)
        return T.T5ForConditionalGeneration(cfg), {**ids, "decoder_input_ids": ids["input_ids"][:, :4]}
    pixels = {"pixel_values": torch.randn(2, 3, 16, 16)}
    if name in ("vit", "vit-model"):
        cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=48, num_labels=5)
        return (T.ViTModel if name == "vit-model" else T.ViTForImageClassification)(cfg), pixels
    if name == "clip":
        cfg = T.CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, max_position_embeddings=16),
                           vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=1, num_attention_heads=4), projection_dim=16)
        return T.CLIPModel(cfg), {**ids, **pixels}
    if name == "convnext":
        cfg = T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                               image_size=16)
        return T.ConvNextForImageClassification(cfg), pixels
    raise KeyError(name)


def table(model: nn.Module, **routing) -> str:
    """One line per parameter: name, optimizer, number of matrices (Muon) or '-', decay."""
    rows = []
    for d in muonkit.route(model, **routing):
        count = matrix_shape(d.shape, resolve(d.layout, len(d.shape)))[0] if d.optimizer == "muon" else "-"
        rows.append(f"{d.name} {d.optimizer} {count} {'default' if d.no_decay is None else 0}")
    return "\n".join(rows) + "\n"


EXPECTED = {
    "llama": """\
model.embed_tokens.weight adamw - default
model.layers.0.self_attn.q_proj.weight muon 1 default
model.layers.0.self_attn.k_proj.weight muon 1 default
model.layers.0.self_attn.v_proj.weight muon 1 default
model.layers.0.self_attn.o_proj.weight muon 1 default
model.layers.0.mlp.gate_proj.weight muon 1 default
model.layers.0.mlp.up_proj.weight muon 1 default
model.layers.0.mlp.down_proj.weight muon 1 default
model.layers.0.input_layernorm.weight adamw - 0
model.layers.0.post_attention_layernorm.weight adamw - 0
model.norm.weight adamw - 0
lm_head.weight adamw - default
""",
    "llama-tied": """\
model.embed_tokens.weight adamw - default
model.layers.0.self_attn.q_proj.weight muon 1 default
model.layers.0.self_attn.k_proj.weight muon 1 default
model.layers.0.self_attn.v_proj.weight muon 1 default
model.layers.0.self_attn.o_proj.weight muon 1 default
model.layers.0.mlp.gate_proj.weight muon 1 default
model.layers.0.mlp.up_proj.weight muon 1 default
model.layers.0.mlp.down_proj.weight muon 1 default
model.layers.0.input_layernorm.weight adamw - 0
model.layers.0.post_attention_layernorm.weight adamw - 0
model.norm.weight adamw - 0
""",
    "llama-model": """\
embed_tokens.weight adamw - default
layers.0.self_attn.q_proj.weight muon 1 default
layers.0.self_attn.k_proj.weight muon 1 default
layers.0.self_attn.v_proj.weight muon 1 default
layers.0.self_attn.o_proj.weight muon 1 default
layers.0.mlp.gate_proj.weight muon 1 default
layers.0.mlp.up_proj.weight muon 1 default
layers.0.mlp.down_proj.weight muon 1 default
layers.0.input_layernorm.weight adamw - 0
layers.0.post_attention_layernorm.weight adamw - 0
norm.weight adamw - 0
""",
    "qwen2": """\
model.embed_tokens.weight adamw - default
model.layers.0.self_attn.q_proj.weight muon 1 default
model.layers.0.self_attn.q_proj.bias adamw - 0
model.layers.0.self_attn.k_proj.weight muon 1 default
model.layers.0.self_attn.k_proj.bias adamw - 0
model.layers.0.self_attn.v_proj.weight muon 1 default
model.layers.0.self_attn.v_proj.bias adamw - 0
model.layers.0.self_attn.o_proj.weight muon 1 default
model.layers.0.mlp.gate_proj.weight muon 1 default
model.layers.0.mlp.up_proj.weight muon 1 default
model.layers.0.mlp.down_proj.weight muon 1 default
model.layers.0.input_layernorm.weight adamw - 0
model.layers.0.post_attention_layernorm.weight adamw - 0
model.norm.weight adamw - 0
lm_head.weight adamw - default
""",
    "qwen3-moe": """\
model.embed_tokens.weight adamw - default
model.layers.0.self_attn.q_proj.weight muon 1 default
model.layers.0.self_attn.k_proj.weight muon 1 default
model.layers.0.self_attn.v_proj.weight muon 1 default
model.layers.0.self_attn.o_proj.weight muon 1 default
model.layers.0.self_attn.q_norm.weight adamw - 0
model.layers.0.self_attn.k_norm.weight adamw - 0
model.layers.0.mlp.experts.gate_up_proj muon 8 default
model.layers.0.mlp.experts.down_proj muon 4 default
model.layers.0.mlp.gate.weight adamw - default
model.layers.0.input_layernorm.weight adamw - 0
model.layers.0.post_attention_layernorm.weight adamw - 0
model.norm.weight adamw - 0
lm_head.weight adamw - default
""",
    "mixtral": """\
model.embed_tokens.weight adamw - default
model.layers.0.self_attn.q_proj.weight muon 1 default
model.layers.0.self_attn.k_proj.weight muon 1 default
model.layers.0.self_attn.v_proj.weight muon 1 default
model.layers.0.self_attn.o_proj.weight muon 1 default
model.layers.0.mlp.gate.weight adamw - default
model.layers.0.mlp.experts.gate_up_proj muon 8 default
model.layers.0.mlp.experts.down_proj muon 4 default
model.layers.0.input_layernorm.weight adamw - 0
model.layers.0.post_attention_layernorm.weight adamw - 0
model.norm.weight adamw - 0
lm_head.weight adamw - default
""",
    "gpt2": """\
transformer.wte.weight adamw - default
transformer.wpe.weight adamw - default
transformer.h.0.ln_1.weight adamw - 0
transformer.h.0.ln_1.bias adamw - 0
transformer.h.0.attn.c_attn.weight muon 3 default
transformer.h.0.attn.c_attn.bias adamw - 0
transformer.h.0.attn.c_proj.weight muon 1 default
transformer.h.0.attn.c_proj.bias adamw - 0
transformer.h.0.ln_2.weight adamw - 0
transformer.h.0.ln_2.bias adamw - 0
transformer.h.0.mlp.c_fc.weight muon 1 default
transformer.h.0.mlp.c_fc.bias adamw - 0
transformer.h.0.mlp.c_proj.weight muon 1 default
transformer.h.0.mlp.c_proj.bias adamw - 0
transformer.ln_f.weight adamw - 0
transformer.ln_f.bias adamw - 0
""",
    "gpt2-model": """\
wte.weight adamw - default
wpe.weight adamw - default
h.0.ln_1.weight adamw - 0
h.0.ln_1.bias adamw - 0
h.0.attn.c_attn.weight muon 3 default
h.0.attn.c_attn.bias adamw - 0
h.0.attn.c_proj.weight muon 1 default
h.0.attn.c_proj.bias adamw - 0
h.0.ln_2.weight adamw - 0
h.0.ln_2.bias adamw - 0
h.0.mlp.c_fc.weight muon 1 default
h.0.mlp.c_fc.bias adamw - 0
h.0.mlp.c_proj.weight muon 1 default
h.0.mlp.c_proj.bias adamw - 0
ln_f.weight adamw - 0
ln_f.bias adamw - 0
""",
    "bert": """\
bert.embeddings.word_embeddings.weight adamw - default
bert.embeddings.position_embeddings.weight adamw - default
bert.embeddings.token_type_embeddings.weight adamw - default
bert.embeddings.LayerNorm.weight adamw - 0
bert.embeddings.LayerNorm.bias adamw - 0
bert.encoder.layer.0.attention.self.query.weight muon 1 default
bert.encoder.layer.0.attention.self.query.bias adamw - 0
bert.encoder.layer.0.attention.self.key.weight muon 1 default
bert.encoder.layer.0.attention.self.key.bias adamw - 0
bert.encoder.layer.0.attention.self.value.weight muon 1 default
bert.encoder.layer.0.attention.self.value.bias adamw - 0
bert.encoder.layer.0.attention.output.dense.weight muon 1 default
bert.encoder.layer.0.attention.output.dense.bias adamw - 0
bert.encoder.layer.0.attention.output.LayerNorm.weight adamw - 0
bert.encoder.layer.0.attention.output.LayerNorm.bias adamw - 0
bert.encoder.layer.0.intermediate.dense.weight muon 1 default
bert.encoder.layer.0.intermediate.dense.bias adamw - 0
bert.encoder.layer.0.output.dense.weight muon 1 default
bert.encoder.layer.0.output.dense.bias adamw - 0
bert.encoder.layer.0.output.LayerNorm.weight adamw - 0
bert.encoder.layer.0.output.LayerNorm.bias adamw - 0
bert.pooler.dense.weight muon 1 default
bert.pooler.dense.bias adamw - 0
classifier.weight adamw - default
classifier.bias adamw - 0
""",
    "t5": """\
shared.weight adamw - default
encoder.block.0.layer.0.SelfAttention.q.weight muon 1 default
encoder.block.0.layer.0.SelfAttention.k.weight muon 1 default
encoder.block.0.layer.0.SelfAttention.v.weight muon 1 default
encoder.block.0.layer.0.SelfAttention.o.weight muon 1 default
encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight adamw - default
encoder.block.0.layer.0.layer_norm.weight adamw - 0
encoder.block.0.layer.1.DenseReluDense.wi.weight muon 1 default
encoder.block.0.layer.1.DenseReluDense.wo.weight muon 1 default
encoder.block.0.layer.1.layer_norm.weight adamw - 0
encoder.final_layer_norm.weight adamw - 0
decoder.block.0.layer.0.SelfAttention.q.weight muon 1 default
decoder.block.0.layer.0.SelfAttention.k.weight muon 1 default
decoder.block.0.layer.0.SelfAttention.v.weight muon 1 default
decoder.block.0.layer.0.SelfAttention.o.weight muon 1 default
decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight adamw - default
decoder.block.0.layer.0.layer_norm.weight adamw - 0
decoder.block.0.layer.1.EncDecAttention.q.weight muon 1 default
decoder.block.0.layer.1.EncDecAttention.k.weight muon 1 default
decoder.block.0.layer.1.EncDecAttention.v.weight muon 1 default
decoder.block.0.layer.1.EncDecAttention.o.weight muon 1 default
decoder.block.0.layer.1.layer_norm.weight adamw - 0
decoder.block.0.layer.2.DenseReluDense.wi.weight muon 1 default
decoder.block.0.layer.2.DenseReluDense.wo.weight muon 1 default
decoder.block.0.layer.2.layer_norm.weight adamw - 0
decoder.final_layer_norm.weight adamw - 0
""",
    "vit": """\
vit.embeddings.cls_token adamw - 0
vit.embeddings.position_embeddings adamw - 0
vit.embeddings.patch_embeddings.projection.weight adamw - default
vit.embeddings.patch_embeddings.projection.bias adamw - 0
vit.layers.0.attention.q_proj.weight muon 1 default
vit.layers.0.attention.q_proj.bias adamw - 0
vit.layers.0.attention.k_proj.weight muon 1 default
vit.layers.0.attention.k_proj.bias adamw - 0
vit.layers.0.attention.v_proj.weight muon 1 default
vit.layers.0.attention.v_proj.bias adamw - 0
vit.layers.0.attention.o_proj.weight muon 1 default
vit.layers.0.attention.o_proj.bias adamw - 0
vit.layers.0.layernorm_before.weight adamw - 0
vit.layers.0.layernorm_before.bias adamw - 0
vit.layers.0.layernorm_after.weight adamw - 0
vit.layers.0.layernorm_after.bias adamw - 0
vit.layers.0.mlp.fc1.weight muon 1 default
vit.layers.0.mlp.fc1.bias adamw - 0
vit.layers.0.mlp.fc2.weight muon 1 default
vit.layers.0.mlp.fc2.bias adamw - 0
vit.layernorm.weight adamw - 0
vit.layernorm.bias adamw - 0
classifier.weight adamw - default
classifier.bias adamw - 0
""",
    "vit-model": """\
embeddings.cls_token adamw - 0
embeddings.position_embeddings adamw - 0
embeddings.patch_embeddings.projection.weight adamw - default
embeddings.patch_embeddings.projection.bias adamw - 0
layers.0.attention.q_proj.weight muon 1 default
layers.0.attention.q_proj.bias adamw - 0
layers.0.attention.k_proj.weight muon 1 default
layers.0.attention.k_proj.bias adamw - 0
layers.0.attention.v_proj.weight muon 1 default
layers.0.attention.v_proj.bias adamw - 0
layers.0.attention.o_proj.weight muon 1 default
layers.0.attention.o_proj.bias adamw - 0
layers.0.layernorm_before.weight adamw - 0
layers.0.layernorm_before.bias adamw - 0
layers.0.layernorm_after.weight adamw - 0
layers.0.layernorm_after.bias adamw - 0
layers.0.mlp.fc1.weight muon 1 default
layers.0.mlp.fc1.bias adamw - 0
layers.0.mlp.fc2.weight muon 1 default
layers.0.mlp.fc2.bias adamw - 0
layernorm.weight adamw - 0
layernorm.bias adamw - 0
pooler.dense.weight muon 1 default
pooler.dense.bias adamw - 0
""",
    "convnext": """\
convnext.embeddings.patch_embeddings.weight adamw - default
convnext.embeddings.patch_embeddings.bias adamw - 0
convnext.embeddings.layernorm.weight adamw - 0
convnext.embeddings.layernorm.bias adamw - 0
convnext.encoder.stages.0.layers.0.layer_scale_parameter adamw - 0
convnext.encoder.stages.0.layers.0.dwconv.weight muon 1 default
convnext.encoder.stages.0.layers.0.dwconv.bias adamw - 0
convnext.encoder.stages.0.layers.0.layernorm.weight adamw - 0
convnext.encoder.stages.0.layers.0.layernorm.bias adamw - 0
convnext.encoder.stages.0.layers.0.pwconv1.weight muon 1 default
convnext.encoder.stages.0.layers.0.pwconv1.bias adamw - 0
convnext.encoder.stages.0.layers.0.pwconv2.weight muon 1 default
convnext.encoder.stages.0.layers.0.pwconv2.bias adamw - 0
convnext.encoder.stages.1.downsampling_layer.0.weight adamw - 0
convnext.encoder.stages.1.downsampling_layer.0.bias adamw - 0
convnext.encoder.stages.1.downsampling_layer.1.weight muon 1 default
convnext.encoder.stages.1.downsampling_layer.1.bias adamw - 0
convnext.encoder.stages.1.layers.0.layer_scale_parameter adamw - 0
convnext.encoder.stages.1.layers.0.dwconv.weight muon 1 default
convnext.encoder.stages.1.layers.0.dwconv.bias adamw - 0
convnext.encoder.stages.1.layers.0.layernorm.weight adamw - 0
convnext.encoder.stages.1.layers.0.layernorm.bias adamw - 0
convnext.encoder.stages.1.layers.0.pwconv1.weight muon 1 default
convnext.encoder.stages.1.layers.0.pwconv1.bias adamw - 0
convnext.encoder.stages.1.layers.0.pwconv2.weight muon 1 default
convnext.encoder.stages.1.layers.0.pwconv2.bias adamw - 0
convnext.layernorm.weight adamw - 0
convnext.layernorm.bias adamw - 0
classifier.weight adamw - default
classifier.bias adamw - 0
""",}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_routing_table_with_and_without_example_inputs(name):
    model, inputs = tiny(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evidence decides every one of these models: no order warning
        assert table(model) == EXPECTED[name]
        assert table(model, example_inputs=inputs) == EXPECTED[name]


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_experts_are_recognized_whatever_runs_them(name, implementation):
    model, inputs = tiny(name)
    model.set_experts_implementation(implementation)  # eager: F.linear on w[e]; batched_mm: bmm; grouped_mm
    assert table(model, example_inputs=inputs) == EXPECTED[name]
    reasons = {d.name: d.reason for d in muonkit.route(model, example_inputs=inputs)}
    assert "gate and up apart: 2 matrices per expert" in reasons["model.layers.0.mlp.experts.gate_up_proj"]
    assert reasons["model.layers.0.mlp.gate.weight"].startswith("MoE router")


def test_fused_gate_up_is_gate_and_up_apart_per_expert():
    model, _ = tiny("qwen3-moe")
    experts = model.model.layers[0].mlp.experts
    decision = next(d for d in muonkit.route(model) if d.name.endswith("experts.gate_up_proj"))
    w = experts.gate_up_proj.detach()
    matrices = to_matrices(w, resolve(decision.layout, 3))
    inter = w.shape[1] // 2
    expected = [w[e, :inter] for e in range(4)] + [w[e, inter:] for e in range(4)]  # gates, then ups
    assert torch.equal(matrices, torch.stack(expected))


class _Experts(nn.Module):
    """Stacked expert weights (experts, out, in) multiplied the way `how` says."""

    def __init__(self, how: str, experts: int = 4, d: int = 16, hidden: int = 24):
        super().__init__()
        self.how = how
        self.w_in = nn.Parameter(torch.randn(experts, hidden, d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(experts, d, hidden) / hidden**0.5)
        self.bias = nn.Parameter(torch.zeros(experts, 1, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (experts, tokens, d)
        if self.how == "bmm":
            h = torch.bmm(x, self.w_in.transpose(1, 2))
            return torch.bmm(h.relu(), self.w_out.transpose(1, 2))
        if self.how == "baddbmm":
            h = torch.baddbmm(self.bias, x, self.w_in.transpose(1, 2))
            return torch.bmm(h.relu(), self.w_out.transpose(1, 2))
        if self.how == "einsum":
            h = torch.einsum("etd,ehd->eth", x, self.w_in)
            return torch.einsum("eth,edh->etd", h.relu(), self.w_out)
        if self.how == "linear-on-slice":
            outs = []
            for e in range(x.shape[0]):
                index = torch.tensor(e)
                h = nn.functional.linear(x[e], self.w_in[index]).relu()
                outs.append(nn.functional.linear(h, self.w_out[index]))
            return torch.stack(outs)
        if self.how == "index-bmm":  # each token picks its expert's matrices (transformers' batched_mm)
            experts, tokens, d = x.shape
            ids = torch.arange(experts).repeat_interleave(tokens)
            h = torch.bmm(self.w_in[ids], x.reshape(-1, d, 1)).relu()
            return torch.bmm(self.w_out[ids], h).reshape(experts, tokens, d)
        if self.how == "grouped_mm":
            tokens = x.reshape(-1, x.shape[-1])
            offsets = torch.arange(1, x.shape[0] + 1, dtype=torch.int32) * x.shape[1]
            h = torch._grouped_mm(tokens, self.w_in.transpose(1, 2), offs=offsets).relu()
            return torch._grouped_mm(h, self.w_out.transpose(1, 2), offs=offsets)
        raise KeyError(self.how)


@pytest.mark.parametrize("how", ["bmm", "baddbmm", "einsum", "linear-on-slice", "index-bmm", "grouped_mm"])
def test_every_way_to_multiply_by_stacked_experts_is_observed(how):
    model = nn.Sequential(nn.Linear(16, 16), _Experts(how), nn.Linear(16, 8))
    decisions = {d.name: d for d in muonkit.route(model, example_inputs=(torch.randn(4, 5, 16),))}
    for name, rows, cols in (("1.w_in", 24, 16), ("1.w_out", 16, 24)):
        d = decisions[name]
        assert d.optimizer == "muon", d.reason
        assert matrix_shape(d.shape, resolve(d.layout, 3)) == (4, rows, cols), d.reason
    assert decisions["1.bias"].optimizer == "adamw"
    without = {d.name: d.optimizer for d in muonkit.route(model)}
    assert without["1.w_in"] == "adamw"  # a custom module's free tensor needs example_inputs


def test_headless_backbone_keeps_its_last_block_and_no_warning():
    for name, last in (("llama-model", "layers.0.mlp.down_proj.weight"), ("gpt2-model", "h.0.mlp.c_proj.weight"),
                       ("vit-model", "layers.0.mlp.fc2.weight")):
        model, inputs = tiny(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for routing in ({}, {"example_inputs": inputs}):
                d = next(d for d in muonkit.route(model, **routing) if d.name == last)
                assert d.optimizer == "muon" and d.reason.startswith("hidden"), (name, d.reason)


class _HeadFirst(nn.Module):
    """A wrapper that registers its head before the backbone."""

    def __init__(self, head_name: str):
        super().__init__()
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(32, 3))
        self.backbone = tiny("llama-model")[0]

    def forward(self, input_ids):
        hidden = self.backbone(input_ids=input_ids).last_hidden_state
        return getattr(self, self.head_name)(hidden[:, -1])


@pytest.mark.parametrize("head_name", ["head", "proj"])
def test_a_head_registered_before_the_backbone(head_name):
    model = _HeadFirst(head_name)
    inputs = (torch.randint(0, 64, (2, 8)),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        routes = [muonkit.route(model, example_inputs=inputs)]
        if head_name == "head":  # a known head attribute: evidence without example_inputs too
            routes.append(muonkit.route(model))
    for decisions in routes:
        by_name = {d.name: d for d in decisions}
        assert by_name[f"{head_name}.weight"].optimizer == "adamw"
        assert by_name[f"{head_name}.weight"].reason.startswith("output layer"), by_name[f"{head_name}.weight"].reason
        assert by_name["backbone.layers.0.mlp.down_proj.weight"].optimizer == "muon"
        assert not any(d.reason.startswith("input stem") for d in decisions)


def test_order_alone_warns_once_and_says_so():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="order alone") as caught:
        text = muonkit.explain(model, file=None)
    assert len(caught) == 1
    assert "only order is left" in text
    # Once per model: param_groups after explain (README's pattern) warned a second time.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        muonkit.param_groups(model)
    with pytest.warns(UserWarning, match="order alone"):
        muonkit.param_groups(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))  # another model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decisions = muonkit.route(model, example_inputs=(torch.randn(2, 8),))  # the forward pass is evidence
    assert decisions[2].reason == ("output layer (Linear): its output is the model's output in the forward pass "
                                   "over example_inputs")


def test_only_routes_a_later_addition_judged_in_the_whole_model():
    model, inputs = tiny("llama-model")
    opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-3)
    model.head = nn.Linear(32, 5)
    model.adapter = nn.Linear(32, 32)
    groups = muonkit.param_groups(model, only=[*model.head.parameters(), *model.adapter.parameters()])
    assert sorted(n for g in groups for n in g["param_names"]) == ["adapter.bias", "adapter.weight", "head.bias",
                                                                  "head.weight"]
    by_name = {d.name: d for d in muonkit.route(model, only=model.head.parameters())}
    assert set(by_name) == {"head.weight", "head.bias"}
    assert by_name["head.weight"].reason == "output layer (Linear): the last layer of the head 'head'"
    adapter = muonkit.route(model, only=["adapter.weight"])[0]
    assert adapter.optimizer == "muon" and adapter.reason == "hidden Linear weight 32x32"
    for g in groups:
        opt.add_param_group(g)
    model.head(model(**inputs).last_hidden_state).sum().backward()
    opt.step()
    text = muonkit.explain(model, only=model.head.parameters(), file=None)
    assert "head.weight" in text and "layers.0" not in text
    with pytest.raises(ValueError, match=r"only=: a tensor of shape \(3, 3\) is not a parameter of the model"):
        muonkit.param_groups(model, only=[nn.Parameter(torch.zeros(3, 3))])


def test_lora_adapters_are_recognized_and_routed_by_the_measured_rule():
    peft = pytest.importorskip("peft")
    model, inputs = tiny("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for routing in ({}, {"example_inputs": inputs}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            decisions = muonkit.route(model, **routing)
        trained = {d.name: d for d in decisions if d.optimizer != "frozen"}
        assert sorted(trained) == sorted(
            f"base_model.model.model.layers.0.{m}.lora_{ab}.default.weight"
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB")
        for name, d in trained.items():
            assert d.optimizer == muonkit.partition.LORA_ADAPTERS
            assert d.reason.startswith(f"LoRA adapter lora_{'A' if '.lora_A.' in name else 'B'}"), d.reason
        frozen = [d.name for d in decisions if d.optimizer == "frozen"]
        assert "base_model.model.lm_head.weight" in frozen
    groups = muonkit.param_groups(model)
    opt = muonkit.Muon(groups, lr=1e-2)
    model(**inputs).logits.sum().backward()
    opt.step()


@pytest.mark.parametrize("name, targets", [("convnext", ["downsampling_layer.1"]), ("llama", ["embed_tokens"])])
def test_lora_adapters_of_conv_and_embedding_layers_follow_the_same_rule(name, targets):
    """LoRA on a Conv2d makes conv adapters (lora_A (r, in, k, k), lora_B (out, r, 1, 1)), on an
    Embedding ParameterDict entries (lora_embedding_A / _B): they went to Muon as hidden conv filters,
    and the embedding's lora_B to Muon with example inputs only (AdamW without), where every Linear
    adapter follows the measured rule. Now all of them do, with and without inputs."""
    peft = pytest.importorskip("peft")
    model, inputs = tiny(name)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
    for routing in ({}, {"example_inputs": inputs}):
        trained = [d for d in muonkit.route(model, **routing) if d.optimizer != "frozen"]
        assert len(trained) == 2
        for d in trained:
            assert d.optimizer == muonkit.partition.LORA_ADAPTERS and d.reason.startswith("LoRA adapter lora_"), d


def test_gpt2_c_attn_trained_through_peft_modules_to_save_is_still_q_k_and_v_apart():
    """PEFT's modules_to_save trains a copy of c_attn inside a ModulesToSaveWrapper: the same fused
    weight, so the same 3 matrices (it was read as one 96 x 32 matrix), with and without inputs."""
    peft = pytest.importorskip("peft")
    model, inputs = tiny("gpt2")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_fc"], fan_in_fan_out=True,
                                                       modules_to_save=["c_attn"]))
    for routing in ({}, {"example_inputs": inputs}):
        d = next(d for d in muonkit.route(model, **routing) if d.name.endswith("c_attn.modules_to_save.default.weight"))
        assert d.optimizer == "muon" and d.layout == muonkit.Layout(rows=(1,), cols=(0,), blocks=((1, 3),)), d
        assert "3 matrices 32x32 (q, k and v" in d.reason


def test_gpt2_c_attn_is_q_k_and_v_apart():
    model, _ = tiny("gpt2-model")
    d = next(d for d in muonkit.route(model) if d.name == "h.0.attn.c_attn.weight")
    assert d.reason == ("hidden fused attention weight (transformers Conv1D c_attn) 3 matrices 32x32 (q, k and v: "
                        "3 matrices out x in; stored (in, 3 * out))")
    w = model.h[0].attn.c_attn.weight.detach()  # (in, 3 * out)
    matrices = to_matrices(w, resolve(d.layout, 2))
    for i in range(3):
        assert torch.equal(matrices[i], w[:, 32 * i: 32 * (i + 1)].T)


FUSED = {  # name: {fused weight: (matrices, the model's split of its rows, from its modeling file)}
    "phi3": {"model.layers.0.self_attn.qkv_proj.weight": (8, "q | k | v: 4 query heads, then 2 k, then 2 v heads"),
             "model.layers.0.mlp.gate_up_proj.weight": (2, "gate | up: up_states.chunk(2, dim=-1)")},
    "gpt-neox": {"gpt_neox.layers.0.attention.query_key_value.weight": (12, "per head: q, k, v of 8 rows each")},
    "falcon": {"transformer.h.0.self_attention.query_key_value.weight": (8, "per kv group: 2 q heads, k, v")},
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_linears_are_cut_where_the_model_splits_them(name):
    """Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's and Falcon's query_key_value are Linears whose
    output the model splits into q, k and v (or gate and up); they were one matrix each, q, k and v
    orthogonalized together. Now one matrix per head's q, k or v (head_dim rows: the only equal
    blocks that never straddle a boundary of any of these layouts) and gate and up apart, with and
    without example inputs, and explain() says so; the other Linears stay one matrix."""
    model, inputs = tiny(name)
    for routing in ({}, {"example_inputs": inputs}):
        decisions = {d.name: d for d in muonkit.route(model, **routing)}
        for weight, (count, _) in FUSED[name].items():
            d = decisions[weight]
            assert d.optimizer == "muon" and d.layout == muonkit.Layout.per_block(count), d
            assert f"{count} matrices" in d.reason and "fused" in d.reason, d.reason
        others = [d for n, d in decisions.items() if d.optimizer == "muon" and n not in FUSED[name]]
        assert others and all(d.layout == "stacked" for d in others), others
    text = muonkit.explain(model, file=None)
    assert "one matrix per head's q, k or v" in text


def test_qwen3_next_query_and_output_gate_are_apart():
    """Qwen3-Next's full attention computes each head's query and output gate with one q_proj
    (`q_proj(x).view(..., heads, 2 * head_dim).chunk(2, dim=-1)`): one matrix per head's query or gate
    (8 matrices 8x32 for 4 heads of 8), with and without inputs; k_proj and v_proj stay one matrix."""
    T = transformers
    torch.manual_seed(0)
    cfg = T.Qwen3NextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                            layer_types=["full_attention"])
    model = T.Qwen3NextForCausalLM(cfg)
    for routing in ({}, {"example_inputs": (torch.randint(0, 64, (1, 8)),)}):
        decisions = {d.name: d for d in muonkit.route(model, **routing)}
        q = decisions["model.layers.0.self_attn.q_proj.weight"]
        assert q.layout == muonkit.Layout.per_block(8) and "query and output gate" in q.reason, q
        for name in ("k_proj", "v_proj", "o_proj"):
            assert decisions[f"model.layers.0.self_attn.{name}.weight"].layout == "stacked"


def test_an_output_projection_the_size_of_a_fused_qkv_is_not_cut():
    """A Llama whose hidden size is (heads + 2 * kv_heads) * head_dim (48 = (4 + 2) * 8): its o_proj has
    the out size of a fused q, k, v projection, but the module has separate k and v projections."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    model = transformers.LlamaForCausalLM(cfg)
    d = {d.name: d for d in muonkit.route(model)}["model.layers.0.self_attn.o_proj.weight"]
    assert d.layout == "stacked" and d.reason == "hidden Linear weight 48x32", d


def test_a_config_with_per_layer_head_counts_routes_each_projection_as_one_matrix():
    """EmbeddingGemma 2's config holds head_dim and num_key_value_heads per layer: reading them from
    the global config raises (transformers' AmbiguousGlobalPerLayerAttributeError, a RuntimeError),
    and param_groups raised it while looking for fused q/k/v Linears (on any Linear: an MLP's too).
    The counts are unknown there, so nothing is read as fused: q, k, v and the MLP's Linears stay
    one matrix each, as before the fused reading existed."""
    config_class = getattr(transformers, "EmbeddingGemma2TextConfig", None)
    if config_class is None:
        pytest.skip("this transformers has no EmbeddingGemma 2")
    cfg = config_class(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, hidden_size_per_layer_input=8, global_head_dim=16,
                       sliding_window_pattern=2)
    torch.manual_seed(0)
    model = transformers.EmbeddingGemma2TextModel(cfg)
    decisions = {d.name: d for d in muonkit.route(model)}
    for layer in (0, 1):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"):
            d = decisions[f"layers.{layer}.{name}.weight"]
            assert d.optimizer == "muon" and d.layout == "stacked" and "fused" not in d.reason, d


def test_clip_towers_stem_and_projections_are_the_same_with_and_without_inputs():
    """CLIP's vision tower comes after the text tower in registration order: without example inputs its
    patch embedding (the conv reading the pixels) was a hidden conv filter for Muon and the two
    projections, whose outputs are the embeddings the loss compares, hidden Linears; with inputs
    all three go to AdamW. Each nested transformers model now has its own first layer as a stem,
    and a dual encoder's projections are heads: the same table either way, and no order warning."""
    model, inputs = tiny("clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table(model) == table(model, example_inputs=inputs)
    decisions = {d.name: d for d in muonkit.route(model)}
    assert decisions["vision_model.embeddings.patch_embedding.weight"].reason == (
        "input stem (Conv2d): the first Conv2d of 'vision_model' in registration order")
    for name in ("visual_projection", "text_projection"):
        assert decisions[f"{name}.weight"].reason == f"output layer (Linear): the last layer of the head '{name}'"
    assert decisions["vision_model.encoder.layers.0.self_attn.q_proj.weight"].optimizer == "muon"


@pytest.mark.parametrize("task", ["ForMaskedLM", "ForSequenceClassification"])
def test_a_head_attribute_that_feeds_the_output_layer_beside_it_is_hidden(task):
    """ModernBERT keeps a dense transform in `head` and the output layer beside it (`decoder`, tied to the
    embedding; `classifier`): the head's dense layer was an "output layer" by its attribute name, so
    AdamW, where BERT's same transform (cls.predictions.transform.dense) is hidden, on Muon."""
    T = transformers
    cfg = T.ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                             sep_token_id=2, num_labels=3)
    torch.manual_seed(0)
    model = getattr(T, f"ModernBert{task}")(cfg)
    for routing in ({}, {"example_inputs": {"input_ids": torch.randint(3, 64, (2, 8))}}):
        decisions = {d.name: d for d in muonkit.route(model, **routing)}
        assert decisions["head.dense.weight"].reason == "hidden Linear weight 32x32"
        out = decisions.get("classifier.weight") or decisions["model.embeddings.tok_embeddings.weight"]
        assert out.optimizer == "adamw", out


def test_intermediate_states_a_model_returns_do_not_make_output_layers():
    """LLaVA returns its projected image features beside the logits (`image_outputs`): with example
    inputs, the projector's last Linear, whose output that is, was an "output layer" on AdamW (a
    hidden Linear on Muon without inputs). The outputs proper of a ModelOutput are its tensor fields
    but hidden and attention states; the table is the same with and without inputs."""
    T = transformers
    torch.manual_seed(0)
    cfg = T.LlavaConfig(vision_config=dict(model_type="clip_vision_model", image_size=16, patch_size=8, hidden_size=32,
                                           intermediate_size=48, num_hidden_layers=1, num_attention_heads=4),
                        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
                        image_token_index=63)
    model = T.LlavaForConditionalGeneration(cfg)
    inputs = {"input_ids": torch.tensor([[1, 63, 63, 63, 63, 5, 6, 7]]), "pixel_values": torch.randn(1, 3, 16, 16)}
    assert "image_outputs" in model(**inputs) or "image_hidden_states" in model(**inputs)
    assert table(model) == table(model, example_inputs=inputs)
    decisions = {d.name: d for d in muonkit.route(model, example_inputs=inputs)}
    assert decisions["model.multi_modal_projector.linear_2.weight"].reason == "hidden Linear weight 32x32"
    assert decisions["lm_head.weight"].reason.startswith("output layer (Linear): its output is the model's output")


def test_detr_class_and_box_heads_are_output_layers_with_and_without_inputs():
    """DETR's heads: without example inputs its classifier (num_labels + 1 outputs: no config size)
    and box MLP had no evidence and went to Muon; with inputs the box MLP still did, its output
    reaching pred_boxes through a sigmoid. Both are heads now, either way."""
    T = transformers
    torch.manual_seed(0)
    backbone = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    cfg = T.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                       encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_labels=3)
    model = T.DetrForObjectDetection(cfg)
    for routing in ({}, {"example_inputs": {"pixel_values": torch.randn(1, 3, 64, 64)}}):
        decisions = {d.name: d for d in muonkit.route(model, **routing)}
        for name in ("class_labels_classifier.weight", "bbox_predictor.layers.2.weight"):
            assert decisions[name].reason.startswith("output layer"), decisions[name]
        assert decisions["bbox_predictor.layers.1.weight"].optimizer == "muon"


def test_phi3_qkv_trained_through_peft_modules_to_save_is_still_cut_per_head():
    """PEFT's modules_to_save trains a copy of qkv_proj two modules below the attention module
    (qkv_proj.modules_to_save.default): the same fused weight, the same 8 matrices."""
    peft = pytest.importorskip("peft")
    model, inputs = tiny("phi3")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["o_proj"], modules_to_save=["qkv_proj"]))
    for routing in ({}, {"example_inputs": inputs}):
        d = {d.name: d for d in muonkit.route(model, **routing)}[
            "base_model.model.model.layers.0.self_attn.qkv_proj.modules_to_save.default.weight"]
        assert d.optimizer == "muon" and d.layout == muonkit.Layout.per_block(8), d


def test_one_muon_step_on_fused_linears_against_per_block_polar_factors():
    """Oracle: one Muon step (exact polar factor, "mup" scale) on Phi-3's qkv_proj and gate_up_proj
    and GPT-NeoX's query_key_value equals float64 polar factors of each head's q, k and v rows
    (head_dim = 8 rows each) and of the gate and up halves, written here from the modeling files."""
    phi3, _ = tiny("phi3")
    neox, _ = tiny("gpt-neox")
    qkv, gate_up = phi3.model.layers[0].self_attn.qkv_proj.weight, phi3.model.layers[0].mlp.gate_up_proj.weight
    fused = neox.gpt_neox.layers[0].attention.query_key_value.weight
    params = {qkv: 8, gate_up: 48, fused: 8}  # rows of one matrix
    for m in (phi3, neox):
        opt = muonkit.Muon(muonkit.param_groups(m, muon_options={"scale": "mup", "orthogonalizer": "svd"}),
                           lr=0.01, weight_decay=0.0)
        grads = {p: torch.randn_like(p) for p in params if any(p is q for q in m.parameters())}
        before = {p: p.detach().clone() for p in grads}
        for p, g in grads.items():
            p.grad = g.clone()
        opt.step()
        for p, g in grads.items():
            step = (before[p] - p.detach()).double() / 0.01
            rows = params[p]
            for start in range(0, p.shape[0], rows):
                block = g[start:start + rows]
                torch.testing.assert_close(step[start:start + rows], polar64(block) * (rows / block.shape[1]) ** 0.5,
                                           rtol=0, atol=1e-5)


def test_bench_hf_lm_end_to_end(tmp_path, capsys):
    import json

    from muonkit.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    assert main(["bench", "hf-lm", "--hf-config", "qwen3-moe", "--text", str(text), "--steps", "3", "--quiet",
                 "--threads", "1", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(results["summary"]) == ["adamw", "muon", "normuon"]
    assert "| muon |" in capsys.readouterr().out
    assert main(["explain", "hf-lm", "--hf-config", "gpt2", "--text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn.weight" in out and "3 matrices" in out
    # GPT-2 ties its head to the token embedding: no row of its own, named on the embedding's row.
    assert not any(line.startswith("lm_head") for line in out.splitlines())
    assert "also lm_head.weight (tied: the same tensor)" in out


def test_bench_hf_lm_config_path_and_errors(tmp_path, capsys, monkeypatch):
    from muonkit.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("abcdefgh " * 400, encoding="utf-8")
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,'
                      ' "num_attention_heads": 4}', encoding="utf-8")
    assert main(["explain", "hf-lm", "--hf-config", str(config), "--text", str(text)]) == 0
    assert "model.layers.0.mlp.down_proj.weight" in capsys.readouterr().out
    assert main(["explain", "hf-lm", "--hf-config", "nope"]) == 2
    assert "neither a preset (llama, qwen2, qwen3-moe, gpt2, phi3) nor a config.json file" in capsys.readouterr().err
    assert main(["explain", "charlm", "--hf-config", "llama"]) == 2
    assert "--hf-config is for hf-lm only" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if it were not installed
    assert main(["bench", "hf-lm", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == "muonkit: error: hf-lm needs transformers: pip install 'muonkit[hf]'\n"


def test_hf_lm_phi3_preset_builds(tmp_path):
    """The phi3 preset (benchmarks/fused_rule.py): a Phi-3 whose fused weights are read per head and
    as gate and up apart, and whose forward pass runs on the text's vocabulary."""
    from muonkit.tasks.base import DataOptions
    from muonkit.tasks.hflm import HFLM

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    task = HFLM()
    data = task.load(DataOptions(text=text, hf_config="phi3"), torch.device("cpu"))
    model = task.model(data)
    assert type(model).__name__ == "Phi3ForCausalLM"
    fused = ("qkv_proj.weight", "gate_up_proj.weight")
    blocks = {d.name: d.layout.blocks for d in muonkit.route(model) if d.name.endswith(fused)}
    assert blocks == {f"model.layers.{i}.{m}": b for i in range(2) for m, b in
                      (("self_attn.qkv_proj.weight", ((0, 8),)), ("mlp.gate_up_proj.weight", ((0, 2),)))}
    inputs, targets = task.batch(data, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(task.loss(model, inputs, targets))


def test_a_head_name_below_the_top_is_not_a_head():
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.fc = nn.Linear(8, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.inp(x).relu()).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.out = Body(), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.body(x))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decisions = {d.name: d for d in muonkit.route(Net(), example_inputs=(torch.randn(2, 8),))}
    assert decisions["body.fc.weight"].optimizer == "muon", decisions["body.fc.weight"].reason
    assert decisions["out.weight"].reason.startswith("output layer")
    assert decisions["body.inp.weight"].reason == (
        "input stem (Linear): it reads the model's input in the forward pass over example_inputs")


def polar64(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u @ vh


def test_one_muon_step_on_experts_and_c_attn_against_per_matrix_polar_factors():
    """Oracle: one Muon step (exact polar factor, "mup" scale sqrt(rows/cols), which tells rows from
    cols) equals float64 polar factors of each expert's gate, up and down matrices and of GPT-2's
    q, k, v blocks, written here from the transformers storage conventions."""
    moe, _ = tiny("qwen3-moe")
    gpt2, _ = tiny("gpt2-model")
    experts, attn = moe.model.layers[0].mlp.experts, gpt2.h[0].attn.c_attn
    params = (experts.gate_up_proj, experts.down_proj, attn.weight)
    opts = [muonkit.Muon(muonkit.param_groups(m, muon_options={"scale": "mup", "orthogonalizer": "svd"}),
                         lr=0.01, weight_decay=0.0) for m in (moe, gpt2)]
    grads = {p: torch.randn_like(p) for p in params}
    before = {p: p.detach().clone() for p in params}
    for p, g in grads.items():
        p.grad = g.clone()
    for opt in opts:
        opt.step()
    step = {p: (before[p] - p.detach()).double() / 0.01 for p in params}

    inter = experts.gate_up_proj.shape[1] // 2  # (experts, 2 * inter, hidden): gate rows, then up rows
    for e in range(4):
        for rows in (slice(0, inter), slice(inter, 2 * inter)):
            g = grads[experts.gate_up_proj][e, rows]
            torch.testing.assert_close(step[experts.gate_up_proj][e, rows], polar64(g) * (inter / g.shape[1]) ** 0.5,
                                       rtol=0, atol=1e-5)
        g = grads[experts.down_proj][e]  # (hidden, inter)
        torch.testing.assert_close(step[experts.down_proj][e], polar64(g) * (g.shape[0] / g.shape[1]) ** 0.5,
                                   rtol=0, atol=1e-5)
    for i in range(3):  # (in, 3 * out): q, k, v columns; each matrix out x in
        cols = slice(32 * i, 32 * (i + 1))
        g = grads[attn.weight][:, cols].T
        torch.testing.assert_close(step[attn.weight][:, cols], polar64(g).T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_inputs", [False, True])
def test_llama4_router_goes_to_adamw_like_every_moe_router(with_inputs):
    """Llama 4's experts (Llama4TextExperts) have num_experts but no is_transposed: its router
    (feed_forward.router, a Linear with one row per expert) is still an MoE router (docs/API.md, rule 4)."""
    T = transformers
    if not hasattr(T, "Llama4ForCausalLM"):
        pytest.skip("this transformers has no Llama 4")
    torch.manual_seed(0)
    cfg = T.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)
    model = T.Llama4ForCausalLM(cfg)
    inputs = {"example_inputs": (torch.randint(0, 64, (1, 8)),)} if with_inputs else {}
    router = {d.name: d for d in muonkit.route(model, **inputs)}["model.layers.0.feed_forward.router.weight"]
    assert router.optimizer == "adamw" and router.reason.startswith("MoE router"), router


@pytest.mark.parametrize("with_inputs", [False, True])
def test_a_router_one_level_inside_its_gating_module_goes_to_adamw(with_inputs):
    """JetMoE's routers (the MoE's and the mixture of attention's) are the Linear `layer` inside a
    JetMoeTopKGating beside the experts: one row per expert, but not the gating module's own
    parameter, so they were hidden Linears on Muon."""
    T = transformers
    torch.manual_seed(0)
    cfg = T.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8,
                         intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    model = T.JetMoeForCausalLM(cfg)
    inputs = {"example_inputs": (torch.randint(0, 64, (1, 8)),)} if with_inputs else {}
    decisions = {d.name: d for d in muonkit.route(model, **inputs)}
    for name in ("mlp.router.layer.weight", "self_attention.experts.router.layer.weight"):
        d = decisions[f"model.layers.0.{name}"]
        assert d.optimizer == "adamw" and d.reason.startswith("MoE router of JetMoeMo"), d
    assert decisions["model.layers.0.self_attention.kv_proj.weight"].optimizer == "muon"


@pytest.mark.parametrize("with_inputs", [False, True])
def test_gpt_oss_expert_biases_are_not_decayed_like_every_other_bias(with_inputs):
    """GptOssExperts keeps one bias vector per expert, (experts, out): biases, so weight decay 0 as the
    1D biases beside them (exclude_from_decay); they were decayed because they are 2D."""
    T = transformers
    torch.manual_seed(0)
    cfg = T.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    model = T.GptOssForCausalLM(cfg)
    inputs = {"example_inputs": (torch.randint(0, 64, (1, 8)),)} if with_inputs else {}
    decisions = {d.name: d for d in muonkit.route(model, **inputs)}
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        d = decisions[f"model.layers.0.mlp.experts.{name}"]
        assert d.optimizer == "adamw" and d.no_decay is not None and "bias" in d.no_decay, d
    assert decisions["model.layers.0.mlp.experts.gate_up_proj"].no_decay is None
    assert decisions["model.layers.0.mlp.router.weight"].no_decay is None
    groups = muonkit.param_groups(model, **inputs)
    undecayed = [n for g in groups if g.get("weight_decay") == 0.0 for n in g["param_names"]]
    assert "model.layers.0.mlp.experts.down_proj_bias" in undecayed
