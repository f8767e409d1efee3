"""Contracts of muonkit.qkclip: the chunked max-logit helper and QK-Clip.

Oracles and tolerances:
- attention_max_logits against dense float64 logits written here from the definition (GQA by
  repeat_interleave, causal mask j <= i); the same dense logits, through softmax and @ v, must
  reproduce F.scaled_dot_product_attention, which ties the definition to what SDPA computes.
  Tolerance 1e-5 relative (the helper works in float32).
- QK-Clip: the max logits recomputed from the rescaled weights on the same inputs are <= tau for
  every clipped head (equal to tau within 1e-5 relative, float32 round-off of the rows and of the
  logits), rows of heads not clipped are bit-identical, and the rows of a clipped head equal the
  old rows times the factor the rule gives (written out here), to 1 float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed_worker as worker
from muonkit.diagnostics import LiveBytes
from muonkit.qkclip import QKClip, attention_max_logits

RTOL = 1e-5


# ------------------------------------------------------------------------------- the helper


def dense_max_logits(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, is_causal: bool = False):
    """(logits (b, heads, T_q, T_k) in float64 with -inf where masked, per-head max)."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        logits = logits.masked_fill(~keep, -math.inf)
    return logits, logits.amax(dim=(0, 2, 3))


CASES = [  # (batch, heads, kv_heads, T_q, T_k, head_dim)
    (2, 4, 4, 9, 9, 8),
    (3, 6, 2, 13, 13, 5),
    (1, 4, 1, 7, 11, 4),
    (2, 2, 2, 11, 6, 3),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("block_size", [1, 3, 4, 256])
def test_max_logits_equal_dense_reference(case, is_causal, block_size):
    b, h, kv, tq, tk, d = case
    q, k = torch.randn(b, h, tq, d) * 3, torch.randn(b, kv, tk, d) * 3
    _, want = dense_max_logits(q, k, is_causal=is_causal)
    got = attention_max_logits(q, k, is_causal=is_causal, block_size=block_size)
    assert got.shape == (h,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_dense_reference_is_what_sdpa_computes(case, is_causal):
    """softmax(reference logits) @ v equals SDPA's output: same head pairing, mask and scale."""
    b, h, kv, tq, tk, d = case
    q, k, v = torch.randn(b, h, tq, d).double(), torch.randn(b, kv, tk, d).double(), torch.randn(b, kv, tk, d).double()
    logits, _ = dense_max_logits(q, k, scale=0.3, is_causal=is_causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.3, enable_gqa=True)
    got = logits.softmax(-1) @ v.repeat_interleave(h // kv, dim=1)
    torch.testing.assert_close(got, want)
    mine = attention_max_logits(q, k, scale=0.3, is_causal=is_causal, block_size=4)
    assert mine.dtype == torch.float64
    torch.testing.assert_close(mine, logits.amax(dim=(0, 2, 3)))


def test_max_logits_include_scale_and_negative_values():
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    _, want = dense_max_logits(-q.abs(), k.abs(), scale=2.0)  # every logit negative
    got = attention_max_logits(-q.abs(), k.abs(), scale=2.0)
    assert (got < 0).all()
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=0)


def test_max_logits_never_form_the_whole_logit_matrix():
    """Peak memory of the helper stays far below one (b, heads, T, T) float32 matrix, which the
    same call with one block as large as T does reach (so the measurement can see it)."""
    b, h, t, d = 1, 2, 512, 8
    q, k = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    whole = b * h * t * t * 4
    with LiveBytes() as chunked:
        attention_max_logits(q, k, is_causal=True, block_size=64)
    with LiveBytes() as single:
        attention_max_logits(q, k, is_causal=True, block_size=t)
    assert single.peak >= whole
    assert chunked.peak < whole / 8


def test_max_logits_empty_and_no_grad():
    assert torch.equal(attention_max_logits(torch.randn(1, 2, 0, 4), torch.randn(1, 2, 3, 4)),
                       torch.full((2,), -math.inf))
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    assert not attention_max_logits(q, torch.randn(1, 1, 3, 4)).requires_grad


@pytest.mark.parametrize(("q_shape", "k_shape", "kwargs", "match"), [
    ((2, 4, 5), (2, 4, 5), {}, "shape"),
    ((1, 4, 5, 8), (2, 4, 5, 8), {}, "batch and head_dim"),
    ((1, 4, 5, 8), (1, 4, 5, 7), {}, "batch and head_dim"),
    ((1, 4, 5, 8), (1, 3, 5, 8), {}, "must divide"),
    ((1, 4, 5, 8), (1, 4, 5, 8), {"block_size": 0}, "block_size"),
    ((1, 4, 5, 8), (1, 4, 5, 8), {"scale": math.nan}, "scale"),
])
def test_max_logits_errors(q_shape, k_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_max_logits(torch.randn(q_shape), torch.randn(k_shape), **kwargs)


# ------------------------------------------------------------------------------------- QKClip

C = 12  # model width of the toy attention layers


def layer_logits(x, q_w, k_w, q_b, k_b, heads, kv_heads):
    """Per-head max logits of one causal attention layer on x (b, T, C)."""
    b, t, _ = x.shape
    q = F.linear(x, q_w, q_b).view(b, t, heads, -1).transpose(1, 2)
    k = F.linear(x, k_w, k_b).view(b, t, kv_heads, -1).transpose(1, 2)
    return attention_max_logits(q, k, is_causal=True)


def split_qkv(w, heads, kv_heads):
    d = w.shape[0] // (heads + 2 * kv_heads)
    return w[: heads * d], w[heads * d:(heads + kv_heads) * d], w[(heads + kv_heads) * d:]


def make_layer(heads, kv_heads, d, *, bias=True, gain=4.0):
    """q/k weights and biases whose heads have clearly different max logits."""
    q_w = torch.randn(heads * d, C) * gain
    q_w *= torch.linspace(0.3, 1.5, heads).repeat_interleave(d)[:, None]
    k_w = torch.randn(kv_heads * d, C) * gain
    q_b = torch.randn(heads * d) if bias else None
    k_b = torch.randn(kv_heads * d) if bias else None
    return q_w, k_w, q_b, k_b


def tau_between(maxima: torch.Tensor) -> float:
    """A tau that some heads exceed and some do not."""
    s = maxima.sort().values
    tau = float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)
    assert (maxima > tau).any() and (maxima < tau).any()
    return tau


def head_rows(t, head, d):
    return t[head * d:(head + 1) * d]


def check_clip(before, after, maxima_before, maxima_after, tau, q_factor, k_factor, heads, kv_heads, d):
    """Rows scaled by the expected factors (1: bit-identical) and recomputed maxima within tau."""
    q_w, k_w, q_b, k_b = before
    q_w2, k_w2, q_b2, k_b2 = after
    for h in range(heads):
        f = q_factor(h)
        for old, new in ((q_w, q_w2), (q_b, q_b2)):
            if old is None:
                continue
            if f == 1.0:
                assert torch.equal(head_rows(new, h, d), head_rows(old, h, d)), f"query head {h} changed"
            else:
                torch.testing.assert_close(head_rows(new, h, d), head_rows(old, h, d) * f, rtol=1.2e-7, atol=0)
    for g in range(kv_heads):
        f = k_factor(g)
        for old, new in ((k_w, k_w2), (k_b, k_b2)):
            if old is None:
                continue
            if f == 1.0:
                assert torch.equal(head_rows(new, g, d), head_rows(old, g, d)), f"key head {g} changed"
            else:
                torch.testing.assert_close(head_rows(new, g, d), head_rows(old, g, d) * f, rtol=1.2e-7, atol=0)
    for h in range(heads):
        if maxima_before[h] > tau:
            assert maxima_after[h] <= tau * (1 + RTOL), (h, float(maxima_after[h]), tau)
        else:
            assert maxima_after[h] <= maxima_before[h] * (1 + RTOL) and maxima_after[h] <= tau


@pytest.mark.parametrize("bias", [True, False])
def test_mha_clips_heads_over_tau_and_leaves_the_others_bit_identical(bias):
    heads, d = 6, 4
    x = torch.randn(3, 10, C)
    before = make_layer(heads, heads, d, bias=bias)
    layer = [t.clone() if t is not None else None for t in before]
    maxima = layer_logits(x, *layer, heads, heads)
    tau = tau_between(maxima)
    pair = tuple(layer) if bias else tuple(layer[:2])
    clip = QKClip([pair], heads=heads, tau=tau)
    clip.observe(0, maxima)
    (returned,) = clip.step()
    assert torch.equal(returned, maxima.double())
    after_max = layer_logits(x, *layer, heads, heads)
    gamma = [tau / float(s) if s > tau else 1.0 for s in maxima]
    check_clip(before, layer, maxima, after_max, tau, lambda h: math.sqrt(gamma[h]), lambda g: math.sqrt(gamma[g]),
               heads, heads, d)
    clipped = maxima > tau
    torch.testing.assert_close(after_max[clipped].double(), torch.full((int(clipped.sum()),), tau, dtype=torch.float64),
                               rtol=RTOL, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_qkv_weight(bias, kv_heads):
    heads, d = 4, 3
    x = torch.randn(2, 9, C)
    q_w, k_w, q_b, k_b = make_layer(heads, kv_heads, d)
    v_w, v_b = torch.randn(kv_heads * d, C), torch.randn(kv_heads * d)
    w = torch.cat([q_w, k_w, v_w])
    b = torch.cat([q_b, k_b, v_b]) if bias else None
    w0, b0 = w.clone(), None if b is None else b.clone()
    maxima = layer_logits(x, *split_qkv(w, heads, kv_heads)[:2], *(split_qkv(b, heads, kv_heads)[:2] if bias else (None, None)),
                          heads, kv_heads)
    tau = tau_between(maxima)
    clip = QKClip([(w, b) if bias else w], heads=heads, kv_heads=kv_heads, tau=tau, fused=True)
    clip.observe(0, maxima)
    clip.step()
    assert torch.equal(split_qkv(w, heads, kv_heads)[2], v_w)  # value rows never change
    if bias:
        assert torch.equal(split_qkv(b, heads, kv_heads)[2], v_b)
    gamma = [tau / float(s) if s > tau else 1.0 for s in maxima]
    group = heads // kv_heads
    if group == 1:
        q_factor, k_factor = (lambda h: math.sqrt(gamma[h])), (lambda g: math.sqrt(gamma[g]))
    else:
        q_factor, k_factor = (lambda h: gamma[h]), (lambda g: 1.0)
    before = (*split_qkv(w0, heads, kv_heads)[:2], *(split_qkv(b0, heads, kv_heads)[:2] if bias else (None, None)))
    after = (*split_qkv(w, heads, kv_heads)[:2], *(split_qkv(b, heads, kv_heads)[:2] if bias else (None, None)))
    after_max = layer_logits(x, *after, heads, kv_heads)
    check_clip(before, after, maxima, after_max, tau, q_factor, k_factor, heads, kv_heads, d)


@pytest.mark.parametrize("shared_keys", ["query", "group"])
def test_grouped_query_attention(shared_keys):
    """8 query heads, 2 key heads. "query": shared key rows untouched, a clipped query head x gamma_h.
    "group" (Megatron-LM): each group with a head over tau, query and key rows x sqrt(min gamma)."""
    heads, kv_heads, d = 8, 2, 3
    x = torch.randn(2, 12, C)
    before = make_layer(heads, kv_heads, d)
    layer = [t.clone() for t in before]
    maxima = layer_logits(x, *layer, heads, kv_heads)
    s = maxima.tolist()
    # Group 0 (heads 0-3) has its largest head below tau; group 1 (heads 4-7) above.
    tau = (max(s[:4]) + max(s[4:])) / 2 if max(s[:4]) < max(s[4:]) else pytest.fail("unexpected maxima")
    assert min(s[4:]) < tau  # group 1 also holds a head under tau
    clip = QKClip([tuple(layer)], heads=heads, kv_heads=kv_heads, tau=tau, shared_keys=shared_keys)
    clip.observe(0, maxima)
    clip.step()
    after_max = layer_logits(x, *layer, heads, kv_heads)
    gamma = [tau / v if v > tau else 1.0 for v in s]
    if shared_keys == "query":
        q_factor, k_factor = (lambda h: gamma[h]), (lambda g: 1.0)
    else:
        group_gamma = [min(gamma[g * 4:(g + 1) * 4]) for g in range(kv_heads)]
        q_factor, k_factor = (lambda h: math.sqrt(group_gamma[h // 4])), (lambda g: math.sqrt(group_gamma[g]))
        assert group_gamma[0] == 1.0 and group_gamma[1] < 1.0
    check_clip(before, layer, maxima, after_max, tau, q_factor, k_factor, heads, kv_heads, d)


def test_no_op_when_every_head_is_under_tau():
    layer = make_layer(4, 4, 3)
    copies = [t.clone() for t in layer]
    x = torch.randn(2, 8, C)
    maxima = layer_logits(x, *layer, 4, 4)
    clip = QKClip([tuple(layer)], heads=4, tau=float(maxima.max()) * 1.001)
    clip.observe(0, maxima)
    clip.step()
    assert all(torch.equal(a, b) for a, b in zip(layer, copies))


def test_running_max_until_the_next_step_then_cleared():
    heads, d = 2, 2
    w_q, w_k = torch.ones(heads * d, 3), torch.ones(heads * d, 3)
    clip = QKClip([(w_q, w_k)], heads=heads, tau=10.0)
    clip.observe(0, torch.tensor([40.0, 5.0]))
    clip.observe(0, torch.tensor([20.0, 1000.0]))
    clip.observe(0, torch.tensor([1.0, 1.0]))
    (maxima,) = clip.step()
    assert maxima.tolist() == [40.0, 1000.0]
    torch.testing.assert_close(w_q, torch.tensor([0.5] * d + [0.1] * d).repeat_interleave(3).view(-1, 3))
    torch.testing.assert_close(w_k, w_q)
    assert clip.step() == [None]  # cleared: nothing observed since
    torch.testing.assert_close(w_k, w_q)
    torch.testing.assert_close(w_q[0], torch.full((3,), 0.5))


def test_unobserved_layers_infinite_tau_and_nan_never_clip():
    layers = [(torch.randn(4, 3), torch.randn(4, 3)) for _ in range(3)]
    copies = [tuple(t.clone() for t in pair) for pair in layers]
    clip = QKClip(layers, heads=2, tau=1.0)
    clip.observe(1, torch.tensor([math.nan, 0.5]))
    assert clip.step()[0] is None
    monitor = QKClip(layers, heads=2, tau=math.inf)
    monitor.observe(0, torch.tensor([1e30, math.inf], dtype=torch.float64))
    assert monitor.step()[0].tolist() == [1e30, math.inf]
    for pair, copy in zip(layers, copies):
        assert all(torch.equal(a, b) for a, b in zip(pair, copy))


def test_bfloat16_weights():
    heads, d = 4, 8
    q_w, k_w, _, _ = make_layer(heads, heads, d, bias=False)
    q_w, k_w = q_w.bfloat16(), k_w.bfloat16()
    x = torch.randn(2, 10, C).bfloat16()
    maxima = layer_logits(x, q_w, k_w, None, None, heads, heads)
    tau = tau_between(maxima)
    clip = QKClip([(q_w, k_w)], heads=heads, tau=tau)
    clip.observe(0, maxima)
    clip.step()
    after = layer_logits(x, q_w, k_w, None, None, heads, heads)
    # bf16 rows carry 8 bits: the rescaled logits may exceed tau by a few 2^-8 relative.
    assert (after[maxima > tau] <= tau * (1 + 4 * 2**-8)).all()


def test_parameters_of_a_model_in_place_and_without_grad():
    attn = torch.nn.Linear(C, 3 * C, bias=True)
    clip = QKClip([(attn.weight, attn.bias)], heads=3, fused=True, tau=1e-6)
    clip.observe(0, torch.ones(3))
    clip.step()
    assert attn.weight.grad is None and attn.weight.is_leaf and attn.weight.requires_grad


# ------------------------------------------------------------------------------------- errors


def _layer(rows=8, kv_rows=8):
    return torch.randn(rows, C), torch.randn(kv_rows, C)


@pytest.mark.parametrize(("make", "kwargs", "error", "match"), [
    (lambda: [_layer()], {"heads": 0}, ValueError, "heads must be an int >= 1, got 0"),
    (lambda: [_layer()], {"heads": True}, ValueError, "heads must be an int >= 1, got True"),
    (lambda: [_layer()], {"heads": 2.0}, ValueError, "heads must be an int >= 1, got 2.0"),
    (lambda: [_layer()], {"heads": 4, "kv_heads": 3}, ValueError, "kv_heads=3 must divide heads=4"),
    (lambda: [_layer()], {"heads": 2, "tau": 0.0}, ValueError, "tau must be a positive number.*got 0.0"),
    (lambda: [_layer()], {"heads": 2, "tau": -1.0}, ValueError, "tau"),
    (lambda: [_layer()], {"heads": 2, "tau": math.nan}, ValueError, "tau"),
    (lambda: [_layer()], {"heads": 2, "tau": "100"}, ValueError, "tau"),
    (lambda: [_layer()], {"heads": 2, "shared_keys": "key"}, ValueError, "shared_keys must be one of"),
    (lambda: [_layer()], {"heads": 2, "fused": 1}, TypeError, "fused must be True or False"),
    (lambda: [], {"heads": 2}, TypeError, "non-empty list"),
    (lambda: torch.randn(8, C), {"heads": 2}, TypeError, "non-empty list"),
    (lambda: [torch.randn(8, C)], {"heads": 2}, TypeError, r"pairs\[0\] is one tensor.*fused=True"),
    (lambda: [(torch.randn(8, C),)], {"heads": 2}, TypeError, r"pairs\[0\] must be \(q_weight, k_weight\)"),
    (lambda: [_layer(), _layer(9)], {"heads": 2}, ValueError, r"pairs\[1\]: the q weight has 9 rows, not a multiple of heads=2"),
    (lambda: [_layer(8, 6)], {"heads": 2}, ValueError, r"q and k weights have 8 and 6 rows.*need 8 and 8"),
    (lambda: [_layer(8, 8)], {"heads": 2, "kv_heads": 1}, ValueError, r"need 8 and 4"),
    (lambda: [(torch.randn(8), torch.randn(8))], {"heads": 2}, ValueError, r"q weight must be a \(rows, in\) matrix, got shape \(8,\)"),
    (lambda: [(torch.randn(8, C), torch.ones(8, C, dtype=torch.int64))], {"heads": 2}, TypeError, "k weight must be floating point"),
    (lambda: [(*_layer(), torch.randn(7), None)], {"heads": 2}, ValueError, "the q bias has 7 rows, the q weight 8"),
    (lambda: [(*_layer(), None, torch.randn(8, 1))], {"heads": 2}, ValueError, r"k bias must be a \(rows,\) vector"),
    (lambda: [torch.randn(13, C)], {"heads": 2, "fused": True}, ValueError, "13 rows, not a multiple of heads \\+ 2 kv_heads = 6"),
    (lambda: [torch.randn(10, C)], {"heads": 2, "fused": True, "head_dim": 4}, ValueError, "need at least 16"),
    (lambda: [(torch.randn(12, C), torch.randn(11))], {"heads": 2, "fused": True}, ValueError, "qkv bias has 11 rows"),
    (lambda: [(torch.randn(12, C), None, None)], {"heads": 2, "fused": True}, TypeError, r"qkv_weight or \(qkv_weight, qkv_bias\)"),
])
def test_constructor_errors(make, kwargs, error, match):
    pairs = make()
    tensors = [t for entry in (pairs if isinstance(pairs, list) else [pairs])
               for t in (entry if isinstance(entry, tuple) else [entry]) if isinstance(t, torch.Tensor)]
    copies = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        QKClip(pairs, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


def test_the_same_tensor_twice_is_refused():
    q, k = _layer()
    with pytest.raises(ValueError, match=r"pairs\[1\] q weight is the same tensor as pairs\[0\] q weight"):
        QKClip([(q, k), (q, torch.randn(8, C))], heads=2)
    with pytest.raises(ValueError, match=r"pairs\[0\] k weight is the same tensor as pairs\[0\] q weight.*fused=True"):
        QKClip([(q, q)], heads=2)


def test_observe_errors_leave_the_recorded_maxima_unchanged():
    q, k = torch.ones(4, 3), torch.ones(4, 3)
    clip = QKClip([(q, k)], heads=2, tau=1.0)
    clip.observe(0, torch.tensor([4.0, 0.5]))
    for index, value, error, match in [
        (1, torch.ones(2), ValueError, r"index must be an int in \[0, 1\), got 1"),
        (-1, torch.ones(2), ValueError, "index"),
        (True, torch.ones(2), ValueError, "index"),
        (0, torch.ones(3), ValueError, r"shape \(2,\) \(one per query head\), got \(3,\)"),
        (0, torch.ones(1, 2), ValueError, r"got \(1, 2\)"),
        (0, [9.0, 9.0], ValueError, "got list"),
        (0, torch.tensor([9, 9]), TypeError, "floating point"),
    ]:
        with pytest.raises(error, match=match):
            clip.observe(index, value)
    assert clip.step()[0].tolist() == [4.0, 0.5]
    torch.testing.assert_close(q[:2], torch.full((2, 3), 0.5))
    assert torch.equal(q[2:], torch.ones(2, 3))


def test_process_group_without_init_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        QKClip([_layer()], heads=2, process_group=object())


# ------------------------------------------------------------------ charlm's attention and --qk-clip


def test_charlm_blocks_record_their_max_logits_and_the_clip_holds_them_under_tau():
    from muonkit.tasks.charlm import GPT, attach_qk_clip

    model = GPT(vocab=20, context=16, width=32, depth=2, heads=4)
    ids = torch.randint(0, 20, (3, 16))
    recorded = []
    for block in model.blocks:
        block.max_logit_observer = recorded.append
    model(ids)
    model.eval()
    model(ids)  # evaluation passes do not record
    assert len(recorded) == 2 and all(m.shape == (4,) for m in recorded)

    # The oracle: logits recomputed from the block's own q and k through the dense reference.
    def dense(block, x):
        b, t, c = x.shape
        q, k, _ = block.qkv(block.attn_norm(x)).view(b, t, 3, 4, c // 4).permute(2, 0, 3, 1, 4)
        return dense_max_logits(q, k, is_causal=True)[1]

    x = model.token(ids) + model.position(torch.arange(16))
    torch.testing.assert_close(recorded[0].double(), dense(model.blocks[0], x), rtol=RTOL, atol=0)

    # Through attach_qk_clip: the training forward passes of both blocks report, the clip acts on
    # those maxima, and the same inputs then give logits <= tau in every clipped head.
    model.train()
    with torch.no_grad():
        inputs = [x, model.blocks[0](x)]
        before = [dense(block, block_input) for block, block_input in zip(model.blocks, inputs)]
    tau = float(torch.cat(before).median())
    clip = attach_qk_clip(model, tau)
    with torch.no_grad():
        model.blocks[1](model.blocks[0](x))
    acted_on = clip.step()
    with torch.no_grad():
        for block, block_input, old, seen in zip(model.blocks, inputs, before, acted_on):
            torch.testing.assert_close(seen, old, rtol=RTOL, atol=0)
            new = dense(block, block_input)
            assert (new[old > tau] <= tau * (1 + RTOL)).all()
            assert torch.equal(new[old <= tau], old[old <= tau])
    assert any((old > tau).any() for old in before) and any((old <= tau).any() for old in before)


def test_qk_clip_needs_attention_blocks():
    from muonkit.tasks.base import TaskError
    from muonkit.tasks.charlm import attach_qk_clip

    with pytest.raises(TaskError, match="needs attention blocks; Linear has none"):
        attach_qk_clip(torch.nn.Linear(2, 2), 1.0)


# ---------------------------------------------------------------- weights replaced after construction

class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.q(x).sum() + self.k(x).sum()


def _clip(model: _Attention, **options) -> QKClip:
    return QKClip([(model.q.weight, model.k.weight, model.q.bias, model.k.bias)], heads=2, kv_heads=1, tau=1.0,
                  model=model, **options)


def test_a_weight_its_module_no_longer_holds_is_an_error_naming_it_and_nothing_changes():
    """A QKClip holds tensors; a module whose parameter was replaced (as fully_shard and
    parallelize_module do) makes it rescale a tensor the model no longer uses: nothing happened,
    silently. With model=, step() raises naming the parameter before anything changes."""
    model = _Attention()
    clip = _clip(model)
    old = model.k.weight
    model.k.weight = torch.nn.Parameter(old.detach().clone())
    clip.observe(0, torch.tensor([5.0, 0.5]))
    kept = [t.detach().clone() for t in (old, model.q.weight, model.k.weight)]
    with pytest.raises(RuntimeError, match=r"pairs\[0\] k weight was the model's 'k.weight' when QKClip was built, "
                                           r"and its Linear now holds another tensor there \(fully_shard"):
        clip.step()
    assert all(torch.equal(a, b) for a, b in zip(kept, (old, model.q.weight, model.k.weight)))
    assert clip._maxima[0] is not None  # the observed maxima are kept too
    with pytest.raises(ValueError, match=r"pairs\[0\] q weight \(shape \(8, 8\)\) is not a parameter of model="):
        QKClip([(model.q.weight, model.k.weight)], heads=2, kv_heads=1, model=_Attention())


def test_a_qkclip_built_before_fully_shard_raises_and_one_built_after_clips(one_rank_group):
    """A real FSDP2 model (one rank, in this process): QKClip(model=) built before fully_shard raises at
    step() naming the parameter; built after, from the DTensor parameters, it clips them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _Attention()
    early = _clip(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    early.observe(0, torch.tensor([5.0, 0.5]))
    with pytest.raises(RuntimeError, match="pairs\\[0\\] q weight was the model's 'q.weight'"):
        early.step()
    late = _clip(model, process_group=one_rank_group)
    x = torch.randn(3, 8)
    model(x).backward()  # FSDP2 swaps unsharded parameters in and back out
    before = model.q.weight.full_tensor().clone()
    late.observe(0, torch.tensor([5.0, 0.5]))
    late.step()  # head 0 (rows 0..3) over tau: its query rows x 1/5 (shared key: "query" rule)
    after = model.q.weight.full_tensor()
    torch.testing.assert_close(after[:4], before[:4] * 0.2, rtol=0, atol=1e-7)
    assert torch.equal(after[4:], before[4:])


# ------------------------------------------------------------------------------- distributed

@pytest.fixture(scope="module")
def two_ranks(spawned):
    """The 2-rank results of the session's spawn (tests/conftest.py), which runs this module's jobs."""
    results = spawned[2]
    for job in ("qkclip_replicated", "qkclip_fsdp"):
        for rank, result in enumerate(results):
            if isinstance(result[job], Exception):
                pytest.fail(f"{job} on rank {rank} raised:\n{result[job]}")
    return results


@pytest.mark.slow
def test_distributed_maxima_are_all_reduced_so_every_rank_rescales_alike(two_ranks):
    """Each rank observes part of the maxima; both end with the single-process result of observing all."""
    want = worker.qkclip_reference()
    for result in two_ranks:
        got = result["qkclip_replicated"]
        assert got["maxima"] == want["maxima"]
        for name in want["weights"]:
            assert torch.equal(got["weights"][name], want["weights"][name]), name


@pytest.mark.slow
def test_fsdp2_sharded_weights_rescale_their_local_rows(two_ranks):
    """Shard(0) over 2 ranks splits head 1's rows (15 rows: 8 + 7); the gathered weights equal the
    single-process clip bit for bit, and the next FSDP2 forward pass uses them."""
    want = worker.qkclip_reference()
    for result in two_ranks:
        got = result["qkclip_fsdp"]
        assert got["placements"] == ["Shard(dim=0)"] * 4 and got["local_rows"] in ([8, 8, 8, 8], [7, 7, 7, 7])
        for name in want["weights"]:
            assert torch.equal(got["weights"][name], want["weights"][name]), name
        torch.testing.assert_close(got["forward_q"], got["expected_q"], rtol=0, atol=0)
        assert got["error"] is not None and "process_group" in got["error"]


# --------------------------------------------------------------------------------- --qk-clip


def test_bench_qk_clip_records_the_max_logit_of_every_step(tmp_path, capsys):
    import json

    from muonkit.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80, encoding="utf-8")
    out = tmp_path / "out"
    code = main(["bench", "charlm", "--text", str(text), "--optimizers", "muon", "--steps", "3", "--qk-clip", "0.05",
                 "--out", str(out), "--quiet", "--threads", "1", "--tensorboard", str(tmp_path / "tb")])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert results["qk_clip"] == run["qk_clip"] == 0.05 and len(run["max_logit"]) == 3
    assert results["summary"]["muon"]["max_logit"] == max(run["max_logit"])
    assert "| max logit |" in printed and f"| {max(run['max_logit']):.1f} |" in printed and "QK-Clip tau 0.05" in printed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / f"charlm-muon-lr{run['lr']:g}-seed0"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("attention/max_logit")]
    assert logged == [(i + 1, pytest.approx(v, rel=1e-6)) for i, v in enumerate(run["max_logit"])]


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "charlm", "--qk-clip", "0"], "--qk-clip: expected a positive number (or inf), got '0'"),
    (["bench", "charlm", "--qk-clip", "nan"], "--qk-clip: expected a positive number"),
    (["bench", "charlm", "--qk-clip", "big"], "--qk-clip: expected a positive number"),
    (["bench", "regression", "--qk-clip", "100"], "--qk-clip needs a task with attention (charlm, modular), not regression"),
])
def test_bench_qk_clip_errors(argv, message, tmp_path, capsys):
    from muonkit.cli import main

    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()
