"""NorMuon, AdaMuon, cautious weight decay and per-head (blocked) matrices against float64 references
written here from their definitions (issue 10; docs/references.md section 6), not from muonkit's code.

With float64 parameters and the exact SVD orthogonalizer, muonkit and the reference differ only by
round-off, so they must agree to 1e-10. The gradients are a fixed sequence (open loop), scaled over
steps by powers of ten so that the second moments matter.
"""

from __future__ import annotations

import copy

import pytest
import torch

import muonkit
from reference import polar_factor, update_scale

LR, MOMENTUM, WD, BETA2 = 0.05, 0.9, 0.1, 0.8
STEPS = 4
HEADS = 6  # per-head kind: a fused (HEADS * 4, 6) weight read as HEADS matrices of 4 x 6


def blocked_matrices(t: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The matrices a parameter kind is made of, as views into t (rows = fan_out)."""
    if kind == "matrix":
        return [t]
    if kind == "conv":
        return [t.reshape(t.shape[0], -1)]
    if kind == "stacked":
        return list(t.unbind(0))
    if kind == "heads":
        return list(t.reshape(HEADS, t.shape[0] // HEADS, t.shape[1]).unbind(0))
    if kind == "heads_transposed":  # (in, HEADS * d) stored transposed: head h is columns h*d..
        d = t.shape[1] // HEADS
        return [t[:, h * d:(h + 1) * d].T for h in range(HEADS)]
    raise KeyError(kind)


KINDS = {
    "matrix_wide": ((5, 12), "matrix", None),
    "matrix_tall": ((12, 5), "matrix", None),
    "conv": ((6, 3, 2, 2), "conv", None),
    "stacked": ((3, 7, 4), "stacked", None),
    "heads": ((HEADS * 4, 6), "heads", muonkit.Layout.per_block(HEADS)),
    "heads_transposed": ((5, HEADS * 3), "heads_transposed",
                         muonkit.Layout(rows=(1,), cols=(0,), blocks=((1, HEADS),))),
}


class ReferenceVariant:
    """Muon / NorMuon / AdaMuon with plain or cautious decay, per matrix, in float64 (issue 10):

        M <- beta M + (1 - beta) G;  U <- (1 - beta) G + beta M (nesterov)
        muon:    H = polar(U)
        normuon: O = polar(U); v <- b2 v + (1 - b2) mean_cols(O*O); H = O / (sqrt(v) + eps); H *= |O|/|H|
        adamuon: O = polar(sign(U)); v <- b2 v + (1 - b2) O*O;      H = O / (sqrt(v) + eps); H *= |O|/|H|
        u = scale(rows, cols) H;  W <- W - lr (u + wd D),  D = W (plain) or W 1[u W >= 0] (cautious)
    """

    def __init__(self, W: torch.Tensor, kind: str, *, variant: str, cautious: bool, scale: str, eps: float = 1e-10):
        self.W = W.detach().double().clone()
        self.kind, self.variant, self.cautious, self.scale, self.eps = kind, variant, cautious, scale, eps
        self.M = torch.zeros_like(self.W)
        self.v = [None] * len(blocked_matrices(self.W, kind))

    def step(self, G: torch.Tensor) -> None:
        G = G.double()
        self.M = MOMENTUM * self.M + (1 - MOMENTUM) * G
        U = (1 - MOMENTUM) * G + MOMENTUM * self.M
        for j, (Wj, Uj) in enumerate(zip(blocked_matrices(self.W, self.kind), blocked_matrices(U, self.kind))):
            rows, cols = Wj.shape
            if self.variant == "muon":
                H = polar_factor(Uj)
            else:
                O = polar_factor(torch.sign(Uj) if self.variant == "adamuon" else Uj)
                q = (O * O).mean(dim=1, keepdim=True) if self.variant == "normuon" else O * O
                v = torch.zeros_like(q) if self.v[j] is None else self.v[j]
                self.v[j] = BETA2 * v + (1 - BETA2) * q
                H = O / (self.v[j].sqrt() + self.eps)
                H = H * (O.norm() / H.norm())
            u = update_scale(self.scale, rows, cols) * H
            decay = Wj * (u * Wj >= 0) if self.cautious else Wj
            Wj.copy_(Wj - LR * (u + WD * decay))


def gradient_sequence(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (t % 3 - 1) for t in range(STEPS)]


def initial(shape, seed=1):
    return 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def muonkit_run(W, grads, layout, **options):
    p = torch.nn.Parameter(W.clone())
    opt = muonkit.Muon([{"params": [p], "layout": layout}], lr=LR, momentum=MOMENTUM, weight_decay=WD,
                       beta2=BETA2, orthogonalizer="svd", **options)
    for G in grads:
        p.grad = G.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("scale", ["naive", "keller_jordan", "mup", "moonlight"])
@pytest.mark.parametrize("cautious", [False, True], ids=["plain_wd", "cautious_wd"])
@pytest.mark.parametrize("variant", ["muon", "normuon", "adamuon"])
def test_variant_matches_float64_reference(variant, cautious, scale, kind):
    shape, ref_kind, layout = KINDS[kind]
    W, grads = initial(shape), gradient_sequence(shape)
    got, _ = muonkit_run(W, grads, layout, variant=variant, cautious_weight_decay=cautious, scale=scale)
    ref = ReferenceVariant(W, ref_kind, variant=variant, cautious=cautious, scale=scale)
    for G in grads:
        ref.step(G)
    assert (got - ref.W).abs().max().item() < 1e-10


@pytest.mark.parametrize("cautious", [False, True])
def test_variants_on_the_fused_newton_schulz_path_match_the_generic_path(cautious):
    """The fused path (built-in kernel, stack by stack) and the generic path (a callable
    orthogonalizer that runs the same kernel) give the same bits for every variant."""
    torch.manual_seed(0)
    shapes = [(48, 48), (48, 48), (64, 256), (256, 64), (16, 8, 3, 3), (3, 32, 16), (HEADS * 8, 32)]
    for variant in ("normuon", "adamuon"):
        a = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
        b = [torch.nn.Parameter(q.detach().clone()) for q in a]
        layouts = [None] * 6 + [muonkit.Layout.per_block(HEADS)]
        polar_express = lambda X, steps: muonkit.orthogonalize(X, "polar_express", steps)  # noqa: E731
        polar_express.batched = True
        opts = dict(lr=0.02, variant=variant, cautious_weight_decay=cautious)
        opt_a = muonkit.Muon([{"params": [q], "layout": lay} for q, lay in zip(a, layouts)], **opts)
        opt_b = muonkit.Muon([{"params": [q], "layout": lay} for q, lay in zip(b, layouts)], orthogonalizer=polar_express, **opts)
        for _ in range(3):
            for qa, qb in zip(a, b):
                qa.grad = torch.randn_like(qa)
                qb.grad = qa.grad.clone()
            opt_a.step()
            opt_b.step()
        for qa, qb in zip(a, b):
            assert torch.equal(qa, qb)
            assert torch.equal(opt_a.state[qa]["second_moment"], opt_b.state[qb]["second_moment"])


def official_normuon_update(grad, momentum, second_momentum, beta=0.95, beta2=0.95, ns_steps=5):
    """zichongli5/NorMuon normuon.py's normuon_update for a 2D matrix, re-typed from its definition
    (Keller Jordan's quintic in float32 here instead of bfloat16, so the comparison is fp32 round-off)."""
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp(momentum, beta)
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = update.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(ns_steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    update = X.mT if transposed else X
    vnorm = update.norm(dim=(-2, -1), keepdim=True)
    v_mean = torch.mean(update * update, dim=-1, keepdim=True)
    second_momentum.lerp_(v_mean, 1 - beta2)
    update = update * (1 / (second_momentum.sqrt() + 1e-10))
    update = update * (vnorm / (update.norm(dim=(-2, -1), keepdim=True) + 1e-10))
    return update * max(1, grad.size(-2) / grad.size(-1)) ** 0.5


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)], ids=str)
def test_normuon_equals_the_official_update_rule(shape):
    torch.manual_seed(3)
    W = torch.randn(shape) * 0.1
    p = torch.nn.Parameter(W.clone())
    opt = muonkit.Muon([p], lr=0.02, weight_decay=0.01, variant="normuon", orthogonalizer="keller_jordan",
                       scale="keller_jordan")
    ref, m, v = W.clone(), torch.zeros(shape), torch.zeros(shape[0], 1)
    for _ in range(5):
        g = torch.randn(shape)
        p.grad = g.clone()
        opt.step()
        u = official_normuon_update(g, m, v)
        ref = ref * (1 - 0.02 * 0.01) - 0.02 * u
    assert torch.allclose(p.detach(), ref, rtol=0, atol=2e-6)
    assert torch.allclose(opt.state[p]["second_moment"], v, rtol=1e-4, atol=0)


def test_cautious_weight_decay_in_adamw_groups_matches_reference():
    """W <- W - lr (u + wd W 1[u W >= 0]) with u AdamW's update m_hat / (sqrt(v_hat) + eps)."""
    torch.manual_seed(0)
    W = torch.randn(7, 5, dtype=torch.float64)
    p = torch.nn.Parameter(W.clone())
    opt = muonkit.Muon([{"params": [p], "use_muon": False}], lr=0.01, weight_decay=0.5, cautious_weight_decay=True)
    m, v, ref = torch.zeros_like(W), torch.zeros_like(W), W.clone()
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, 6):
        g = torch.randn_like(W)
        p.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        ref = ref - 0.01 * (u + 0.5 * ref * (u * ref >= 0))
    assert (p.detach() - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_second_moment_state_round_trips_bit_for_bit(variant, tmp_path):
    torch.manual_seed(0)
    shapes = [(32, 16), (4, 8, 3, 3), (2, 16, 8), (HEADS * 4, 16)]
    layouts = [None, None, None, muonkit.Layout.per_block(HEADS)]

    def build(params):
        return muonkit.Muon([{"params": [q], "layout": lay} for q, lay in zip(params, layouts)], lr=0.02, variant=variant)

    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt_a = build(a)
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    for t in range(2):
        for q, g in zip(a, grads[t]):
            q.grad = g.clone()
        opt_a.step()
    torch.save(opt_a.state_dict(), tmp_path / "opt.pt")
    b = [torch.nn.Parameter(q.detach().clone()) for q in a]
    opt_b = build(b)
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for t in range(2, 4):
        for q, r, g in zip(a, b, grads[t]):
            q.grad, r.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for q, r in zip(a, b):
        assert torch.equal(q, r)
        assert torch.equal(opt_a.state[q]["second_moment"], opt_b.state[r]["second_moment"])


def test_second_moment_shapes_are_documented():
    """NorMuon keeps one value per row of each matrix (the column axes cut to their block count),
    AdaMuon one per entry."""
    cases = [((32, 16), None, (32, 1)), ((4, 8, 3, 3), None, (4, 1, 1, 1)), ((2, 16, 8), None, (2, 16, 1)),
             ((24, 16), muonkit.Layout.per_block(HEADS), (24, 1)),
             ((5, 18), muonkit.Layout(rows=(1,), cols=(0,), blocks=((1, HEADS),)), (1, 18))]
    for shape, layout, expected in cases:
        p = torch.nn.Parameter(torch.randn(shape))
        normuon = muonkit.Muon([{"params": [p], "layout": layout}], variant="normuon")
        assert tuple(normuon.state[p]["second_moment"].shape) == expected
        adamuon = muonkit.Muon([{"params": [p], "layout": layout}], variant="adamuon")
        assert adamuon.state[p]["second_moment"].shape == p.shape
    plain = muonkit.Muon([torch.nn.Parameter(torch.randn(4, 4))])
    assert set(next(iter(plain.state.values()))) == {"momentum_buffer"}


@pytest.mark.parametrize(
    "options, message",
    [(dict(variant="normuonn"), "unknown variant 'normuonn'"), (dict(beta2=1.0), "beta2 must be in [0, 1)"),
     (dict(beta2=-0.1), "beta2 must be in [0, 1)"), (dict(cautious_weight_decay=1), "cautious_weight_decay must be"),
     (dict(variant_eps=-1.0), "variant_eps must be >= 0")],
)
def test_bad_variant_options_are_refused_naming_the_value(options, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        muonkit.Muon([torch.nn.Parameter(torch.randn(4, 4))], **options)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([p])
    opt.param_groups[0].update(options)
    p.grad = torch.randn(4, 4)
    before = p.detach().clone()
    with pytest.raises((ValueError, TypeError), match="Muon group 0"):
        opt.step()
    assert torch.equal(p, before)


def test_block_count_that_does_not_divide_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match=r"axis 0 of shape \(10, 4\) has size 10, which 3 blocks do not divide"):
        muonkit.Muon([{"params": [torch.nn.Parameter(torch.randn(10, 4))], "layout": muonkit.Layout.per_block(3)}])
    ok = torch.nn.Parameter(torch.randn(6, 4))
    bad = torch.nn.Parameter(torch.randn(10, 4))
    opt = muonkit.Muon([{"params": [ok]}, {"params": [bad]}])
    opt.param_groups[1]["layout"] = muonkit.Layout.per_block(3)
    ok.grad, bad.grad = torch.randn(6, 4), torch.randn(10, 4)
    state = copy.deepcopy(opt.state_dict())
    before = ok.detach().clone()
    with pytest.raises(ValueError, match="Muon group 1: parameter '#0'"):
        opt.step()
    assert torch.equal(ok, before)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_per_head_layout_orthogonalizes_each_head_on_its_own():
    """A fused qkv weight read per head: each head's update is the polar factor of that head's
    block, scaled by its own (d_head x d) shape; not the polar factor of the whole matrix."""
    torch.manual_seed(0)
    W = torch.zeros(HEADS * 4, 12, dtype=torch.float64)
    p = torch.nn.Parameter(W.clone())
    g = torch.randn(HEADS * 4, 12, dtype=torch.float64) * torch.logspace(-3, 3, HEADS * 4, dtype=torch.float64)[:, None]
    opt = muonkit.Muon([{"params": [p], "layout": muonkit.Layout.per_block(HEADS)}], lr=1.0, momentum=0.0,
                       nesterov=False, weight_decay=0.0, orthogonalizer="svd", scale="naive")
    p.grad = g
    opt.step()
    for h in range(HEADS):
        block = slice(4 * h, 4 * h + 4)
        assert torch.allclose(-p.detach()[block], polar_factor(g[block]), atol=1e-12)
    whole = polar_factor(g)
    assert (-p.detach() - whole).abs().max().item() > 0.1


# From an adversarial review of the variants, low-precision writes, diagnostics and layouts against
# docs/API.md; each test failed before its fix.


@pytest.mark.parametrize("dtype, eps", [(torch.float16, 1e-10), (torch.float32, 0.0)], ids=["float16", "eps0"])
@pytest.mark.parametrize("orthogonalizer", ["polar_express", "svd"])
@pytest.mark.parametrize("variant", ["normuon", "adamuon"])
def test_variants_keep_a_zero_gradient_row_finite(variant, orthogonalizer, dtype, eps):
    """A row with zero gradient has O = 0 there and v = 0; H = 0 / (0 + eps) must be 0 even when
    eps is 0 or below float16's smallest number (1e-10): the row only decays, the others move."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16).to(dtype))
    before = p.detach().clone()
    opt = muonkit.Muon([p], lr=0.01, weight_decay=0.1, variant=variant, orthogonalizer=orthogonalizer,
                       stochastic_rounding=False, variant_eps=eps)
    g = torch.randn(8, 16).to(dtype)
    g[0] = 0
    p.grad = g
    opt.step()
    assert p.isfinite().all()
    assert torch.equal(p.detach()[0], before[0] * (1 - 0.01 * 0.1))
    assert (p.detach()[1:] != before[1:] * (1 - 0.01 * 0.1)).any()


def _fresh_twin(opt, p, variant):
    """A new optimizer of `variant` over a copy of p, holding the same momentum as opt."""
    q = torch.nn.Parameter(p.detach().clone())
    twin = muonkit.Muon([q], lr=0.02, variant=variant, orthogonalizer="svd")
    twin.state[q]["momentum_buffer"].copy_(opt.state[p]["momentum_buffer"])
    return q, twin


def _step_both_and_compare(opt, p, twin, q):
    """One more step of `opt` and of its fresh `twin` on the same gradient: the same parameter and
    second moment, bit for bit."""
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["second_moment"], twin.state[q]["second_moment"])


@pytest.mark.parametrize("path", [["normuon", "adamuon"], ["adamuon", "normuon"], ["normuon", "muon", "normuon"]],
                         ids="->".join)
def test_a_changed_variant_starts_its_second_moment_from_zero(path):
    """docs/API.md: a group whose variant is changed later gets its second_moment (zeros) at the next
    step; the step then equals a fresh optimizer of that variant with the same momentum."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    opt = muonkit.Muon([p], lr=0.02, variant=path[0], orthogonalizer="svd")
    for variant in path[1:]:
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
        opt.param_groups[0]["variant"] = variant
    q, twin = _fresh_twin(opt, p, path[-1])
    _step_both_and_compare(opt, p, twin, q)


def test_a_state_dict_saved_after_switching_to_plain_muon_loads_back():
    p, idle = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(4, 4))
    opt = muonkit.Muon([p, idle], variant="normuon")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["variant"] = "muon"
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all("second_moment" not in state for state in saved["state"].values())
    opt.load_state_dict(saved)
    opt.step()


def test_a_state_dict_saved_right_after_a_variant_switch_loads_and_continues_alike():
    """Saved between the switch and the next step: the loaded optimizer starts the new variant's
    second moment from zero, as the original does at that step."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = muonkit.Muon([p], variant="normuon")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["variant"] = "adamuon"
    saved = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    loaded = muonkit.Muon([q], variant="normuon")
    loaded.load_state_dict(saved)
    q.grad = p.grad.clone()
    opt.step()
    loaded.step()
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["second_moment"], loaded.state[q]["second_moment"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16), (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("variant", ["normuon", "adamuon", "nordion2"])
def test_a_stack_is_transformed_as_its_tensors_one_by_one(variant, dtypes, threads):
    """The step driver transforms a stack of tensors' matrices in one call (functional._transformed):
    the same bits as one call per tensor, for wide and tall stacks (tall ones laid out as the work
    buffer lays them, transposed), tensors of 1 to 3 matrices, and 1 or 2 threads."""
    from muonkit.functional import _transformed
    from muonkit.orthogonalize import empty_work

    chosen = muonkit.variants.VARIANTS[variant]
    o_dtype, v_dtype = dtypes
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for rows, cols in [(96, 40), (40, 96), (33, 33), (300, 200)]:
            counts = [1, 3, 2]
            O = empty_work(sum(counts), rows, cols, dtype=o_dtype)
            O.copy_(torch.randn(sum(counts), rows, cols, generator=g) * 10.0 ** torch.randint(-3, 3, (sum(counts), 1, 1), generator=g))
            O[1, 0].zero_()  # a zero row
            outs = O.split(counts)
            v_cols = 1 if variant != "adamuon" else cols
            moments = [torch.rand(k, rows, v_cols, generator=g).to(v_dtype) for k in counts]
            stacked = _transformed(chosen, O, outs, moments, counts, 0.9, 1e-10)
            for o, v, (h, new) in zip(outs, moments, stacked):
                h_one, new_one = chosen.transform(o, v, beta2=0.9, eps=1e-10)
                assert torch.equal(h, h_one) and h.dtype == o_dtype, (rows, cols)
                assert torch.equal(new, new_one) and new.dtype == v_dtype, (rows, cols)
        # moments of different dtypes, or none: one call per tensor
        O = torch.randn(2, 8, 8, dtype=o_dtype)
        mixed = [torch.rand(1, 8, 1), torch.rand(1, 8, 1, dtype=torch.float64)]
        for (h, new), o, v in zip(_transformed(chosen, O, O.split(1), mixed, [1, 1], 0.9, 1e-10), O.split(1), mixed):
            assert torch.equal(h, chosen.transform(o, v, beta2=0.9, eps=1e-10)[0]) and new.dtype == v.dtype
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("path", [["normuon", "nordion2"], ["nordion2", "normuon"]], ids="->".join)
def test_normuon_and_nordion2_carry_their_per_row_second_moment_over_a_switch(path):
    """docs/API.md (review issue-rv2): NorMuon's and NorDion2's second moments have the same shape
    (one value per row) and carry over a switch of the group's variant, unlike NorMuon <-> AdaMuon's
    (zeros): the step equals a fresh optimizer of the new variant holding the same momentum and v."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    opt = muonkit.Muon([p], lr=0.02, variant=path[0], orthogonalizer="svd")
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    opt.param_groups[0]["variant"] = path[1]
    q, twin = _fresh_twin(opt, p, path[1])
    twin.state[q]["second_moment"].copy_(opt.state[p]["second_moment"])
    assert twin.state[q]["second_moment"].abs().max() > 0  # not zeros: carried over
    _step_both_and_compare(opt, p, twin, q)
