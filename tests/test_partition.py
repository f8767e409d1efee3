"""muonkit.route / param_groups / explain: which parameter goes to Muon or AdamW, and why.

Oracles: the seed notebook's explicit split on its own network, and the roles of API.md
(embeddings, tied weights, output layer, input stem, 0D/1D and thin matrices -> AdamW; other
Linear/Conv weights and >=2D parameters -> Muon), written out by hand per model.
"""

from __future__ import annotations

import io
import warnings

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
def test_seed_net_routing_is_the_notebooks(with_inputs):
    """Muon for every 4D conv weight except the stem '0.weight', the depthwise filters included (one
    96 x 9 matrix each, the notebook's reading, chosen by training: benchmarks/RESULTS.md); AdamW
    for everything else, including the ECA Conv1d (1, 1, 3) weights and the head '8.4.weight'."""
    model = seed_net()
    kw = {"example_inputs": MODELS["seed_net"][1]} if with_inputs else {}
    decisions = {d.name: d for d in muonkit.route(model, **kw)}
    muon_names, adamw_names = notebook_split(model)
    expected = {**{n: "muon" for n in muon_names}, **{n: "adamw" for n in adamw_names}}
    assert {n: d.optimizer for n, d in decisions.items()} == expected
    assert decisions["1.residual.3.conv.weight"].optimizer == "adamw"
    assert decisions["8.4.weight"].optimizer == "adamw"
    depthwise = decisions["1.residual.1.weight"]
    assert depthwise.layout == "conv"
    assert "depthwise" in depthwise.reason and "96x9" in depthwise.reason and "measured" in depthwise.reason


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
            assert g["layout"] == "conv"  # every 4D filter, depthwise or not, is out x in/groups*kernel


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


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_tied_head_is_named_on_its_embeddings_row(tied):
    """named_parameters() lists a tied weight once (as wte.weight): the row says lm_head.weight is the
    same tensor, so that explain's table does not seem to leave the head out."""
    decisions = {d.name: d for d in muonkit.route(GPT(tied=tied))}
    assert ("lm_head.weight" in decisions) != tied
    assert decisions["wte.weight"].reason.endswith("; also lm_head.weight (tied: the same tensor)") == tied
    assert all("tied: the same tensor" not in d.reason for n, d in decisions.items() if n != "wte.weight")


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
    inputs = {"example_inputs": (torch.randn(2, 8),)}  # shows `table` used as a matrix
    got = routing(model, **inputs)
    assert got["squeeze.weight"] == "adamw" and got["expand.weight"] == "adamw"
    assert got["mid.weight"] == "muon" and got["table"] == "muon"
    got4 = routing(model, min_size=4, **inputs)
    assert got4["mid.weight"] == "adamw" and got4["table"] == "adamw"
    got1 = routing(model, min_size=1, **inputs)
    assert got1["squeeze.weight"] == "muon" and got1["expand.weight"] == "muon"


def test_bare_parameters_by_rank():
    """Parameters outside known layers: 0D/1D -> adamw; >=2D (free) -> adamw without example
    inputs, with a reason naming the three ways to send them to Muon."""

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 8)
            self.experts = nn.Parameter(torch.randn(3, 8, 8))
            self.scale = nn.Parameter(torch.ones(8))
            self.temperature = nn.Parameter(torch.tensor(1.0))
            self.head = nn.Linear(8, 2)

    decisions = {d.name: d for d in muonkit.route(Bare())}
    assert decisions["experts"].optimizer == "adamw"
    reason = decisions["experts"].reason
    assert "muon=['experts']" in reason and "predicate" in reason and "example_inputs" in reason
    assert decisions["scale"].optimizer == "adamw" and decisions["temperature"].optimizer == "adamw"
    assert routing(Bare(), muon=["experts"])["experts"] == "muon"


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


@pytest.mark.parametrize("call", [muonkit.route, muonkit.param_groups, muonkit.explain])
def test_routing_given_parameters_instead_of_the_model_says_so(call):
    """torch.optim's habit, param_groups(model.parameters()): a TypeError that says to pass the
    model, instead of "'generator' object has no attribute 'named_parameters'"."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    for wrong, kind in ((model.parameters(), "generator"), (list(model.parameters()), "list")):
        with pytest.raises(TypeError, match=rf"takes the model \(a torch.nn.Module\), got {kind}: .*"
                                            r"param_groups\(model\), not model.parameters\(\)"):
            call(wrong)


def test_a_norm_class_of_its_own_is_named_a_norm():
    """transformers' LlamaRMSNorm and the like (not torch norms) read "1D norm gain or shift of
    LlamaRMSNorm", as torch's RMSNorm does, not "1D bias or scale vector"."""
    class LlamaRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

    model = nn.ModuleDict({"norm": LlamaRMSNorm(), "torch_norm": nn.RMSNorm(8), "fc": nn.Linear(8, 8)})
    reasons = {d.name: d.reason for d in muonkit.route(model, adamw=["fc.weight"])}  # no order warning
    assert reasons["norm.weight"] == "1D norm gain or shift of LlamaRMSNorm"
    assert reasons["torch_norm.weight"] == "1D norm gain or shift of RMSNorm"
    assert reasons["fc.bias"] == "1D bias or scale vector of Linear"


def test_explain_summary_counts_in_words():
    """The summary line under the table: "muon: 1 tensor", not "1 tensors"."""
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 2, bias=False))
    text = muonkit.explain(model, file=None, example_inputs=(torch.randn(2, 4),))
    assert "adamw: 2 tensors, 48 values, muon: 1 tensor, 64 values" in text


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


def test_a_layout_in_muon_options_is_refused_rather_than_overriding_every_routed_layout():
    # GPT-2's Conv1D stores (in, out): routing gives its groups a transposed Layout, which a
    # muon_options layout used to overwrite silently.
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    layouts = {repr(g["layout"]) for g in muonkit.param_groups(model) if g["use_muon"]}
    assert len(layouts) > 1, layouts  # several routed layouts that one option would have replaced
    with pytest.raises(ValueError, match=r"muon_options=\{'layout': 'stacked'\} would replace the layout.*predicate="):
        muonkit.param_groups(model, muon_options={"layout": "stacked", "lr": 0.02})


def test_param_groups_accept_route_keywords():
    groups = muonkit.param_groups(mlp(), muon=["0.weight"])
    muon_names = [n for g in groups if g["use_muon"] for n in g["param_names"]]
    assert "0.weight" in muon_names


# ---- free parameters: role from how the forward pass uses them ------------------------------

class Experts(nn.Module):
    """Stacked expert weights (experts, in, out), owned by the module itself; `how` picks the
    spelling of the batched product (all three reach aten.bmm)."""

    def __init__(self, experts=4, d=16, hidden=32, how="einsum"):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, d, hidden) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, d) / hidden**0.5)
        self.how = how

    def forward(self, x):  # (batch, tokens, d) -> same; every expert sees every token
        if self.how == "einsum":
            h = torch.einsum("btd,edh->beth", x, self.w_in).relu()
            return torch.einsum("beth,ehd->btd", h, self.w_out)
        if self.how == "bmm":
            flat = x.reshape(1, -1, x.shape[-1]).expand(self.w_in.shape[0], -1, -1)
            out = torch.bmm(torch.bmm(flat, self.w_in).relu(), self.w_out)
            return out.sum(0).reshape(x.shape)
        return ((x.unsqueeze(1) @ self.w_in).relu() @ self.w_out).sum(1)


class FreeParams(nn.Module):
    """A ViT-like front (cls token concatenated, position table added), learned queries fed to a
    Linear, a layer-scale vector, stacked experts, an unused matrix, and a Linear head."""

    def __init__(self, how="einsum"):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16))
        self.queries = nn.Parameter(torch.randn(3, 16))
        self.q_proj = nn.Linear(16, 16)
        self.gamma = nn.Parameter(torch.ones(1, 1, 16))
        self.experts = Experts(how=how)
        self.unused = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # (batch, 4, 8)
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = x + self.q_proj(self.queries).mean(0)
        x = x + self.gamma * self.experts(x)
        return self.head(x.mean(1))


FREE_INPUTS = (torch.randn(2, 4, 8),)


@pytest.mark.parametrize("how", ["einsum", "bmm", "matmul"])
def test_free_parameters_routed_by_their_use(how):
    """Consumed only as a matrix-product operand -> Muon; added (pos_embed), concatenated
    (cls_token), multiplied elementwise (gamma), fed to a layer (queries) or unused -> AdamW.
    The experts are stored (experts, in, out): their view is experts matrices of out x in."""
    model = FreeParams(how)
    decisions = {d.name: d for d in muonkit.route(model, example_inputs=FREE_INPUTS)}
    got = {n: d.optimizer for n, d in decisions.items()}
    assert got["experts.w_in"] == got["experts.w_out"] == "muon"
    for name in ("cls_token", "pos_embed", "queries", "gamma", "unused"):
        assert got[name] == "adamw", name
    assert "aten.add" in decisions["pos_embed"].reason
    assert "aten.cat" in decisions["cls_token"].reason
    assert "aten.mul" in decisions["gamma"].reason
    assert "q_proj.weight" in decisions["queries"].reason
    assert "not used" in decisions["unused"].reason
    # the rules for known layers are unchanged by the free parameters around them
    assert got["embed.weight"] == "adamw" and "input stem" in decisions["embed.weight"].reason
    assert got["head.weight"] == "adamw" and "output layer" in decisions["head.weight"].reason
    assert got["q_proj.weight"] == "muon"
    for name, (experts, d_in, d_out) in {"experts.w_in": (4, 16, 32), "experts.w_out": (4, 32, 16)}.items():
        layout = muonkit.layout.resolve(decisions[name].layout, 3)
        assert muonkit.layout.matrix_shape(model.get_parameter(name).shape, layout) == (experts, d_out, d_in)


def test_free_parameters_without_inputs_go_to_adamw_and_say_how():
    decisions = {d.name: d for d in muonkit.route(FreeParams())}
    for name in ("cls_token", "pos_embed", "queries", "gamma", "unused", "experts.w_in", "experts.w_out"):
        d = decisions[name]
        assert d.optimizer == "adamw", name
        assert f"muon=['{name}']" in d.reason and "predicate" in d.reason and "example_inputs" in d.reason


def test_free_parameter_with_a_matrix_use_and_an_elementwise_use_goes_to_adamw():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(8, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.stem(x)
            return self.head(h @ self.w + self.w.sum(0))

    d = {d.name: d for d in muonkit.route(Mixed(), example_inputs=(torch.randn(3, 8),))}["w"]
    assert d.optimizer == "adamw" and "aten.sum" in d.reason


def test_free_parameters_take_part_in_stem_and_output_by_execution_order():
    """A free matrix used first is the input stem, one used last is the output layer."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(8, 16))  # x @ w_in: stored (in, out)
            self.hidden = nn.Linear(16, 16)
            self.w_out = nn.Parameter(torch.randn(4, 16))  # F.linear: stored (out, in)

        def forward(self, x):
            return nn.functional.linear(torch.relu(self.hidden(x @ self.w_in)), self.w_out)

    decisions = {d.name: d for d in muonkit.route(Functional(), example_inputs=(torch.randn(3, 8),))}
    assert decisions["w_in"].optimizer == "adamw" and "input stem" in decisions["w_in"].reason
    assert decisions["w_out"].optimizer == "adamw" and "output layer" in decisions["w_out"].reason
    assert decisions["hidden.weight"].optimizer == "muon"


def test_free_conv_filter_gets_the_conv_view():
    class CustomConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.filt = nn.Parameter(torch.randn(16, 8, 3, 3))
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = nn.functional.conv2d(self.stem(x), self.filt)
            return self.head(h.mean((2, 3)))

    d = {d.name: d for d in muonkit.route(CustomConv(), example_inputs=(torch.randn(1, 3, 9, 9),))}["filt"]
    assert d.optimizer == "muon" and d.layout == "conv" and "16x72" in d.reason


def test_example_inputs_as_keywords_and_a_bare_tensor_refused():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(8, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x, *, scale=1.0):
            return self.head(self.stem(x) @ self.w * scale)

    assert routing(Keywords(), example_inputs={"x": torch.randn(3, 8), "scale": 2.0})["w"] == "muon"
    with pytest.raises(TypeError, match=r"example_inputs must be a tuple .* got Tensor"):
        muonkit.route(Keywords(), example_inputs=torch.randn(3, 8))


def test_route_keeps_each_modules_mode_and_no_grad():
    model = FreeParams()
    model.train()
    model.q_proj.eval()
    muonkit.route(model, example_inputs=FREE_INPUTS)
    assert model.training and model.experts.training and not model.q_proj.training
    assert all(p.grad is None for p in model.parameters())


# ---- a predicate that declares a layout -----------------------------------------------------

def test_predicate_declares_a_layout():
    """A Layout, or ("muon", layout), sends a parameter to Muon with that matrix view; the group
    carries it and Muon accepts the groups as they are."""
    model = FreeParams()
    transposed = muonkit.Layout(rows=(2,), cols=(1,), batch=(0,))

    def predicate(name, p, module):
        if name == "experts.w_in":
            return transposed
        if name == "unused":
            return ("muon", "conv")
        return None

    decisions = {d.name: d for d in muonkit.route(model, predicate=predicate)}
    assert decisions["experts.w_in"].optimizer == "muon" and decisions["experts.w_in"].layout == transposed
    assert "Layout(rows=(2,)" in decisions["experts.w_in"].reason
    assert decisions["unused"].optimizer == "muon" and decisions["unused"].layout == "conv"
    groups = muonkit.param_groups(model, predicate=predicate)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["experts.w_in"]["layout"] == transposed and by_name["unused"]["layout"] == "conv"
    muonkit.Muon(groups)


@pytest.mark.parametrize("result, words", [
    (muonkit.Layout(rows=(0,), cols=(1,)), "must name every axis"),
    (("muon", "diagonal"), "unknown layout"),
    (("adamw", "conv"), "expected 'muon', 'adamw', a muonkit.Layout"),
    ("sgd", "expected 'muon', 'adamw'"),
])
def test_predicate_with_a_bad_layout_names_the_parameter(result, words):
    with pytest.raises(ValueError, match=words) as info:
        muonkit.route(FreeParams(), predicate=lambda n, p, m: result if n == "experts.w_in" else None)
    assert "experts.w_in" in str(info.value)


# ---- weight decay ---------------------------------------------------------------------------

class Listed(nn.Module):
    """timm's no_weight_decay() convention, at the top and in a submodule, with a name, a
    pattern and a module prefix."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones(2, 1, 1))
            self.qkv = nn.Linear(8, 24)

        def no_weight_decay(self):
            return {"temperature"}

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.rel_bias_0 = nn.Parameter(torch.zeros(4, 4))
        self.pos_block = nn.Linear(8, 8)
        self.attn = Listed.Attention()
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def no_weight_decay(self):
        return ["pos_embed", "rel_bias_*", "pos_block"]


def test_decay_follows_rank_and_no_weight_decay():
    decisions = {d.name: d for d in muonkit.route(Listed())}
    expected_zero = {
        "stem.bias": "1D", "pos_block.bias": "1D", "attn.qkv.bias": "1D", "hidden.bias": "1D", "head.bias": "1D",
        "pos_embed": "model.no_weight_decay()", "rel_bias_0": "model.no_weight_decay()",
        "pos_block.weight": "model.no_weight_decay()", "attn.temperature": "attn.no_weight_decay()",
    }
    assert {n: d.no_decay for n, d in decisions.items() if d.no_decay} == expected_zero
    off = muonkit.route(Listed(), exclude_from_decay=False)
    assert all(d.no_decay is None for d in off)


def test_param_groups_keep_no_decay_at_zero_whatever_the_weight_decay():
    """Decayed parameters shrink by (1 - lr * wd) in a step with zero gradients (Muon's and
    AdamW's updates of a zero gradient are zero); the others do not move. Muon(weight_decay=),
    adamw_weight_decay= and the options change the first kind only."""
    torch.manual_seed(0)
    model = Listed()
    groups = muonkit.param_groups(model, muon=["pos_block.weight"], adamw_options={"weight_decay": 0.3})
    zero = {d.name for d in muonkit.route(model) if d.no_decay}
    opt = muonkit.Muon(groups, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    muon_names = {n for g in groups if g["use_muon"] for n in g["param_names"]}
    assert "pos_block.weight" in muon_names and "pos_block.weight" in zero  # a Muon group without decay
    for name, p in model.named_parameters():
        wd = 0.0 if name in zero else 0.5 if name in muon_names else 0.3
        torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * wd), rtol=0, atol=0, msg=name)


def test_explain_shows_each_parameters_decay():
    text = muonkit.explain(Listed(), file=None)
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert " default " in rows["hidden.weight"]
    assert "0 (1D)" in rows["hidden.bias"]
    assert "0 (model.no_weight_decay())" in rows["pos_embed"]
    assert "0 (attn.no_weight_decay())" in rows["attn.temperature"]
    assert "'default' is the weight_decay of the parameter's group" in text


@pytest.mark.parametrize("listing, words", [
    (lambda: "pos_embed", "must return a collection of names"),
    (lambda: {1}, "expected parameter names"),
])
def test_bad_no_weight_decay_is_a_clear_error(listing, words):
    model = Listed()
    model.no_weight_decay = listing
    with pytest.raises(TypeError, match=words):
        muonkit.route(model)


# ---- grouped convolutions and fused attention projections -----------------------------------

def polar64(m):
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u @ vh


def _conv_step(model, **routing):
    """One Muon step (exact polar factor, "mup" scale sqrt(rows/cols), which tells rows from cols) on
    random gradients of model[1] (a conv) and model[2] (a ConvTranspose): {weight: (grad, update / lr)}."""
    groups = muonkit.param_groups(model, muon_options={"scale": "mup", "orthogonalizer": "svd"}, **routing)
    opt = muonkit.Muon(groups, lr=0.01, weight_decay=0.0)
    weights = (model[1].weight, model[2].weight)
    grads = {p: torch.randn_like(p) for p in weights}
    before = {p: p.detach().clone() for p in weights}
    for p, g in grads.items():
        p.grad = g.clone()
    opt.step()
    return {p: (grads[p], (before[p] - p.detach()).double() / 0.01) for p in weights}


def _grouped_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, groups=4), nn.ConvTranspose2d(32, 16, 3, groups=2),
                         nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 16, 1), nn.Linear(16, 2))


def _convtranspose_per_group(grad):
    expected = torch.empty_like(grad, dtype=torch.float64)
    for j in range(2):  # in axis blocks of 16: rows out/g = 8, cols 16 * 3 * 3
        block = grad[16 * j:16 * j + 16].permute(1, 0, 2, 3).reshape(8, 144)
        expected[16 * j:16 * j + 16] = (polar64(block) * (8 / 144) ** 0.5).reshape(8, 16, 3, 3).permute(1, 0, 2, 3)
    return expected


def test_grouped_and_depthwise_convolutions_are_one_matrix():
    """A conv with groups=g, depthwise included, is one out x (in/g*kernel) matrix (Keller Jordan's
    flattening, the reading training chose: benchmarks/RESULTS.md); a ConvTranspose (stored
    (in, out/g, *kernel)) is g matrices (out/g) x (in/g*kernel) cut along its in axis. Oracle: one
    Muon step against float64 polar factors written from those definitions."""
    model = _grouped_convs()
    decisions = {d.name: d for d in muonkit.route(model)}
    assert decisions["1.weight"].optimizer == decisions["2.weight"].optimizer == "muon"
    assert decisions["1.weight"].layout == "conv" and "32x36" in decisions["1.weight"].reason
    assert "grouped conv filter (groups=4)" in decisions["1.weight"].reason
    assert "2 matrices 8x144" in decisions["2.weight"].reason
    assert decisions["3.weight"].optimizer == "muon" and decisions["3.weight"].layout == "conv"
    assert "depthwise conv filter (groups=16) 16x9" in decisions["3.weight"].reason
    assert decisions["4.weight"].optimizer == "muon" and decisions["4.weight"].layout == "conv"

    (conv, conv_step), (convt, convt_step) = _conv_step(model).items()
    expected = (polar64(conv_step[0].reshape(32, 36)) * (32 / 36) ** 0.5).reshape(32, 4, 3, 3)
    torch.testing.assert_close(conv_step[1], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(convt_step[1], _convtranspose_per_group(convt_step[0]), rtol=0, atol=1e-5)


def test_grouped_convolutions_per_group_or_adamw_by_predicate():
    """The other readings stay one predicate away: Layout.per_block(groups, ndim) gives g matrices
    (out/g) x (in/g*kernel) (a depthwise filter: C matrices 1 x kernel), "adamw" sends the filter to
    AdamW. Oracle: float64 per-group polar factors."""
    def per_group(name, p, module):
        if isinstance(module, nn.Conv2d) and module.groups > 1 and p.ndim == 4:
            return muonkit.Layout.per_block(module.groups, p.ndim)
        return None

    model = _grouped_convs()
    decisions = {d.name: d for d in muonkit.route(model, predicate=per_group)}
    assert "4 matrices 8x36" in decisions["1.weight"].reason and "16 matrices 1x9" in decisions["3.weight"].reason
    (conv, conv_step), _ = _conv_step(model, predicate=per_group).items()
    expected = torch.empty_like(conv, dtype=torch.float64)
    for j in range(4):  # out axis blocks of 8: rows 8, cols 4 * 3 * 3
        block = conv_step[0][8 * j:8 * j + 8].reshape(8, 36)
        expected[8 * j:8 * j + 8] = (polar64(block) * (8 / 36) ** 0.5).reshape(8, 4, 3, 3)
    torch.testing.assert_close(conv_step[1], expected, rtol=0, atol=1e-5)

    to_adamw = {d.name: d.optimizer for d in muonkit.route(
        model, predicate=lambda n, p, m: "adamw" if isinstance(m, nn.Conv2d) and m.groups > 1 and p.ndim == 4 else None)}
    assert to_adamw["1.weight"] == to_adamw["3.weight"] == "adamw" and to_adamw["4.weight"] == "muon"


def test_free_grouped_convolution_is_read_from_the_call():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.filt = nn.Parameter(torch.randn(16, 4, 3, 3))
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(nn.functional.conv2d(self.stem(x), self.filt, groups=2).mean((2, 3)))

    d = {d.name: d for d in muonkit.route(Grouped(), example_inputs=(torch.randn(1, 3, 9, 9),))}["filt"]
    assert d.optimizer == "muon" and d.layout == "conv" and "16x36" in d.reason and "in/groups*kernel" in d.reason


def test_multihead_attention_in_proj_is_q_k_and_v():
    model = nn.Sequential(nn.Linear(8, 16), nn.MultiheadAttention(16, 2), nn.Linear(16, 2))
    d = {d.name: d for d in muonkit.route(model)}["1.in_proj_weight"]
    assert d.optimizer == "muon" and d.layout == muonkit.Layout.per_block(3)
    assert muonkit.layout.matrix_shape((48, 16), d.layout) == (3, 16, 16)


def test_free_parameters_are_stem_and_output_by_what_they_read_and_write():
    """The forward pass is the evidence for free matrices too: no order fallback, no warning."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(8, 16))
            self.hidden = nn.Linear(16, 16)
            self.w_out = nn.Parameter(torch.randn(4, 16))

        def forward(self, x):
            return nn.functional.linear(torch.relu(self.hidden(x @ self.w_in)), self.w_out)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decisions = {d.name: d for d in muonkit.route(Functional(), example_inputs=(torch.randn(3, 8),))}
    evidence = "in the forward pass over example_inputs"
    assert decisions["w_in"].reason == f"input stem (Functional): it reads the model's input {evidence}"
    assert decisions["w_out"].reason == f"output layer (Functional): its output is the model's output {evidence}"


class _Experts(nn.Module):
    """Stacked experts of a hand-written MoE block: an int num_experts and (experts, in, out) tensors,
    as Llama 4's Llama4TextExperts (no transformers `is_transposed` flag)."""

    def __init__(self, experts: int, d: int, hidden: int):
        super().__init__()
        self.num_experts = experts
        self.up = nn.Parameter(torch.randn(experts, d, hidden) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) / hidden**0.5)

    def forward(self, x):  # every token through every expert, weighted by the router outside
        return torch.bmm(torch.relu(torch.bmm(x.expand(self.num_experts, -1, -1), self.up)), self.down)


class _MoE(nn.Module):
    def __init__(self, experts: int = 4, d: int = 16, hidden: int = 24):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = _Experts(experts, d, hidden)

    def forward(self, x):
        weights = torch.softmax(self.router(x), dim=-1)  # (tokens, experts)
        return torch.einsum("te,etd->td", weights, self.experts(x))


@pytest.mark.parametrize("with_inputs", [False, True])
def test_the_router_of_experts_without_the_transformers_flag_goes_to_adamw(with_inputs):
    """docs/API.md rule 4: an MoE router goes to AdamW with or without example_inputs; a block whose
    experts module has an int num_experts and stacked tensors of that many matrices has one, even
    without transformers' is_transposed (Llama 4's experts, hand-written MoE blocks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 16), _MoE(), nn.Linear(16, 16), nn.Linear(16, 10))
    inputs = {"example_inputs": (torch.randint(0, 10, (6,)),)} if with_inputs else {}
    decisions = {d.name: d for d in muonkit.route(model, adamw=["3.weight"], **inputs)}
    router = decisions["1.router.weight"]
    assert router.optimizer == "adamw" and router.reason.startswith("MoE router of _MoE (4 experts x 16)")
    assert decisions["2.weight"].optimizer == "muon"


class _SquareExperts(nn.Module):
    """Square stacked experts (d x d each), one used as x @ W (stored (experts, in, out)), one as
    x @ W^T (stored (experts, out, in)): only the operand's orientation tells the two apart."""

    def __init__(self, experts: int = 3, d: int = 8):
        super().__init__()
        self.num_experts = experts
        self.w_in = nn.Parameter(torch.randn(experts, d, d))
        self.w_out = nn.Parameter(torch.randn(experts, d, d))

    def forward(self, x):
        h = torch.bmm(x.expand(self.num_experts, -1, -1), self.w_in)
        return torch.bmm(h, self.w_out.transpose(1, 2)).sum(0)


def test_a_square_free_matrix_is_read_in_the_orientation_the_product_uses():
    """Both readings fit a square matrix's shape, and NorMuon (per output row) and Dion2 (rows) need the
    right one: x @ W makes W's rows its inputs, (experts, in, out); x @ W^T keeps (experts, out, in)."""
    model = nn.Sequential(nn.Linear(8, 8), _SquareExperts(), nn.Linear(8, 8))
    decisions = {d.name: d for d in muonkit.route(model, adamw=["0.weight", "2.weight"], example_inputs=(torch.randn(5, 8),))}
    assert decisions["1.w_in"].optimizer == "muon" and decisions["1.w_out"].optimizer == "muon"
    assert decisions["1.w_in"].layout == muonkit.Layout(rows=(2,), cols=(1,), batch=(0,)), decisions["1.w_in"]
    assert "stored (..., in, out)" in decisions["1.w_in"].reason
    assert decisions["1.w_out"].layout is None or decisions["1.w_out"].layout == "stacked", decisions["1.w_out"]


class _HeadFirst(nn.Module):
    """A classifier whose head is registered before its backbone (docs/API.md: found by its name)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 5)
        self.stem = nn.Linear(8, 32)
        self.blocks = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_a_wrapped_model_is_routed_as_the_model_it_wraps(wrap):
    """torch.compile(model) and nn.DataParallel(model) only prefix the names (`_orig_mod.`, `module.`):
    the head attribute of the wrapped model is still the output layer. Without looking inside, order
    alone decided (a warning) and took the last hidden block for the output layer."""
    torch.manual_seed(0)
    model = _HeadFirst()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model, device_ids=[])
    prefix = "_orig_mod." if wrap == "compile" else "module."
    plain = [(d.name, d.optimizer, d.layout) for d in muonkit.route(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = [(d.name.removeprefix(prefix), d.optimizer, d.layout) for d in muonkit.route(wrapped)]
    assert inside == plain
    assert dict((n, o) for n, o, _ in plain)["blocks.2.weight"] == "muon"


def test_a_router_trained_through_peft_modules_to_save_stays_a_router():
    """PEFT's modules_to_save trains a copy of the router inside a ModulesToSaveWrapper, one module
    further from the experts: still the MoE router (AdamW); it went to Muon as a hidden Linear."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 16), _MoE(), nn.Linear(16, 16), nn.Linear(16, 10))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["2"], modules_to_save=["router"]))
    decisions = {d.name: d for d in muonkit.route(model, adamw=["base_model.model.3.weight"])}
    router = decisions["base_model.model.1.router.modules_to_save.default.weight"]
    assert router.optimizer == "adamw" and router.reason.startswith("MoE router"), router


def test_a_parameter_marked_no_weight_decay_as_mamba_ssm_does_is_not_decayed():
    """mamba_ssm marks the parameters its recipe does not decay with an attribute (Mamba's
    `A_log._no_weight_decay = True`, a (d_inner, d_state) matrix); muonkit ignored the mark and
    decayed A_log. It now gets weight decay 0 and explain() says why; routing is unchanged."""

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj = nn.Linear(8, 16)
            self.A_log = nn.Parameter(torch.zeros(16, 4))
            self.A_log._no_weight_decay = True
            self.out_proj = nn.Linear(16, 8)

        def forward(self, x):
            return self.out_proj(self.in_proj(x) * -torch.exp(self.A_log).sum(-1))

    model = nn.Sequential(nn.Linear(8, 8), Mixer(), nn.Linear(8, 3))
    for routing in ({}, {"example_inputs": (torch.randn(2, 8),)}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the order-alone warning of this bare Sequential
            d = {d.name: d for d in muonkit.route(model, **routing)}["1.A_log"]
        assert d.optimizer == "adamw" and d.no_decay.startswith("the parameter's _no_weight_decay=True"), d
    groups = muonkit.param_groups(model, adamw=["2.weight"])
    assert [g.get("weight_decay") for g in groups if "1.A_log" in g["param_names"]] == [0.0]
    assert "0 (the parameter's _no_weight_decay=True" in muonkit.explain(model, file=None, adamw=["2.weight"])


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_a_model_wrapped_by_fsdp1_is_refused(one_rank_group, use_orig_params):
    """FSDP1 (FullyShardedDataParallel) flattens the parameters into one 1-D FlatParameter: routing sent
    it to AdamW as a "1D bias or scale vector", so no matrix was trained by Muon, silently (with
    use_orig_params=True, each rank sees 1-D views of its shard). Refused, pointing to FSDP2."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)), device_id=torch.device("cpu"),
                                     use_orig_params=use_orig_params)
    for call in (muonkit.param_groups, muonkit.route):
        with pytest.raises(ValueError, match=r"the model is wrapped by FSDP1 .* Shard with FSDP2"):
            call(model)
