"""Hypothesis properties of NTL-W1 and NTL-MSE.

* loss >= 0;
* W1 is zero iff the number distribution is a point mass on the target
  (quantitatively: W1 >= (1 - q_y) * min_gap), MSE is zero iff the expectation
  equals the target (and equals (E[v] - y)^2 computed in float64 with numpy);
* monotone in the distance between a peaked prediction and the target;
* invariant to adding a constant to all logits of a row (also with reweigh);
* W1 with a soft target equals the 1-D optimal-transport distance computed with the
  quantile formula  W1 = int_0^1 |F^-1(t) - G^-1(t)| dt  (numpy, float64);
* autograd gradient == central finite differences.

Finite differences: ntl upcasts to fp32 whatever the input dtype (float64 logits give
an fp32 loss, asserted below), so ``torch.autograd.gradcheck`` at float64 precision does
not apply. We use central differences of the fp32 loss with eps = 1e-2 and tolerance
``|g_fd - g| <= 5e-3 * (1 + max|g|)`` (fp32 rounding / eps plus the O(eps^2) term).
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ntl

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
V = 12  # ids 0..9 digits, 10 and 11 text
DIGITS = ntl.DigitVocab(list(range(10)), vocab_size=V)  # built once (a list is rebuilt per call)
NEG = -1e4

logit = st.floats(-8.0, 8.0, allow_nan=False, width=32)
digit_logits = st.lists(logit, min_size=10, max_size=10)
text_logits = st.lists(logit, min_size=2, max_size=2)
target = st.integers(0, 9)
methods = st.sampled_from(["wasserstein", "mse"])


def loss_of(method, x, labels, vocab=DIGITS, **kw):
    fn = ntl.ntl_wasserstein_loss if method == "wasserstein" else ntl.ntl_mse_loss
    return fn(x, labels, vocab, **kw)


@st.composite
def number_vocabs(draw):
    """A NumberVocab with 3..8 tokens at random ids of V=16 and distinct random values."""
    K = draw(st.integers(3, 8))
    ids = draw(st.lists(st.integers(0, 15), min_size=K, max_size=K, unique=True))
    vals = draw(st.lists(st.integers(-50, 50), min_size=K, max_size=K, unique=True))
    return ntl.NumberVocab(ids, [float(v) for v in vals], vocab_size=16)


# ------------------------------------------------------------------ non-negativity
@SETTINGS
@given(digit_logits, text_logits, target, methods, st.booleans())
def test_loss_non_negative(z, t, y, method, reweigh):
    x = torch.tensor([z + t])
    loss = loss_of(method, x, torch.tensor([y]), reweigh=reweigh)
    assert loss.item() >= 0.0
    assert math.isfinite(loss.item())


# ------------------------------------------------------------------ zero iff
@SETTINGS
@given(digit_logits, target)
def test_w1_zero_iff_point_mass(z, y):
    x = torch.tensor([[*z, 0.0, 0.0]])
    w1 = loss_of("wasserstein", x, torch.tensor([y])).item()
    q = np.exp(np.array(z, dtype=np.float64) - max(z))
    q /= q.sum()
    # W1 = sum_k q_k |k - y| >= (1 - q_y) * 1 (unit gaps): positive unless a point mass
    assert w1 >= (1.0 - q[y]) * (1 - 1e-4) - 1e-6
    assert w1 == pytest.approx(float(np.dot(q, np.abs(np.arange(10) - y))), rel=1e-4, abs=1e-5)
    point = [NEG] * 10 + [0.0, 0.0]
    point[y] = z[y]
    assert loss_of("wasserstein", torch.tensor([point]), torch.tensor([y])).item() == 0.0


@SETTINGS
@given(number_vocabs(), st.data())
def test_w1_zero_iff_point_mass_general_vocab(vocab, data):
    k = data.draw(st.integers(0, vocab.K - 1))
    z = data.draw(st.lists(logit, min_size=16, max_size=16))
    x = torch.tensor([z])
    label = torch.tensor([vocab.token_ids[k]])
    w1 = loss_of("wasserstein", x, label, vocab).item()
    zz = np.array([z[i] for i in vocab.token_ids], dtype=np.float64)
    q = np.exp(zz - zz.max())
    q /= q.sum()
    vals = np.array(vocab.values)
    min_gap = np.diff(vals).min()
    assert w1 >= (1.0 - q[k]) * min_gap * (1 - 1e-4) - 1e-5
    point = [NEG] * 16
    point[vocab.token_ids[k]] = 0.0
    assert loss_of("wasserstein", torch.tensor([point]), label, vocab).item() == 0.0


@SETTINGS
@given(digit_logits, target)
def test_mse_equals_squared_error_of_expectation(z, y):
    x = torch.tensor([[*z, 0.0, 0.0]])
    mse = loss_of("mse", x, torch.tensor([y])).item()
    q = np.exp(np.array(z, dtype=np.float64) - max(z))
    q /= q.sum()
    e = float(np.dot(q, np.arange(10)))
    assert mse == pytest.approx((e - y) ** 2, rel=1e-4, abs=1e-5)
    if abs(e - y) > 1e-2:
        assert mse > 0.0


@SETTINGS
@given(st.integers(0, 9), st.integers(0, 9), st.floats(0.05, 0.95), st.booleans())
def test_mse_zero_when_expectation_equals_target(a, b, frac, flip):
    assume(a != b)
    lo, hi = min(a, b), max(a, b)
    # two-point distribution on lo < hi with mean y = lo + frac*(hi - lo); target must be a digit,
    # so pick the digit y in (lo, hi] nearest that mean and solve for the weights exactly
    y = lo + max(1, round(frac * (hi - lo)))
    assume(lo < y < hi)
    p_hi = (y - lo) / (hi - lo)
    row = [NEG] * 10 + [NEG, NEG]
    row[lo], row[hi] = math.log(1 - p_hi), math.log(p_hi)
    mse = loss_of("mse", torch.tensor([row]), torch.tensor([y])).item()
    assert mse == pytest.approx(0.0, abs=1e-9)
    w1 = loss_of("wasserstein", torch.tensor([row]), torch.tensor([y])).item()
    assert w1 > 0.5  # not a point mass: W1 = (1-p)(y-lo) + p(hi-y) > 0


# ------------------------------------------------------------------ monotonicity
@SETTINGS
@given(target, st.floats(2.0, 20.0), methods)
def test_monotone_in_distance_of_peaked_prediction(y, strength, method):
    if method == "mse":
        strength = max(strength, 14.0)  # near point mass: E[v] ~ d, so MSE ~ (d - y)^2
    rows = []
    for d in range(10):
        r = [0.0] * 10 + [NEG, NEG]
        r[d] = strength
        rows.append(r)
    losses = loss_of(method, torch.tensor(rows), torch.full((10,), y), reduction="none").tolist()
    order = sorted(range(10), key=lambda d: abs(d - y))
    for d1, d2 in itertools.pairwise(order):
        if abs(d2 - y) > abs(d1 - y):
            assert losses[d2] > losses[d1]
        else:  # same distance on both sides of y
            if method == "wasserstein":
                assert losses[d2] == pytest.approx(losses[d1], abs=1e-4)


@SETTINGS
@given(number_vocabs(), st.data())
def test_monotone_in_distance_general_vocab(vocab, data):
    k = data.draw(st.integers(0, vocab.K - 1))
    method = data.draw(methods)
    y = vocab.values[k]
    rows = []
    for tid in vocab.token_ids:
        r = [NEG] * 16
        r[tid] = 0.0  # point mass on that number
        rows.append(r)
    labels = torch.full((vocab.K,), vocab.token_ids[k])
    losses = loss_of(method, torch.tensor(rows), labels, vocab, reduction="none").tolist()
    dist = [abs(v - y) for v in vocab.values]
    for i in range(vocab.K):
        want = dist[i] if method == "wasserstein" else dist[i] ** 2
        assert losses[i] == pytest.approx(want, rel=1e-5, abs=1e-5)
        for j in range(vocab.K):
            if dist[i] < dist[j]:
                assert losses[i] < losses[j]


# ------------------------------------------------------------------ shift invariance
@SETTINGS
@given(st.lists(st.tuples(digit_logits, text_logits), min_size=3, max_size=3),
       st.lists(st.floats(-100, 100, width=32), min_size=3, max_size=3),
       st.lists(target, min_size=3, max_size=3), methods, st.booleans())
def test_invariant_to_row_constant(rows, consts, ys, method, reweigh):
    x = torch.tensor([z + t for z, t in rows])
    c = torch.tensor(consts)[:, None]
    labels = torch.tensor(ys)
    a = loss_of(method, x, labels, reweigh=reweigh, reduction="none")
    b = loss_of(method, x + c, labels, reweigh=reweigh, reduction="none")
    # x + c rounds in fp32 (ulp(108) ~ 8e-6), so the probabilities move by ~1e-5
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ soft-target W1 vs OT
def w1_quantile(vals, p, t):
    """1-D W1 between distributions p and t on sorted support vals: int |F^-1 - G^-1| dt."""
    cp, ct = np.cumsum(p), np.cumsum(t)
    cuts = np.unique(np.clip(np.concatenate([[0.0], cp, ct, [1.0]]), 0.0, 1.0))
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        if hi <= lo:
            continue
        mid = 0.5 * (lo + hi)
        a = vals[min(np.searchsorted(cp, mid), len(vals) - 1)]
        b = vals[min(np.searchsorted(ct, mid), len(vals) - 1)]
        total += (hi - lo) * abs(a - b)
    return total


@SETTINGS
@given(number_vocabs(), st.data())
def test_soft_target_w1_equals_optimal_transport(vocab, data):
    K = vocab.K
    z = data.draw(st.lists(logit, min_size=16, max_size=16))
    t = np.array(data.draw(st.lists(st.floats(0.0, 1.0), min_size=K, max_size=K)))
    assume(t.sum() > 0.1)
    t = t / t.sum()
    x = torch.tensor([z])
    label = torch.tensor([vocab.token_ids[0]])  # any number label: it only switches the row on
    got = ntl.ntl_wasserstein_loss(x, label, vocab, target_dist=torch.tensor(t[None], dtype=torch.float32))
    zz = np.array([z[i] for i in vocab.token_ids], dtype=np.float64)
    q = np.exp(zz - zz.max())
    q /= q.sum()
    want = w1_quantile(np.array(vocab.values), q, t)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-4 * (1 + vocab.max_distance))
    # a one-hot target distribution equals the label form
    k = data.draw(st.integers(0, K - 1))
    onehot = torch.zeros(1, K)
    onehot[0, k] = 1.0
    lab_k = torch.tensor([vocab.token_ids[k]])
    a = ntl.ntl_wasserstein_loss(x, lab_k, vocab, target_dist=onehot)
    b = ntl.ntl_wasserstein_loss(x, lab_k, vocab)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-4)


# ------------------------------------------------------------------ finite differences
def test_float64_logits_give_fp32_loss():
    x = torch.randn(2, V, dtype=torch.float64, requires_grad=True)
    loss = ntl.ntl_mse_loss(x, torch.tensor([3, 4]), DIGITS)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float64


def central_differences(f, x, eps):
    g = torch.zeros_like(x)
    flat = x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = f(x).item()
        flat[i] = old - eps
        down = f(x).item()
        flat[i] = old
        g.view(-1)[i] = (up - down) / (2 * eps)
    return g


def check_fd(f, x, eps=1e-2, tol=5e-3):
    xg = x.clone().requires_grad_(True)
    f(xg).backward()
    fd = central_differences(f, x.clone(), eps)
    scale = 1.0 + xg.grad.abs().max().item()
    assert (fd - xg.grad).abs().max().item() <= tol * scale, (fd, xg.grad)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(digit_logits, text_logits), min_size=2, max_size=2),
       st.lists(st.sampled_from([0, 3, 9, 10, -100]), min_size=2, max_size=2),
       methods, st.booleans(), st.sampled_from(["mean", "sum"]))
def test_gradient_matches_finite_differences(rows, ys, method, reweigh, reduction):
    x = torch.tensor([z + t for z, t in rows])
    labels = torch.tensor(ys)
    w = torch.tensor([1.0, 2.5])

    def f(inp):
        return loss_of(method, inp, labels, reweigh=reweigh, reduction=reduction, weights=w)

    check_fd(f, x)


@settings(max_examples=25, deadline=None)
@given(number_vocabs(), st.data())
def test_gradient_matches_finite_differences_general_vocab(vocab, data):
    method = data.draw(methods)
    z = torch.tensor([data.draw(st.lists(st.floats(-3, 3, width=32), min_size=16, max_size=16))])
    labels = torch.tensor([vocab.token_ids[data.draw(st.integers(0, vocab.K - 1))]])
    scale = vocab.max_distance ** (2 if method == "mse" else 1)

    def f(inp):
        return loss_of(method, inp, labels, vocab) / scale  # normalise large value ranges

    check_fd(f, z, eps=1e-2, tol=1e-2)


@settings(max_examples=25, deadline=None)
@given(number_vocabs(), st.data())
def test_soft_target_gradient_matches_finite_differences(vocab, data):
    K = vocab.K
    z = torch.tensor([data.draw(st.lists(st.floats(-3, 3, width=32), min_size=16, max_size=16))])
    t = torch.tensor([data.draw(st.lists(st.floats(0.05, 1.0), min_size=K, max_size=K))])
    t = t / t.sum()
    zz = z[0, list(vocab.token_ids)]
    cdf_gap = (torch.softmax(zz.double(), 0).cumsum(0) - t[0].double().cumsum(0))[:-1]
    assume(cdf_gap.abs().min().item() > 0.02)  # stay away from the |.| kinks
    label = torch.tensor([vocab.token_ids[0]])

    def f(inp):
        return ntl.ntl_wasserstein_loss(inp, label, vocab, target_dist=t) / vocab.max_distance

    check_fd(f, z, eps=1e-3, tol=1e-2)
