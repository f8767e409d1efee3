"""muonkit.route / param_groups / explain: which parameter goes to Muon or AdamW, and why.

Oracles: the seed notebook's explicit split on its own network, and the roles of API.md
(embeddings, tied weights, output layer, input stem, 0D/1D and thin matrices -> AdamW; other
Linear/Conv weights and >=2D parameters -> Muon), written out by hand per model.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import muonkit
from seed_net import Net, notebook_split, reset_parameters


def routing(model, **kw):
    return {d.name: d.optimizer for d in muonkit.route(model, **kw)}


# ---- models ---------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).mT / h.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(att @ self.v(h))
        return x + self.proj(torch.relu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=32, block_size=8, d=16, layers=2, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt_expected(model):
    """Hidden Linear weights -> muon; embeddings, head, norms, biases -> adamw."""
    hidden = ("q", "k", "v", "o", "fc", "proj")
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        is_hidden = parts[0] == "blocks" and parts[2] in hidden and parts[3] == "weight"
        out[name] = "muon" if is_hidden else "adamw"
    return out


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


MLP_EXPECTED = {
    "0.weight": "adamw", "0.bias": "adamw",  # input stem
    "2.weight": "muon", "2.bias": "adamw",
    "4.weight": "muon", "4.bias": "adamw",
    "6.weight": "adamw", "6.bias": "adamw",  # output layer
}


class Reordered(nn.Module):
    """Registration order b1, stem, b2, head; execution order stem, b1, b2, head."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Linear(16, 16)
        self.stem = nn.Linear(8, 16)
        self.b2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b2(torch.relu(self.b1(torch.relu(self.stem(x)))))))


def seed_net():
    torch.manual_seed(0)
    model = Net(10, width=96)
    reset_parameters(model)
    return model


MODELS = {
    "seed_net": (seed_net, (torch.randn(2, 3, 16, 16),)),
    "gpt_tied": (lambda: GPT(tied=True), (torch.randint(0, 32, (2, 8)),)),
    "gpt_untied": (lambda: GPT(tied=False), (torch.randint(0, 32, (2, 8)),)),
    "mlp": (mlp, (torch.randn(2, 8),)),
    "reordered": (Reordered, (torch.randn(2, 8),)),
}


# ---- routing --------------------------------------------------------------------------------

@pytest.mark.parametrize("with_inputs", [False, True], ids=["registration", "execution"])
def test_seed_net_routing_equals_notebook(with_inputs):
    """Muon for every 4D conv weight except the stem '0.weight'; AdamW for everything else,
    including the ECA Conv1d (1, 1, 3) weights and the head '8.4.weight'."""
    model = seed_net()
    kw = {"example_inputs": MODELS["seed_net"][1]} if with_inputs else {}
    got = routing(model, **kw)
    muon_names, adamw_names = notebook_split(model)
    expected = {**{n: "muon" for n in muon_names}, **{n: "adamw" for n in adamw_names}}
    assert got == expected
    assert got["1.residual.3.conv.weight"] == "adamw"
    assert got["8.4.weight"] == "adamw"


def test_seed_net_param_groups_equal_notebook_split():
    model = seed_net()
    muon_names, adamw_names = notebook_split(model)
    groups = muonkit.param_groups(model)
    muon = [n for g in groups if g["use_muon"] for n in g["param_names"]]
    adamw = [n for g in groups if not g["use_muon"] for n in g["param_names"]]
    assert sorted(muon) == sorted(muon_names)
    assert sorted(adamw) == sorted(adamw_names)
    for g in groups:
        if g["use_muon"]:
            assert g["layout"] == "conv"  # all 4D filters


@pytest.mark.parametrize("with_inputs", [False, True], ids=["registration", "execution"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_routing(tied, with_inputs):
    model = GPT(tied=tied)
    kw = {"example_inputs": (torch.randint(0, 32, (2, 8)),)} if with_inputs else {}
    got = routing(model, **kw)
    expected = gpt_expected(model)
    assert {n: got[n] for n in expected} == expected
    # A tied head shares the embedding's tensor: if route lists it under its own name too, it
    # must agree (one tensor, one optimizer).
    for extra in set(got) - set(expected):
        assert got[extra] == "adamw", extra
    if not tied:
        assert got["lm_head.weight"] == "adamw"
    assert got["wte.weight"] == "adamw" and got["wpe.weight"] == "adamw"


@pytest.mark.parametrize("with_inputs", [False, True], ids=["registration", "execution"])
def test_mlp_stem_and_output_to_adamw(with_inputs):
    kw = {"example_inputs": (torch.randn(2, 8),)} if with_inputs else {}
    assert routing(mlp(), **kw) == MLP_EXPECTED


def test_execution_order_decides_stem_and_head_when_inputs_given():
    """Without inputs registration order stands in (b1 is 'first', head is last); with inputs
    the layer that reads the input (stem) is the stem."""
    model = Reordered()
    by_execution = routing(model, example_inputs=(torch.randn(2, 8),))
    assert by_execution["stem.weight"] == "adamw"
    assert by_execution["b1.weight"] == "muon"
    assert by_execution["b2.weight"] == "muon"
    assert by_execution["head.weight"] == "adamw"
    by_registration = routing(model)
    assert by_registration["b1.weight"] == "adamw"
    assert by_registration["stem.weight"] == "muon"
    assert by_registration["head.weight"] == "adamw"


def test_stem_only_before_embedding():
    """A Linear after an Embedding is not an input stem (GPT's first q projection is hidden)."""
    got = routing(GPT(layers=1))
    assert got["blocks.0.q.weight"] == "muon"


def test_min_size():
    """A matrix whose smaller side is < min_size goes to AdamW."""

    class Thin(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 16)
            self.squeeze = nn.Linear(16, 1)
            self.expand = nn.Linear(1, 16)
            self.mid = nn.Linear(16, 3)
            self.head = nn.Linear(3, 4)
            self.table = nn.Parameter(torch.randn(3, 16))

        def forward(self, x):
            h = self.expand(self.squeeze(self.stem(x)))
            return self.head(self.mid(h) + (h @ self.table.T))

    model = Thin()
    got = routing(model)
    assert got["squeeze.weight"] == "adamw" and got["expand.weight"] == "adamw"
    assert got["mid.weight"] == "muon" and got["table"] == "muon"
    got4 = routing(model, min_size=4)
    assert got4["mid.weight"] == "adamw" and got4["table"] == "adamw"
    got1 = routing(model, min_size=1)
    assert got1["squeeze.weight"] == "muon" and got1["expand.weight"] == "muon"


def test_bare_parameters_by_rank():
    """Parameters outside Linear/Conv: >=2D -> muon, 0D/1D -> adamw."""

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 8)
            self.experts = nn.Parameter(torch.randn(3, 8, 8))
            self.scale = nn.Parameter(torch.ones(8))
            self.temperature = nn.Parameter(torch.tensor(1.0))
            self.head = nn.Linear(8, 2)

    got = routing(Bare())
    assert got["experts"] == "muon"
    assert got["scale"] == "adamw" and got["temperature"] == "adamw"


# ---- overrides ------------------------------------------------------------------------------

def test_predicate_overrides_roles():
    seen_modules = {}

    def predicate(name, param, module):
        seen_modules[name] = module
        if name == "0.weight":
            return "muon"
        if name == "2.weight":
            return "adamw"
        return None

    got = routing(mlp(), predicate=predicate)
    assert got["0.weight"] == "muon"
    assert got["2.weight"] == "adamw"
    assert got["4.weight"] == "muon" and got["6.weight"] == "adamw"  # None falls through
    assert isinstance(seen_modules["2.weight"], nn.Linear)


def test_explicit_names_override_roles_and_predicate():
    got = routing(mlp(), muon=["0.weight"], adamw=["4.weight"],
                  predicate=lambda name, p, m: "adamw" if name == "0.weight" else None)
    assert got["0.weight"] == "muon"
    assert got["4.weight"] == "adamw"
    assert got["2.weight"] == "muon"


def test_override_reason_says_so():
    decisions = {d.name: d for d in muonkit.route(mlp(), adamw=["4.weight"])}
    default = {d.name: d for d in muonkit.route(mlp())}
    assert decisions["4.weight"].reason != default["4.weight"].reason


# ---- decisions, explain, param_groups -------------------------------------------------------

@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_decision_has_a_reason(model_name):
    factory, inputs = MODELS[model_name]
    model = factory()
    names = {n for n, _ in model.named_parameters()}
    for kw in ({}, {"example_inputs": inputs}):
        decisions = muonkit.route(model, **kw)
        assert names <= {d.name for d in decisions}
        params = dict(model.named_parameters())
        for d in decisions:
            assert isinstance(d, muonkit.Decision)
            assert d.optimizer in ("muon", "adamw"), d
            assert isinstance(d.reason, str) and d.reason.strip(), d
            if d.name in params:
                assert tuple(d.shape) == tuple(params[d.name].shape)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_explain_lists_every_parameter(model_name):
    factory, inputs = MODELS[model_name]
    model = factory()
    out = io.StringIO()
    text = muonkit.explain(model, file=out)
    assert isinstance(text, str)
    printed = out.getvalue()
    for name, _ in model.named_parameters():
        assert name in text and name in printed, name
    assert text.strip() == printed.strip()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_param_groups_accepted_by_muon_as_is(model_name):
    factory, inputs = MODELS[model_name]
    model = factory()
    groups = muonkit.param_groups(model)
    decided = routing(model)
    seen = []
    for g in groups:
        assert set(g) >= {"params", "param_names", "use_muon"}
        assert len(g["params"]) == len(g["param_names"])
        for name, p in zip(g["param_names"], g["params"]):
            assert decided[name] == ("muon" if g["use_muon"] else "adamw"), name
            seen.append(p)
    unique = {id(p) for p in model.parameters()}
    assert len(seen) == len(unique) and {id(p) for p in seen} == unique  # each exactly once

    opt = muonkit.Muon(groups, lr=0.01, weight_decay=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    out = model(*inputs)
    out.float().pow(2).mean().backward()
    opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_param_groups_options_are_merged():
    groups = muonkit.param_groups(mlp(), muon_options={"lr": 0.05, "scale": "mup"},
                                  adamw_options={"lr": 1e-3, "betas": (0.8, 0.9)})
    for g in groups:
        if g["use_muon"]:
            assert g["lr"] == 0.05 and g["scale"] == "mup"
        else:
            assert g["lr"] == 1e-3 and tuple(g["betas"]) == (0.8, 0.9)
    opt = muonkit.Muon(groups)
    assert {g["lr"] for g in opt.param_groups} == {0.05, 1e-3}


def test_param_groups_accept_route_keywords():
    groups = muonkit.param_groups(mlp(), muon=["0.weight"])
    muon_names = [n for g in groups if g["use_muon"] for n in g["param_names"]]
    assert "0.weight" in muon_names
