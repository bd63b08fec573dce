"""ntl.logit_transform (logit scale / soft-cap / temperature on digit logits) and
ntl.accumulation (window normalisation): hand values, finite differences, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntl.accumulation import accumulation_normalizer
from ntl.logit_transform import LogitTransform


def test_hand_values():
    z = torch.tensor([-3.0, 0.0, 0.5, 40.0])
    f = LogitTransform(scale=2.0, softcap=10.0, temperature=0.5)
    expected = [10 * math.tanh(2 * v / 10) / 0.5 for v in z.tolist()]
    torch.testing.assert_close(f(z), torch.tensor(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(LogitTransform(scale=0.25, temperature=2.0)(z), z * 0.125)
    assert LogitTransform().is_identity and not LogitTransform(temperature=0.7).is_identity
    torch.testing.assert_close(LogitTransform()(z), z)


def test_dtype_and_gradient_against_finite_differences():
    f = LogitTransform(scale=1.5, softcap=3.0, temperature=0.8)
    z = torch.linspace(-6, 6, 13, dtype=torch.float64)
    out = f(z.to(torch.bfloat16))
    assert out.dtype == torch.float32
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(zz.float()).sum(), zz)
    eps = 1e-4
    fd = torch.tensor([(3 * math.tanh(1.5 * (v + eps) / 3) - 3 * math.tanh(1.5 * (v - eps) / 3))
                       / 0.8 / (2 * eps) for v in z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(g.float(), fd.float(), rtol=1e-4, atol=1e-5)
    # closed form df/dz = s (1 - tanh^2(s z / c)) / T
    closed = 1.5 * (1 - torch.tanh(1.5 * z / 3) ** 2) / 0.8
    torch.testing.assert_close(g.float(), closed.float(), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.floats(-5, 5).filter(lambda s: abs(s) > 1e-3), st.floats(0.5, 50), st.floats(0.1, 4))
def test_capped_logits_stay_inside_the_cap_and_keep_order(scale, cap, t):
    f = LogitTransform(scale=scale, softcap=cap, temperature=t)
    z = torch.linspace(-100, 100, 41)
    out = f(z)
    assert bool((out.abs() <= cap / t + 1e-4).all())
    d = out.diff()
    assert bool((d >= -1e-6).all()) if scale > 0 else bool((d <= 1e-6).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"scale": float("nan")}, "scale"), ({"softcap": 0.0}, "softcap"), ({"softcap": -1.0}, "softcap"),
     ({"temperature": 0.0}, "temperature"), ({"temperature": True}, "temperature")],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitTransform(**kwargs)


def test_rejects_integer_logits():
    with pytest.raises(TypeError, match="float tensor"):
        LogitTransform()(torch.arange(3))


def test_normalizer_hand_values():
    assert float(accumulation_normalizer(12)) == 12.0
    assert float(accumulation_normalizer(torch.tensor(12.0), num_processes=2, accumulation_steps=4,
                                         steps_per_generation=4)) == 6.0
    assert float(accumulation_normalizer(12, num_processes=2, accumulation_steps=1,
                                         steps_per_generation=2)) == 3.0
    assert float(accumulation_normalizer(0, num_processes=4)) == 0.25  # max(N, 1): no 0/0
    for bad in ({"num_processes": 0}, {"accumulation_steps": 1.5}, {"steps_per_generation": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            accumulation_normalizer(3, **bad)
    with pytest.raises(ValueError, match="finite"):
        accumulation_normalizer(float("inf"))
    with pytest.raises(TypeError, match="total_targets"):
        accumulation_normalizer("3")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_window_sum_averaged_over_processes_is_the_window_mean(P, G, data):
    """The module's identity: with S = G, summing L_i / D over a process's G micro-batches and
    averaging over P processes gives the mean over all targets, for any split (empty
    micro-batches included)."""
    counts = data.draw(st.lists(st.integers(0, 5), min_size=P * G, max_size=P * G))
    losses = [torch.rand(c, dtype=torch.float64) for c in counts]
    N = sum(counts)
    D = accumulation_normalizer(N, num_processes=P, accumulation_steps=G, steps_per_generation=G)
    per_process = [sum(float(losses[p * G + g].sum()) / float(D) for g in range(G)) for p in range(P)]
    averaged = sum(per_process) / P
    expected = float(torch.cat(losses).mean()) if N else 0.0
    assert averaged == pytest.approx(expected, rel=1e-6, abs=1e-12)
