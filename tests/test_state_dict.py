"""Checkpoints: a saved and reloaded run continues bit-for-bit (torch.equal).

10 steps, state_dict through torch.save/torch.load on a BytesIO, a fresh model and a fresh
optimizer, 10 more steps == 20 uninterrupted steps, with Muon and AdamW groups together.
Everything is deterministic on CPU with one thread (conftest.py), so the tolerance is zero.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import muonkit


class Small(nn.Module):
    """Every kind of parameter: 2D, stacked 3D, conv 4D (Muon) and vectors/scalars (AdamW)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)  # weight (6, 2, 3, 3)
        self.mix = nn.Parameter(torch.randn(3, 6, 6) / 6**0.5)  # stacked
        self.fc = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))  # (batch, 6)
        h = h + self.gate * sum(torch.tanh(h @ m) for m in self.mix)
        return self.head(self.norm(torch.relu(self.fc(h))))


MUON_NAMES = ["conv.weight", "mix", "fc.weight"]


def build(seed, orthogonalizer, ns_dtype):
    torch.manual_seed(seed)
    model = Small()
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[n] for n in MUON_NAMES]},
        {"params": [p for n, p in named.items() if n not in MUON_NAMES], "use_muon": False,
         "lr": 3e-3},
    ]
    opt = muonkit.Muon(groups, lr=0.02, momentum=0.9, weight_decay=0.05, scale="moonlight",
                       orthogonalizer=orthogonalizer, ns_dtype=ns_dtype)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    return model, opt, sched


def train(model, opt, sched, steps):
    for t in steps:
        g = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(8, 2, 5, 5, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def assert_same_run(model_a, opt_a, model_b, opt_b):
    for (na, a), (nb, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb
        assert torch.equal(a, b), na
    params_a = list(model_a.parameters())
    params_b = list(model_b.parameters())
    for a, b in zip(params_a, params_b):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert ga["lr"] == gb["lr"]


@pytest.mark.parametrize(
    "orthogonalizer,ns_dtype",
    [("polar_express", None), ("keller_jordan", torch.bfloat16), ("gram", None)],
    ids=["polar_express", "keller_jordan-bf16", "gram"],
)
def test_round_trip_continues_bit_for_bit(orthogonalizer, ns_dtype):
    model_a, opt_a, sched_a = build(0, orthogonalizer, ns_dtype)
    train(model_a, opt_a, sched_a, range(20))

    model_b, opt_b, sched_b = build(0, orthogonalizer, ns_dtype)
    train(model_b, opt_b, sched_b, range(10))
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                "sched": sched_b.state_dict()}, buffer)
    del model_b, opt_b, sched_b

    buffer.seek(0)
    # torch.load's default is weights_only=True: the optimizer state must be plain data.
    checkpoint = torch.load(buffer)
    model_c, opt_c, sched_c = build(1, orthogonalizer, ns_dtype)  # different init: all overwritten
    model_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["opt"])
    sched_c.load_state_dict(checkpoint["sched"])
    train(model_c, opt_c, sched_c, range(10, 20))

    assert_same_run(model_a, opt_a, model_c, opt_c)


def test_state_keys_are_torch_compatible():
    model, opt, sched = build(0, "polar_express", None)
    train(model, opt, sched, range(2))
    named = dict(model.named_parameters())
    for n, p in named.items():
        state = opt.state[p]
        if n in MUON_NAMES:
            assert set(state) == {"momentum_buffer"}, n
            assert state["momentum_buffer"].shape == p.shape
        else:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, n
            assert torch.is_tensor(state["step"]) and state["step"].dtype == torch.float32
            assert state["step"].ndim == 0 and state["step"].item() == 2.0


def test_round_trip_with_param_groups_helper():
    """Groups from muonkit.param_groups (with param_names and layout keys) round-trip too."""

    def make(seed):
        torch.manual_seed(seed)
        model = Small()
        opt = muonkit.Muon(muonkit.param_groups(model), lr=0.02, weight_decay=0.05)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)

    model_a, opt_a, sched_a = make(0)
    train(model_a, opt_a, sched_a, range(6))
    model_b, opt_b, sched_b = make(0)
    train(model_b, opt_b, sched_b, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model_c, opt_c, sched_c = make(1)
    model_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["opt"])
    train(model_c, opt_c, sched_c, range(3, 6))
    assert_same_run(model_a, opt_a, model_c, opt_c)


def test_older_state_dict_without_new_group_keys_loads():
    """STYLE.md item 6: a state dict from before keys were added (here: a Muon group holding only
    torch.optim.Muon-like keys) loads, the missing keys are filled from the optimizer's
    defaults, and the run continues exactly as one that never lost them."""
    model_a, opt_a, sched_a = build(0, "polar_express", None)
    train(model_a, opt_a, sched_a, range(6))

    model_b, opt_b, sched_b = build(0, "polar_express", None)
    train(model_b, opt_b, sched_b, range(3))
    old = opt_b.state_dict()
    kept = {"params", "lr", "momentum", "nesterov", "weight_decay", "use_muon", "initial_lr"}
    muon_group = old["param_groups"][0]
    for key in list(muon_group):
        if key not in kept:
            del muon_group[key]
    model_c, opt_c, sched_c = build(1, "polar_express", None)
    model_c.load_state_dict(model_b.state_dict())
    opt_c.load_state_dict(old)
    sched_c.load_state_dict(sched_b.state_dict())
    train(model_c, opt_c, sched_c, range(3, 6))
    assert_same_run(model_a, opt_a, model_c, opt_c)


def test_state_dict_with_a_declared_layout_loads_with_torch_load_defaults():
    """A muonkit.Layout sits in its param group; torch.load's default weights_only unpickler must
    accept it, and the loaded optimizer continues bit-for-bit."""
    layout = muonkit.Layout(rows=(2,), cols=(1,), batch=(0,))
    torch.manual_seed(0)
    grads = [torch.randn(3, 8, 5) for _ in range(4)]

    def run(resume_after=None):
        W = nn.Parameter(torch.linspace(-1, 1, 120).reshape(3, 8, 5))
        opt = muonkit.Muon([W], lr=0.02, layout=layout)
        for i, g in enumerate(grads):
            if i == resume_after:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                saved = torch.load(buf)  # weights_only=True is torch's default
                assert saved["param_groups"][0]["layout"] == layout
                W2 = nn.Parameter(W.detach().clone())
                opt = muonkit.Muon([W2], lr=0.02, layout=layout)
                opt.load_state_dict(saved)
                W = W2
            W.grad = g.clone()
            opt.step()
        return W.detach()

    assert torch.equal(run(), run(resume_after=2))


# From a review for silent wrongness in state and checkpoints (issue-rv2); each test failed before its fix.


def _move(opt: muonkit.Muon, p: nn.Parameter, how: str) -> None:
    """Take `p` out of its group and put it in a group of the other kind: a new group
    (add_param_group) or the end of the params of the last group of that kind."""
    source = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    index = next(i for i, q in enumerate(source["params"]) if q is p)
    del source["params"][index]
    if "param_names" in source:
        del source["param_names"][index]
    if how == "add_param_group":
        opt.add_param_group({"params": [p], "use_muon": not source["use_muon"]})
    else:
        [g for g in opt.param_groups if g["use_muon"] != source["use_muon"]][-1]["params"].append(p)


@pytest.mark.parametrize("how", ["add_param_group", "appended"])
def test_a_parameter_moved_from_a_muon_to_an_adamw_group_starts_adamw_fresh(how):
    """A bf16 Muon parameter keeps a `step` count for stochastic rounding (two per step). Moved to
    an AdamW group, its first AdamW step must be AdamW's first step (bias corrections of step 1),
    not one corrected as if AdamW had run 10 steps (about half as large)."""
    torch.manual_seed(0)
    moved = nn.Parameter(torch.randn(8, 4).bfloat16())
    other = nn.Parameter(torch.randn(8, 4).bfloat16())
    vector = nn.Parameter(torch.randn(4).bfloat16())
    lr, wd, eps = 0.05, 0.1, 1e-8
    opt = muonkit.Muon([{"params": [moved, other]}, {"params": [vector], "use_muon": False}], lr=lr, weight_decay=wd)
    for _ in range(5):
        for p in (moved, other, vector):
            p.grad = torch.randn(p.shape).bfloat16()
        opt.step()
    _move(opt, moved, how)
    g = torch.randn(8, 4).bfloat16()
    moved.grad, other.grad, vector.grad = g, None, None
    w0 = moved.detach().double().clone()
    opt.step()
    # AdamW's first step from zero moments: m_hat = g, v_hat = g^2.
    g64 = g.double()
    expected = w0 * (1 - lr * wd) - lr * g64 / (g64.abs() + eps)
    # Stochastic rounding writes one of the two bf16 neighbours of the float result.
    assert ((moved.detach().double() - expected).abs() <= expected.abs() * 2.0**-7 + 1e-30).all()
    assert set(opt.state[moved]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[moved]["step"].item() == 1.0


@pytest.mark.parametrize("to_muon", [True, False], ids=["adamw-to-muon", "muon-to-adamw"])
@pytest.mark.parametrize("how", ["add_param_group", "appended"])
def test_a_parameter_moved_between_kinds_round_trips_through_state_dict(how, to_muon):
    """After a move, the parameter's state is its new kind's only, so that state_dict() loads into an
    optimizer built with the new grouping and continues bit for bit."""

    def make(moved_group: bool):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 6)) for _ in range(3)]
        muon, adamw = (params[:2], params[2:]) if to_muon else (params[:1], params[1:])
        mover = params[2] if to_muon else params[0]
        if moved_group:  # the grouping after the move, built directly
            muon = [p for p in muon if p is not mover] + ([mover] if to_muon else [])
            adamw = [p for p in adamw if p is not mover] + ([] if to_muon else [mover])
        groups = [{"params": muon}, {"params": adamw, "use_muon": False}]
        if moved_group and how == "add_param_group":
            groups = [{"params": [p for p in g["params"] if p is not mover], **{k: v for k, v in g.items() if k != "params"}}
                      for g in groups] + [{"params": [mover], "use_muon": to_muon}]
        return params, mover, muonkit.Muon(groups, lr=0.02)

    def steps(params, opt, seeds):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    params, mover, opt = make(False)
    steps(params, opt, range(3))
    _move(opt, mover, how)
    steps(params, opt, range(3, 5))
    kind = ({"momentum_buffer"} if to_muon else {"step", "exp_avg", "exp_avg_sq"})
    assert set(opt.state[mover]) == kind
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    params_b, _, opt_b = make(True)
    for a, b in zip(params, params_b):
        b.data.copy_(a.detach())
    opt_b.load_state_dict(torch.load(saved))
    steps(params, opt, range(5, 7))
    steps(params_b, opt_b, range(5, 7))
    for a, b in zip(params, params_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("to_muon", [True, False], ids=["adamw-to-muon", "muon-to-adamw"])
def test_a_state_dict_saved_between_a_move_and_the_next_step_loads_and_resumes_alike(to_muon):
    """Appended to a group of the other kind, a parameter keeps its old kind's state until the next
    step makes its new kind's fresh; a state dict saved in between (a checkpoint every N steps) must
    load back, as that fresh state, and resume as the optimizer that saved it does (review rv3: it
    was refused, 'state has keys [...] but an AdamW group's state is [...]')."""

    def run(reload: bool):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 6)) for _ in range(3)]
        opt = muonkit.Muon([{"params": params[:2]}, {"params": params[2:], "use_muon": False}], lr=0.02)
        for seed in range(5):
            if seed == 2:
                _move(opt, params[2] if to_muon else params[0], "appended")
                if reload:
                    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            g = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, opt

    (want, want_opt), (got, got_opt) = run(False), run(True)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for a, b in zip(want, got):
        assert want_opt.state[a].keys() == got_opt.state[b].keys()
        for key, value in want_opt.state[a].items():
            assert torch.equal(value, got_opt.state[b][key]), key


class Pair(nn.Module):
    """Two same-shaped Linear layers, registered as `order` says (a refactor that swaps them)."""

    def __init__(self, order=("a", "b")):
        super().__init__()
        for name in order:
            setattr(self, name, nn.Linear(8, 8, bias=False))


def _pair(order, seed=0):
    torch.manual_seed(seed)
    model = Pair(order)
    return model, muonkit.Muon([{"params": list(model.named_parameters())}], lr=0.02, diagnostics=True)


def _steps(model, opt, seeds):
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for name in ("a.weight", "b.weight"):  # the same gradient per name, whatever the order
            model.get_parameter(name).grad = torch.randn(8, 8, generator=g)
        opt.step()


@pytest.mark.parametrize("path", ["state_dict", "checkpoint"])
def test_a_state_dict_saved_with_the_parameters_in_another_order_loads_by_name(tmp_path, path):
    """Every group names its parameters and the names are the same, in another order (the model's
    layers registered in another order): each parameter gets its own state, not the one at its
    position, and keeps its own name (last_stats labels)."""
    model, opt = _pair(("a", "b"))
    _steps(model, opt, range(3))
    resumed, opt_r = _pair(("b", "a"), seed=1)
    resumed.load_state_dict(model.state_dict())
    if path == "state_dict":
        opt_r.load_state_dict(copy.deepcopy(opt.state_dict()))
    else:
        from muonkit.distributed import load_checkpoint, save_checkpoint

        save_checkpoint(tmp_path / "ckpt", model, opt)
        load_checkpoint(tmp_path / "ckpt", resumed, opt_r)
    assert opt_r.param_groups[0]["param_names"] == ["b.weight", "a.weight"]
    _steps(model, opt, range(3, 5))
    _steps(resumed, opt_r, range(3, 5))
    for name in ("a.weight", "b.weight"):
        assert torch.equal(model.get_parameter(name), resumed.get_parameter(name)), name
        assert torch.equal(opt.state[model.get_parameter(name)]["momentum_buffer"],
                           opt_r.state[resumed.get_parameter(name)]["momentum_buffer"]), name
        assert opt.last_stats[name] == opt_r.last_stats[name], name


@pytest.mark.parametrize("regroup, words", [
    (lambda named: [{"params": [("b.weight", named["b.weight"])], "weight_decay": 0.0},
                    {"params": [("a.weight", named["a.weight"]), ("c.weight", named["c.weight"])]}],
     "group 1 holds the parameters of this optimizer's group 0 .* groups are in another order"),
    (lambda named: [{"params": [("b.weight", named["b.weight"]), ("c.weight", named["c.weight"])]},
                    {"params": [("a.weight", named["a.weight"])], "weight_decay": 0.0}],
     "group 0 here holds 'b.weight', 'c.weight', saved in groups 0, 1"),
], ids=["groups-reordered", "regrouped"])
def test_a_state_dict_whose_names_are_grouped_otherwise_is_refused_and_changes_nothing(regroup, words):
    """The same names in other groups: by position each parameter would get another's state and
    another group's options (here weight decay 0 for a decayed one); refused, nothing changed."""
    from test_atomic_step import assert_unchanged, snapshot

    model = Pair(("a", "b", "c"))
    named = dict(model.named_parameters())
    opt = muonkit.Muon([{"params": [("a.weight", named["a.weight"]), ("c.weight", named["c.weight"])]},
                        {"params": [("b.weight", named["b.weight"])], "weight_decay": 0.0}], lr=0.02)
    _steps(model, opt, range(2))
    saved = copy.deepcopy(opt.state_dict())
    other = muonkit.Muon(regroup(named), lr=0.02)
    before = snapshot(other, list(model.parameters()))
    with pytest.raises(ValueError, match=words):
        other.load_state_dict(saved)
    assert_unchanged(other, list(model.parameters()), before)


def _renaming_hook(old_to_new, reorder):
    """A load_state_dict pre-hook for a model whose layers were renamed (a.weight -> x.weight, ...):
    it renames the saved param_names and, with `reorder`, also puts the state in this optimizer's
    order itself (the optimizer lists the renamed parameters in another order)."""
    def hook(opt, state_dict):
        (group,) = state_dict["param_groups"]
        names = [old_to_new[n] for n in group["param_names"]]
        if not reorder:
            return {**state_dict, "param_groups": [{**group, "param_names": names}]}
        current = opt.param_groups[0]["param_names"]
        at = {n: i for i, n in zip(group["params"], names)}
        state = {j: state_dict["state"][at[n]] for j, n in enumerate(current) if at[n] in state_dict["state"]}
        group = {**group, "params": list(range(len(current))), "param_names": current}
        return {"state": state, "param_groups": [group]}
    return hook


@pytest.mark.parametrize("momentum_bits", [32, 8])
@pytest.mark.parametrize("reorder", [False, True], ids=["hook-renames", "hook-renames-and-reorders"])
def test_a_load_state_dict_pre_hook_runs_before_muonkit_reads_the_state_dict(reorder, momentum_bits):
    """torch's register_load_state_dict_pre_hook is how a user adapts a state dict to renamed
    parameters. muonkit matched param_names (by_names) and took the 8-bit momentum from the state
    dict before the hooks ran: a hook that renamed the params left each parameter with the state
    at its position (another's), and one that reordered the state itself got its 8-bit codes from
    the old positions. The hooks now run first: the resumed run equals the continued one."""
    model, opt = _pair(("a", "b"))
    for group in opt.param_groups:
        group["momentum_bits"] = momentum_bits
    _steps(model, opt, range(3))
    torch.manual_seed(1)
    renamed = Pair(("y", "x"))  # a -> x, b -> y, listed y first
    renamed.x.weight.data.copy_(model.a.weight)
    renamed.y.weight.data.copy_(model.b.weight)
    opt_r = muonkit.Muon([{"params": list(renamed.named_parameters())}], lr=0.02, momentum_bits=momentum_bits)
    opt_r.register_load_state_dict_pre_hook(_renaming_hook({"a.weight": "x.weight", "b.weight": "y.weight"}, reorder))
    opt_r.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_r.param_groups[0]["param_names"] == ["y.weight", "x.weight"]
    for seed in range(3, 5):
        g = torch.Generator().manual_seed(seed)
        grads = {name: torch.randn(8, 8, generator=g) for name in ("a", "b")}
        model.a.weight.grad, model.b.weight.grad = grads["a"], grads["b"]
        renamed.x.weight.grad, renamed.y.weight.grad = grads["a"].clone(), grads["b"].clone()
        opt.step()
        opt_r.step()
    assert torch.equal(model.a.weight, renamed.x.weight) and torch.equal(model.b.weight, renamed.y.weight)
