"""Dion2 and NorDion2 (issue 23; docs/references.md, Dion2) against

- a float64 reference written here from the definition, per matrix of each parameter kind:

      M <- M + G;  k = the shorter side (rows when rows <= cols; NorDion2: always rows)
      S = the ceil(fraction k) rows (or columns) with the largest L1 norms of M
      O_S = polar(M_S);  M_S <- ef_decay M_S
      Dion2:    H = O_S on S, 0 elsewhere
      NorDion2: v_S <- b2 v_S + (1 - b2) mean_cols(O_S * O_S); H_S = O_S / (sqrt(v_S) + eps) * |O_S| / |.|
      W <- W (1 - lr wd) - lr scale(rows, cols) H

- the official update of microsoft/dion `dion/dion2.py` (dion2_pre_orthogonalize and
  dion2_post_orthogonalize, re-typed below as the test's oracle, without torch.compile and with
  the orthogonalization in float32 instead of its bfloat16 hand-off), at float32 round-off.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import muonkit
from reference import polar_factor, update_scale

LR, WD, BETA2, FRACTION, EF_DECAY = 0.05, 0.1, 0.8, 0.25, 0.9
STEPS = 4
HEADS = 4


def matrices(t: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The matrices of a parameter kind, as views into t (rows = fan_out)."""
    if kind == "matrix":
        return [t]
    if kind == "conv":
        return [t.reshape(t.shape[0], -1)]
    if kind == "stacked":
        return list(t.unbind(0))
    if kind == "heads":
        return list(t.reshape(HEADS, t.shape[0] // HEADS, t.shape[1]).unbind(0))
    raise KeyError(kind)


KINDS = {
    "matrix_wide": ((8, 20), "matrix", None),
    "matrix_tall": ((20, 8), "matrix", None),
    "square": ((12, 12), "matrix", None),
    "conv": ((6, 3, 2, 2), "conv", None),
    "stacked": ((3, 7, 5), "stacked", None),
    "heads": ((HEADS * 8, 6), "heads", muonkit.Layout.per_block(HEADS)),
}


class ReferenceDion2:
    """Dion2 / NorDion2 in float64, one matrix at a time, from the definition above."""

    def __init__(self, W, kind, *, variant, scale, fraction=FRACTION, ef_decay=EF_DECAY, eps=1e-10):
        self.W = W.detach().double().clone()
        self.kind, self.variant, self.scale = kind, variant, scale
        self.fraction, self.ef_decay, self.eps = fraction, ef_decay, eps
        self.M = torch.zeros_like(self.W)
        self.v = [torch.zeros(m.shape[0], 1, dtype=torch.float64) for m in matrices(self.W, kind)]
        self.selected: list[list[int]] = []

    def step(self, G):
        self.M += G.double()
        self.W *= 1 - LR * WD
        self.selected = []
        for j, (Wj, Mj) in enumerate(zip(matrices(self.W, self.kind), matrices(self.M, self.kind))):
            rows, cols = Wj.shape
            by_rows = self.variant == "nordion2" or rows <= cols
            A, B = (Mj, Wj) if by_rows else (Mj.T, Wj.T)  # select rows of A
            k = max(1, math.ceil(self.fraction * A.shape[0]))
            norms = A.abs().sum(dim=1)
            S = sorted(torch.argsort(norms, descending=True)[:k].tolist())
            self.selected.append(S)
            O = polar_factor(A[S].clone() if by_rows else A[S].T.clone())
            if not by_rows:
                O = O.T
            A[S] *= self.ef_decay
            if self.variant == "nordion2":
                v = self.v[j]
                v[S] = BETA2 * v[S] + (1 - BETA2) * (O * O).mean(dim=1, keepdim=True)
                H = O / (v[S].sqrt() + self.eps)
                O = H * (O.norm() / H.norm())
            B[S] -= LR * update_scale(self.scale, rows, cols) * O


def gradients(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (t % 3 - 1) for t in range(STEPS)]


def initial(shape, seed=1):
    return 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def muonkit_run(W, grads, layout, **options):
    p = torch.nn.Parameter(W.clone())
    opt = muonkit.Muon([{"params": [p], "layout": layout}], lr=LR, weight_decay=WD, beta2=BETA2,
                       fraction=FRACTION, ef_decay=EF_DECAY, orthogonalizer="svd", **options)
    for G in grads:
        p.grad = G.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("scale", ["naive", "moonlight"])
@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_matches_float64_reference(variant, scale, kind):
    shape, ref_kind, layout = KINDS[kind]
    W, grads = initial(shape), gradients(shape)
    got, opt = muonkit_run(W, grads, layout, variant=variant, scale=scale)
    ref = ReferenceDion2(W, ref_kind, variant=variant, scale=scale)
    for G in grads:
        ref.step(G)
    assert (got.detach() - ref.W).abs().max().item() < 1e-10
    assert (opt.state[got]["momentum_buffer"] - ref.M).abs().max().item() < 1e-12
    if variant == "nordion2":
        v = opt.state[got]["second_moment"]
        want = torch.cat(ref.v) if ref_kind != "heads" else torch.cat(ref.v).reshape(v.shape)
        assert (v.reshape(-1) - want.reshape(-1)).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (2, 12, 30)])
def test_a_step_without_weight_decay_moves_only_the_selected_slices(variant, shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = muonkit.Muon([p], lr=0.1, weight_decay=0.0, variant=variant, fraction=0.25)
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(shape)
        opt.step()
        changed = (p.detach() != before).reshape(-1, *shape[-2:])
        rows, cols = shape[-2:]
        by_rows = variant == "nordion2" or rows <= cols
        lines = changed.any(dim=-1) if by_rows else changed.any(dim=-2)
        k = math.ceil(0.25 * (rows if by_rows else cols))
        assert lines.sum(dim=-1).tolist() == [k] * lines.shape[0]
        # The selected lines change whole; the others not at all.
        for m, line in zip(changed, lines):
            part = m[line] if by_rows else m[:, line]
            assert bool(part.all())


# ------------------------------------------------------------ the official update, re-typed


def official_dion2_pre_orthogonalize(G, M, fraction, ef_decay, select_dim):
    """microsoft/dion dion/dion2.py, dion2_pre_orthogonalize (re-typed; output kept in float32)."""
    dtype = M[0].dtype
    num_select = M[0].size(select_dim)
    norm_dim = -1 if select_dim == -2 else -2
    k = max(1, int(math.ceil(fraction * num_select)))
    G = [g.to(dtype=dtype) for g in G]
    torch._foreach_add_(M, G)
    M_stacked = torch.stack(M, dim=0)
    slice_norms = M_stacked.norm(p=1, dim=norm_dim)
    _, indices = torch.topk(slice_norms, k, dim=-1, sorted=False)
    if select_dim == -2:
        num_cols = M[0].size(-1)
        indices_expanded = indices.unsqueeze(-1).expand(*indices.shape, num_cols)
        selected_stacked = torch.gather(M_stacked, dim=-2, index=indices_expanded)
    else:
        num_rows = M[0].size(-2)
        indices_expanded = indices.unsqueeze(-2).expand(*indices.shape[:-1], num_rows, indices.shape[-1])
        selected_stacked = torch.gather(M_stacked, dim=-1, index=indices_expanded)
    indices_list = list(indices.unbind(dim=0))
    selected_list = list(selected_stacked.unbind(dim=0))
    for m, idx, selected in zip(M, indices_list, selected_list):
        if select_dim == -2:
            idx_exp = idx.unsqueeze(-1).expand(*idx.shape, m.size(-1))
        else:
            idx_exp = idx.unsqueeze(-2).expand(*idx.shape[:-1], m.size(-2), idx.shape[-1])
        m.scatter_(dim=select_dim, index=idx_exp, src=selected * ef_decay)
    return list(selected_stacked.unbind(dim=0)), indices_list


def official_dion2_post_orthogonalize(X, U, indices, base_lr, adjusted_lr, weight_decay, select_dim):
    """microsoft/dion dion/dion2.py, dion2_post_orthogonalize (re-typed)."""
    torch._foreach_mul_(X, 1 - base_lr * weight_decay)
    dtype = X[0].dtype
    U = [u.to(dtype=dtype) for u in U]
    neg_lr = -adjusted_lr
    U_scaled = [neg_lr * u for u in U]
    for x, u_scaled, idx in zip(X, U_scaled, indices):
        idx_exp = idx.unsqueeze(-1).expand_as(u_scaled) if select_dim == -2 else idx.unsqueeze(-2).expand_as(u_scaled)
        x.scatter_add_(dim=select_dim, index=idx_exp, src=u_scaled)


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (3, 16, 40)])
@pytest.mark.parametrize("count", [1, 3])
def test_equals_the_official_update_at_float32_round_off(shape, count):
    """Same-shaped parameters stepped together, as the official megabatch does; adjust_lr=None is
    muonkit's scale "naive"; both orthogonalize with the exact polar factor (muonkit's "svd")."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for _ in range(count)]
    X = [p.detach().clone() for p in params]
    M = [torch.zeros(shape) for _ in range(count)]
    opt = muonkit.Muon(params, lr=0.02, weight_decay=0.1, scale="naive", variant="dion2", fraction=0.25,
                       ef_decay=0.95, orthogonalizer="svd", layout="stacked" if len(shape) == 3 else None)
    rows, cols = shape[-2:]
    select_dim = -2 if rows <= cols else -1
    for _ in range(5):
        grads = [torch.randn(shape) for _ in range(count)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        U, indices = official_dion2_pre_orthogonalize(grads, M, 0.25, 0.95, select_dim)
        O = [muonkit.orthogonalize(u, "svd") for u in U]
        official_dion2_post_orthogonalize(X, O, indices, 0.02, 0.02, 0.1, select_dim)
        for p, x, m in zip(params, X, M):
            assert torch.allclose(p.detach(), x, rtol=1e-5, atol=1e-6)
            assert torch.allclose(opt.state[p]["momentum_buffer"], m, rtol=1e-6, atol=1e-6)


def test_fraction_one_and_no_feedback_is_muon_without_momentum():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(12, 20))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = muonkit.Muon([a], lr=0.05, variant="dion2", fraction=1.0, ef_decay=0.0)
    opt_b = muonkit.Muon([b], lr=0.05, momentum=0.0, nesterov=False)
    for _ in range(3):
        a.grad = torch.randn(12, 20)
        b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_fused_and_held_paths_agree_and_state_dict_resumes(variant, tmp_path):
    torch.manual_seed(0)
    shapes = [(16, 40), (40, 16), (16, 40), (2, 8, 12)]
    a = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    b = [torch.nn.Parameter(q.detach().clone()) for q in a]
    polar_express = lambda X, steps: muonkit.orthogonalize(X, "polar_express", steps)  # noqa: E731
    polar_express.batched = True
    groups = lambda ps: [{"params": [q], "layout": "stacked" if q.ndim == 3 else None} for q in ps]  # noqa: E731
    opt_a = muonkit.Muon(groups(a), lr=0.02, variant=variant)
    opt_b = muonkit.Muon(groups(b), lr=0.02, variant=variant, orthogonalizer=polar_express)
    for _ in range(3):
        for qa, qb in zip(a, b):
            qa.grad = torch.randn_like(qa)
            qb.grad = qa.grad.clone()
        opt_a.step()
        opt_b.step()
    for qa, qb in zip(a, b):
        assert torch.equal(qa, qb)
    torch.save(opt_a.state_dict(), tmp_path / "opt.pt")
    c = [torch.nn.Parameter(q.detach().clone()) for q in a]
    opt_c = muonkit.Muon(groups(c), lr=0.02, variant=variant)
    opt_c.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for qa, qc in zip(a, c):
        qa.grad = torch.randn_like(qa)
        qc.grad = qa.grad.clone()
    opt_a.step()
    opt_c.step()
    for qa, qc in zip(a, c):
        assert torch.equal(qa, qc)


@pytest.mark.parametrize("key, value, message", [
    ("fraction", 0.0, r"fraction must be in \(0, 1\], got 0\.0"),
    ("fraction", 1.5, r"fraction must be in \(0, 1\], got 1\.5"),
    ("fraction", -0.25, r"fraction must be in \(0, 1\], got -0\.25"),
    ("fraction", float("nan"), r"fraction must be a finite number, got nan"),
    ("ef_decay", -0.1, r"ef_decay must be in \[0, 1\], got -0\.1"),
    ("ef_decay", 1.01, r"ef_decay must be in \[0, 1\], got 1\.01"),
    ("selection", "row", r"selection must be one of local, global, got 'row'"),
])
def test_bad_options_are_refused_naming_the_group_and_value_before_anything_changes(key, value, message):
    p = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(ValueError, match=r"^Muon: " + message):
        muonkit.Muon([p], variant="dion2", **{key: value})
    opt = muonkit.Muon([p], variant="dion2")
    with pytest.raises(ValueError, match=r"^Muon group 1: " + message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], key: value})
    assert len(opt.param_groups) == 1
    # Edited between steps: the step refuses before any parameter or state changes.
    p.grad = torch.randn(8, 12)
    opt.step()
    snapshot = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    opt.param_groups[0][key] = value
    p.grad = torch.randn(8, 12)
    with pytest.raises(ValueError, match=r"^Muon group 0: " + message):
        opt.step()
    assert torch.equal(p, snapshot[0])
    assert torch.equal(opt.state[p]["momentum_buffer"], snapshot[1]["state"][0]["momentum_buffer"])


# ------------------------------------------------------------------- under process_group

import distributed_worker as worker  # noqa: E402


# `spawned` (tests/conftest.py): the session's 2- and 4-rank runs of distributed_worker.SPAWNED_JOBS,
# which hold this module's jobs (replicated_dion2, replicated_nordion2, bytes_variants, fsdp_dion2_refused).


def _per_rank(spawned, world, job):
    results = [r[job] for r in spawned[world]]
    for value in results:
        if isinstance(value, Exception):
            pytest.fail(f"{job} on {world} ranks raised:\n{value}")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_replicated_equals_one_process_bit_for_bit(spawned, world, variant):
    want = worker.reference(True, variant=variant)
    for got in _per_rank(spawned, world, f"replicated_{variant}"):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_only_the_selected_slices_travel(spawned, world):
    """bytes_sent of one step: Dion2 sends the selected quarter of each matrix's slices (plus
    NorDion2's second moment of the selected rows), not the whole matrices Muon sends. All ranks
    together: each owner sends its results to the others, so one rank's share depends on which
    matrices it owns (issue 21)."""
    per_rank = _per_rank(spawned, world, "bytes_variants")
    total = {variant: sum(sent[variant] for sent in per_rank) for variant in ("muon", "dion2", "nordion2")}
    assert total["muon"] > 0
    assert total["dion2"] < 0.45 * total["muon"]
    assert total["nordion2"] < 0.5 * total["muon"]


@pytest.mark.slow
def test_shardings_it_cannot_select_along_are_refused_before_anything_changes(spawned):
    for refused in _per_rank(spawned, 2, "fsdp_dion2_refused"):
        message, unchanged = refused["columns"]
        assert message.startswith("Muon group 3: parameter 'narrow.weight' is sharded along dim 0, which its layout")
        assert "reads as columns" in message and "variant 'dion2' selects rows along the shard dimension" in message
        assert unchanged
        message, unchanged = refused["global_stack"]
        assert message.startswith("Muon group 2: parameter 'conv.weight' is sharded along its rows and holds 3 matrices")
        assert "selection='local'" in message
        assert unchanged
        message, unchanged = refused["columns_only"]
        assert message.startswith("Muon group") and "is a DTensor cut along dim 1" in message, message
        assert "but not along dim 0" in message and "selecting the columns of a parameter cut only along dim 1 is not built" in message
        assert unchanged


# ------------------------------------------------------------------ on FSDP2-sharded parameters


def row_blocks(rows: int, world: int) -> list[range]:
    """The rows each rank holds under Shard(0): blocks of ceil(rows / world), the last ones shorter
    or empty (torch.chunk's split)."""
    chunk = -(-rows // world)
    return [range(min(rows, r * chunk), min(rows, (r + 1) * chunk)) for r in range(world)]


def top_rows(norms: torch.Tensor, rows, count: int) -> list[int]:
    rows = list(rows)
    order = sorted(rows, key=lambda i: -norms[i].item())
    return order[: min(count, len(rows))]


class ReferenceRowSharded:
    """Dion2 / NorDion2 on a parameter sharded along its rows (a matrix, or a conv filter read as
    out x (in * kernel)), float64, from the definition (microsoft/dion dion/dion2.py selects along
    the shard dimension):

        local:  S = the union over ranks of the top ceil(fraction * ceil(rows / world)) rows (by L1
                norm of M) of each rank's block (all of a shorter block's rows);
        global: S = the top ceil(fraction * rows) rows of the whole matrix;

    then, as on one process: O_S = polar(M_S) of the rows S as one matrix, M_S <- ef_decay M_S,
    NorDion2's normalization, W <- W (1 - lr wd) - lr scale(rows, cols) H on S. Rows, never columns,
    even on a tall matrix: they are the shard dimension."""

    def __init__(self, W, *, variant, scale, world, selection, eps=1e-10, blocks=None):
        self.W = W.detach().double().clone()
        self.variant, self.scale, self.world, self.selection, self.eps = variant, scale, world, selection, eps
        self.blocks = blocks if blocks is not None else row_blocks(W.shape[0], world)  # in dim-0 order
        self.M = torch.zeros_like(self.W)
        self.v = torch.zeros(W.shape[0], 1, dtype=torch.float64)
        self.selected: list[int] = []
        self.history: list[list[int]] = []  # the rows selected at each step

    def step(self, G):
        self.M += G.double()
        self.W *= 1 - LR * WD
        A, B = self.M.reshape(self.M.shape[0], -1), self.W.reshape(self.W.shape[0], -1)
        rows, cols = A.shape
        norms = A.abs().sum(dim=1)
        if self.selection == "local":
            quota = max(1, math.ceil(FRACTION * -(-rows // self.world)))
            S = [i for block in self.blocks for i in top_rows(norms, block, quota)]
        else:
            S = top_rows(norms, range(rows), max(1, math.ceil(FRACTION * rows)))
        S = sorted(S)
        self.selected = S
        self.history.append(S)
        O = polar_factor(A[S].clone())
        A[S] *= EF_DECAY
        if self.variant == "nordion2":
            self.v[S] = BETA2 * self.v[S] + (1 - BETA2) * (O * O).mean(dim=1, keepdim=True)
            H = O / (self.v[S].sqrt() + self.eps)
            O = H * (O.norm() / H.norm())
        B[S] -= LR * update_scale(self.scale, rows, cols) * O


def sharded_references(world, variant, selection):
    W0 = worker.Dion2Params()
    refs = {}
    for name, p in W0.named_parameters():
        if name == "stack":  # batch-sharded: every rank holds whole matrices
            refs[name] = ReferenceDion2(p, "stacked", variant=variant, scale="moonlight")
        else:
            refs[name] = ReferenceRowSharded(p, variant=variant, scale="moonlight", world=world, selection=selection)
    for step in range(worker.DION2_STEPS):
        grads = worker.dion2_grads(step)
        for name, ref in refs.items():
            ref.step(grads[name])
    return refs


FSDP_JOBS = [f"fsdp_{v}_{sel}" for v in ("dion2", "nordion2") for sel in ("local", "global")]
HSDP_JOBS = [f"hsdp_{v}_{sel}" for v in ("dion2", "nordion2") for sel in ("local", "global")]  # 4 ranks only
TP_JOBS = [f"fsdp_tp_{v}_{sel}" for v in ("dion2", "nordion2") for sel in ("local", "global")]  # 4 ranks only


# The session's spawns run these after distributed_worker.SPAWNED_JOBS (tests/conftest.py `spawned`).
SPAWN_JOBS = {world: [*FSDP_JOBS, "bytes_fsdp_variants", "fsdp_dion2_rows_8bit", *(HSDP_JOBS + TP_JOBS if world == 4 else [])]
              for world in (2, 4)}


@pytest.fixture(scope="module")
def spawned_fsdp(spawned):
    return spawned


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("selection", ["local", "global"])
@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_fsdp_equals_the_float64_reference_of_its_selection(spawned_fsdp, world, variant, selection):
    refs = sharded_references(world, variant, selection)
    for got in _per_rank(spawned_fsdp, world, f"fsdp_{variant}_{selection}"):
        for name, ref in refs.items():
            assert (got[name] - ref.W).abs().max().item() < 1e-10, name
            assert (got[f"{name}.momentum_buffer"] - ref.M).abs().max().item() < 1e-12, name
            if variant == "nordion2":
                want = torch.cat(ref.v) if name == "stack" else ref.v
                assert (got[f"{name}.second_moment"].reshape(-1) - want.reshape(-1)).abs().max().item() < 1e-10, name


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["local", "global"])
@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_hsdp_equals_the_float64_reference_of_its_blocks(spawned_fsdp, variant, selection):
    """On a 2 x 2 (replicate, shard) mesh the rows come in 2 blocks, each held by 2 replicas: every
    rank (replicas select the same rows) ends at the float64 reference of 2 blocks."""
    refs = sharded_references(2, variant, selection)
    for got in _per_rank(spawned_fsdp, 4, f"hsdp_{variant}_{selection}"):
        for name, ref in refs.items():
            assert (got[name] - ref.W).abs().max().item() < 1e-10, name
            assert (got[f"{name}.momentum_buffer"] - ref.M).abs().max().item() < 1e-12, name
            if variant == "nordion2":
                want = torch.cat(ref.v) if name == "stack" else ref.v
                assert (got[f"{name}.second_moment"].reshape(-1) - want.reshape(-1)).abs().max().item() < 1e-10, name


def selected_part_elements(counts: list[int], parts: list[list[tuple[int, int, int]]]) -> tuple[int, int]:
    """The fewest and the most elements the exchange of one selected part may send, all ranks
    together, over the owners the plan may pick (those holding a largest piece of the first part,
    the update; the second moment's travels to the same owner): `counts[b]` rows selected of block
    b, `part[r]` = (the block of rows rank r holds, which range of columns, how many columns). With
    owner o: per part, the distinct pieces o lacks, once each, and every other rank's piece."""
    def elements(part: list[tuple[int, int, int]], o: int) -> int:
        sizes = [counts[b] * c for b, _, c in part]
        distinct = {(b, j): counts[b] * c for b, j, c in part}
        return sum(n for key, n in distinct.items() if key != part[o][:2]) + sum(sizes) - sizes[o]

    sizes = [counts[b] * c for b, _, c in parts[0]]
    totals = [sum(elements(part, o) for part in parts) for o in range(len(sizes)) if sizes[o] == max(sizes)]
    return min(totals), max(totals)


def block_counts(ref: ReferenceRowSharded, step: int) -> list[int]:
    return [sum(1 for i in ref.history[step] if i in block) for block in ref.blocks]


def tp_references(variant, selection):
    """Float64 references of worker.TPParams on the (dp, tp) = (2, 2) mesh: a rowwise weight's rows
    come in dp's 2 blocks (each rank holds some of their columns; the rows are scored by their whole
    L1 norm), the colwise one's in 4 blocks of rows (tp's 13-row halves, each cut in 7 and 6 by dp)."""
    W0 = worker.TPParams()
    refs = {}
    for name, module in W0.named_children():
        blocks = [range(0, 7), range(7, 13), range(13, 20), range(20, 26)] if name == "colwise" else None
        refs[f"{name}.weight"] = ReferenceRowSharded(module.weight, variant=variant, scale="moonlight", world=4 if
                                                     name == "colwise" else 2, selection=selection, blocks=blocks)
    for step in range(worker.DION2_STEPS):
        grads = worker.tp_grads(step)
        for name, ref in refs.items():
            ref.step(grads[name])
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["local", "global"])
@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_fsdp_over_tensor_parallel_equals_the_float64_reference(spawned_fsdp, variant, selection):
    """FSDP2 over tensor parallelism on 4 gloo ranks: rowwise weights (Shard(0), Shard(1)) select
    rows along dp's shard dimension, each row scored by its L1 norm over all columns (summed over
    tp's column ranges), so every rank ends at the float64 reference of dp's 2 blocks, whatever the
    tp degree; the colwise weight ((_StridedShard(0), Shard(0))) at that of its 4 blocks. Only the
    selected rows travel: per step the bytes (all ranks) lie between the fewest and the most the
    selected pieces allow over the owners the plan may pick (NorDion2's second moment of a rowwise
    weight is held by tp rank 0 only, so its bytes depend on the owner)."""
    refs = tp_references(variant, selection)
    runs = _per_rank(spawned_fsdp, 4, f"fsdp_tp_{variant}_{selection}")
    assert runs[0]["placements"]["wide.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert runs[0]["placements"]["colwise.weight"].startswith("(_StridedShard(dim=0")
    for got in runs:
        for name, ref in refs.items():
            assert (got[name] - ref.W).abs().max().item() < 1e-10, name
            assert (got[f"{name}.momentum_buffer"] - ref.M).abs().max().item() < 1e-12, name
            if variant == "nordion2":
                assert (got[f"{name}.second_moment"] - ref.v).abs().max().item() < 1e-10, name
    norm_bytes = 0
    if selection == "global":  # every rank all-gathers its partial row norms (float64), padded to the longest
        norm_bytes = 4 * 3 * 8 * max(sum(len(ref.blocks[r // 2 if "colwise" not in n else (r % 2) * 2 + r // 2])
                                         for n, ref in refs.items()) for r in range(4))
    else:  # local: the rowwise weights' partial row norms of each rank's block
        norm_bytes = 4 * 3 * 8 * max(sum(len(ref.blocks[r // 2]) for n, ref in refs.items() if n != "colwise.weight")
                                     for r in range(4))
    for step in range(worker.DION2_STEPS):
        low = high = norm_bytes
        for name, ref in refs.items():
            rows, cols = ref.W.shape
            counts = block_counts(ref, step)
            if name == "colwise.weight":  # rank (dp i, tp j) holds block 2 j + i, every column
                parts = [([(2 * (r % 2) + r // 2, 0, cols) for r in range(4)])]
                parts += [[(2 * (r % 2) + r // 2, 0, 1) for r in range(4)]] if variant == "nordion2" else []
            else:  # rank (dp i, tp j) holds block i, tp's column range j
                split = [-(-cols // 2), cols - -(-cols // 2)]
                parts = [[(r // 2, r % 2, split[r % 2]) for r in range(4)]]
                parts += [[(r // 2, r % 2, 1 - r % 2) for r in range(4)]] if variant == "nordion2" else []
            a, b = selected_part_elements(counts, parts)
            low, high = low + 8 * a, high + 8 * b
        sent = sum(got["sent"][step] for got in runs)
        assert low <= sent <= high, (step, low, sent, high)
        # FSDP + TP Muon's minimum is 1.5 N per matrix; a quarter of the rows (all of "tiny"'s 2) travel here.
        assert sent - norm_bytes < 0.35 * 1.5 * 8 * sum(ref.W.numel() for ref in refs.values())


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["local", "global"])
@pytest.mark.parametrize("variant", ["dion2", "nordion2"])
def test_hsdp_sends_only_the_selected_rows_at_the_minimum(spawned_fsdp, variant, selection):
    """On the 2 x 2 (replicate, shard) mesh, bytes_sent per step (all ranks together) equals the
    minimum for the rows the float64 reference selects: per row-sharded parameter, with c_b rows
    selected in block b (held by 2 replicas) of `cols` columns each, the owner (holding a largest
    block) receives the other block once and returns every other rank its rows:
    (N + 2 N - 2 max c_b cols) elements, N = (c_0 + c_1) cols; NorDion2 adds the same for its second
    moment (one column); the stack of whole matrices sends nothing; global selection adds the
    all_gather of every rank's float64 row norms (padded to the longer block)."""
    refs = sharded_references(2, variant, selection)
    runs = _per_rank(spawned_fsdp, 4, f"hsdp_{variant}_{selection}")
    row_sharded = {name: ref for name, ref in refs.items() if name != "stack"}
    norm_bytes = 0
    if selection == "global":
        norm_bytes = 4 * 3 * 8 * max(sum(len(ref.blocks[b]) for ref in row_sharded.values()) for b in range(2))
    for step in range(worker.DION2_STEPS):
        want = norm_bytes
        for name, ref in row_sharded.items():
            counts = block_counts(ref, step)
            cols = ref.W[0].numel()
            parts = [[(r % 2, 0, cols) for r in range(4)]]  # ranks (replica i, shard j) = 2 i + j hold block j
            parts += [[(r % 2, 0, 1) for r in range(4)]] if variant == "nordion2" else []  # its second moment
            low, high = selected_part_elements(counts, parts)
            assert low == high  # every owner the plan may pick gives the minimum
            want += 8 * low
        assert sum(got["sent"][step] for got in runs) == want, step
        whole = sum(8 * ref.W.numel() for ref in row_sharded.values())
        assert want - norm_bytes < 0.35 * 2 * whole  # HSDP's Muon minimum is 2 N per matrix


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_local_and_global_selection_differ_on_row_shards_only(spawned_fsdp, world):
    """On rows whose norms grow with their index, the whole matrix's top rows crowd into the last
    blocks, while local selection takes its quota from every block: the two select different rows
    (in the references and in the runs) of every row-sharded matrix with more than one row per
    selection, and the same matrices of the batch-sharded stack."""
    local, whole = sharded_references(world, "dion2", "local"), sharded_references(world, "dion2", "global")
    for name in ("wide", "tall", "odd", "conv"):
        assert local[name].selected != whole[name].selected, name
    # On the wide matrix, global selection is one process's Dion2 (rows are its shorter side).
    one = ReferenceDion2(worker.Dion2Params().wide, "matrix", variant="dion2", scale="moonlight")
    for step in range(worker.DION2_STEPS):
        one.step(worker.dion2_grads(step)["wide"])
    assert (one.W - whole["wide"].W).abs().max().item() < 1e-12
    for got_local, got_global in zip(_per_rank(spawned_fsdp, world, "fsdp_dion2_local"),
                                     _per_rank(spawned_fsdp, world, "fsdp_dion2_global")):
        for name in ("wide", "tall", "odd", "conv"):
            assert (got_local[name] - got_global[name]).abs().max().item() > 1e-3, name
        assert torch.equal(got_local["stack"], got_global["stack"])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_only_the_selected_rows_of_sharded_parameters_travel(spawned_fsdp, world):
    """bytes_sent of one FSDP2 step of the standard model: Dion2 sends its selected rows (local:
    each rank's quota; global: the whole matrix's top rows, plus every row's L1 norm), not the
    row blocks Muon sends to each matrix's owner and back."""
    for sent in _per_rank(spawned_fsdp, world, "bytes_fsdp_variants"):
        assert sent["muon_local"] > 0
        assert sent["dion2_local"] < 0.45 * sent["muon_local"]
        assert sent["dion2_global"] < 0.45 * sent["muon_local"]
        assert sent["nordion2_local"] < 0.5 * sent["muon_local"]


def test_local_and_global_selection_agree_on_whole_matrices():
    """On one process (and on replicated parameters) every rank sees the whole matrix, so the
    per-shard and the whole-matrix selection are the same rows."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 40))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = muonkit.Muon([a], lr=0.05, variant="dion2", selection="local")
    opt_b = muonkit.Muon([b], lr=0.05, variant="dion2", selection="global")
    for _ in range(3):
        a.grad = torch.randn(16, 40)
        b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_sharded_step_with_8bit_momentum_moves_each_blocks_quota_of_rows(spawned_fsdp, world):
    """Without weight decay, selection="local" moves min(q, block rows) rows of each rank's block of
    a row-sharded matrix, q = ceil(0.25 * ceil(rows / world)); 8-bit momentum (blocks inside each
    shard) changes nothing of that."""
    for rank, moved in enumerate(_per_rank(spawned_fsdp, world, "fsdp_dion2_rows_8bit")):
        assert moved, "no Muon parameter"
        for name, (shape, rows_moved) in moved.items():
            block = len(row_blocks(shape[0], world)[rank])
            quota = math.ceil(0.25 * -(-shape[0] // world))
            assert rows_moved == min(quota, block), (name, rank)
