"""torch.compile of the optimizer step (issue 13): no graph breaks in `opt.step` for the default and
the variant configurations, and a compiled step equals the eager one to float32 round-off."""

from __future__ import annotations

import pytest
import torch

import muonkit

CONFIGS = {
    "default": {},
    "normuon_cautious": dict(variant="normuon", cautious_weight_decay=True),
    "adamuon_keller_jordan": dict(variant="adamuon", orthogonalizer="keller_jordan", scale="keller_jordan"),
}


def model_and_optimizer(options: dict) -> tuple[torch.nn.Module, muonkit.Muon]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, muonkit.Muon(muonkit.param_groups(model), lr=0.01, **options)


def backward(model: torch.nn.Module, seed: int) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x).square().mean().backward()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_has_no_graph_break(config):
    model, opt = model_and_optimizer(CONFIGS[config])
    backward(model, 0)
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_step_equals_eager():
    torch._dynamo.reset()
    eager_model, eager = model_and_optimizer({})
    compiled_model, compiled = model_and_optimizer({})
    step = torch.compile(compiled.step)
    for seed in range(3):
        backward(eager_model, seed)
        backward(compiled_model, seed)
        eager.step()
        step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        for key, value in eager.state[p].items():
            torch.testing.assert_close(compiled.state[q][key], value, rtol=1e-5, atol=1e-6)
