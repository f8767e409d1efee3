"""bfloat16 parameters without master weights (issue 13): state in float32 and stochastic rounding of
the parameter update, against a float32 run of the same problem."""

from __future__ import annotations

import math

import pytest
import torch

import muonkit
from muonkit.functional import stochastic_round


def test_stochastic_round_picks_a_neighbour_and_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of the way from 1 to the next bf16
    y = stochastic_round(x, torch.bfloat16, seed=1)
    up = torch.nextafter(torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(2.0, dtype=torch.bfloat16))
    assert set(y.float().unique().tolist()) == {1.0, up.item()}
    assert y.double().mean().item() == pytest.approx(x[0].item(), abs=4e-5)
    exact = torch.tensor([0.5, -3.0, 0.0, 2.0**-130], dtype=torch.float32)  # the last is a bf16 subnormal
    assert torch.equal(stochastic_round(exact, torch.bfloat16, seed=2).float(), exact)


def _neighbours(x, dtype):
    """The two values of `dtype` around x, from their definition (nextafter)."""
    nearest = x.to(dtype)
    toward = torch.nextafter(nearest, torch.where(x > nearest.to(x.dtype), math.inf, -math.inf).to(dtype))
    return nearest.double(), toward.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_of_every_sign_and_magnitude_takes_a_neighbour_without_bias(dtype):
    """Both paths (float32 -> bfloat16 on the bits, the general one otherwise) against the definition:
    each result is one of the two neighbours, and the mean over seeds is x (within 5 sigma)."""
    g = torch.Generator().manual_seed(0)
    low = -20 if dtype == torch.float16 else -130  # into the subnormals of each
    exponents = torch.randint(low, 10, (500,), generator=g).float()
    x = torch.randn(500, generator=g) * torch.exp2(exponents)
    down, up = _neighbours(x, dtype)
    draws = torch.stack([stochastic_round(x, dtype, seed).double() for seed in range(2000)])
    assert ((draws == down) | (draws == up)).all()
    gap = (up - down).abs()
    p = torch.where(gap > 0, (x.double() - down).abs() / gap, 0.0)
    sigma = gap * (p * (1 - p) / len(draws)).sqrt()
    assert ((draws.mean(0) - x.double()).abs() <= 5 * sigma + 1e-300).all()


def test_stochastic_round_keeps_nan_and_infinities():
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0])
    special = torch.cat([special, torch.tensor([0x7F800001, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)])
    for dtype in (torch.bfloat16, torch.float16):
        y = stochastic_round(special, dtype, seed=4).float()
        assert torch.isnan(y[0]) and torch.isnan(y[5:]).all()
        assert torch.equal(y[1:5], special[1:5]) and torch.equal(y[1:5].signbit(), special[1:5].signbit())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_keeps_finite_values_beyond_the_largest_finite(dtype):
    """Between dtype's largest finite value and round-to-nearest's overflow point the upper
    neighbour would be inf: such values stay finite (round-to-nearest keeps them at the largest)."""
    largest = torch.finfo(dtype).max
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    x = torch.full((10_000,), largest * (1 + 2.0 ** -(mantissa_bits + 2)), dtype=torch.float32)  # a quarter ulp above
    assert torch.isfinite(x.to(dtype)).all()
    for seed in range(3):
        y = stochastic_round(x, dtype, seed)
        assert torch.isfinite(y).all() and (y.float() == largest).all()


def test_stochastic_round_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    x = torch.randn(1000)
    state = torch.get_rng_state()
    a, b = stochastic_round(x, torch.bfloat16, seed=7), stochastic_round(x, torch.bfloat16, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, stochastic_round(x, torch.bfloat16, seed=8))
    assert torch.equal(torch.get_rng_state(), state)
    half = stochastic_round(x, torch.float16, seed=3)
    assert half.dtype == torch.float16 and (half.float() - x).abs().max() < 2e-3


def train(dtype, *, state_dtype=None, stochastic_rounding=False, steps=150, lr=3e-4):
    """A hidden matrix (Muon) and a bias (AdamW) fitting a fixed linear map; returns the final weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    target = torch.randn(8, 32) / 4
    x = torch.randn(256, 32)
    model = model.to(dtype)
    opt = muonkit.Muon(muonkit.param_groups(model), lr=lr, weight_decay=0.0, state_dtype=state_dtype,
                       stochastic_rounding=stochastic_rounding)
    for _ in range(steps):
        loss = (model(x.to(dtype)).float() - x @ target.T).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().double() for p in model.parameters()], opt


@pytest.mark.slow
def test_float32_state_and_stochastic_rounding_follow_the_float32_run():
    """At a small lr most bf16 updates are below half an ulp: round-to-nearest in bf16 arithmetic
    loses them, float32 state plus stochastic rounding keeps their average."""
    start, _ = train(torch.float32, steps=0)
    reference, _ = train(torch.float32)
    moved = sum((r - s).norm() ** 2 for r, s in zip(reference, start)) ** 0.5

    def error(params):
        return (sum((p - r).norm() ** 2 for p, r in zip(params, reference)) ** 0.5 / moved).item()

    plain, opt = train(torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for s in opt.state.values() for k, v in s.items() if k != "step")
    kept, opt = train(torch.bfloat16, state_dtype=torch.float32, stochastic_rounding=True)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())
    rounded, _ = train(torch.bfloat16, stochastic_rounding=True)
    assert error(plain) > 0.5  # measured 0.62
    assert error(kept) < 0.2  # measured 0.09
    assert error(rounded) < 0.2  # bf16 state, stochastic rounding: measured 0.13


def test_float32_state_survives_a_state_dict_round_trip(tmp_path):
    _, opt = train(torch.bfloat16, state_dtype=torch.float32, stochastic_rounding=True, steps=3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    params, other = train(torch.bfloat16, state_dtype=torch.float32, stochastic_rounding=True, steps=0)
    other.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for a, b in zip(opt.state.values(), other.state.values()):
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_resumed_stochastic_rounding_continues_bit_for_bit(tmp_path):
    """The rounding seed comes from each parameter's step count and place, not from an RNG state."""
    def run(steps, resume=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).bfloat16()
        opt = muonkit.Muon(muonkit.param_groups(model), lr=1e-3, state_dtype=torch.float32, stochastic_rounding=True)
        if resume is not None:
            model.load_state_dict(resume[0])
            opt.load_state_dict(resume[1])
        x = torch.randn(4, 8).bfloat16()
        for _ in range(steps):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            torch.manual_seed(123)  # the global RNG must not matter
            opt.step()
        return model, opt

    whole, _ = run(4)
    half, opt = run(2)
    resumed, _ = run(2, resume=(half.state_dict(), opt.state_dict()))
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [torch.int32, "float32", torch.complex64])
def test_bad_state_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="state_dtype must be None or a floating torch.dtype"):
        muonkit.Muon([torch.nn.Parameter(torch.randn(4, 4))], state_dtype=bad)


def test_by_default_16_bit_parameters_round_stochastically_and_wider_ones_are_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = muonkit.Muon(muonkit.param_groups(model))
    assert all(group["stochastic_rounding"] for group in opt.param_groups)
    on, _ = train(torch.float32, stochastic_rounding=True, steps=5)
    off, _ = train(torch.float32, stochastic_rounding=False, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_explain_says_how_16_bit_parameters_are_written():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    assert "stochastic rounding" not in muonkit.explain(model, file=None)
    text = muonkit.explain(model.bfloat16(), file=None)
    assert "6 trainable tensors are bfloat16" in text and "stochastic rounding" in text and "state_dtype" in text
