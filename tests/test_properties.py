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


# ------------------------------------------------------------------ ntl_dot_loss: MAE, Huber
def expectation(z, vals=None):
    zz = np.array(z, dtype=np.float64)
    q = np.exp(zz - zz.max())
    q /= q.sum()
    return float(np.dot(q, np.arange(10) if vals is None else np.array(vals)))


def huber64(r, delta):
    return 0.5 * r * r if abs(r) < delta else delta * (abs(r) - 0.5 * delta)


@SETTINGS
@given(digit_logits, target, st.floats(0.1, 12.0), st.booleans())
def test_dot_errors_equal_float64_formulas(z, y, delta, reweigh):
    """MAE = |E[v] - y|, Huber = its Huber with delta (numpy float64); >= 0; huber <= both of
    r^2 / 2 and delta |r|; MSE = ntl_mse_loss; with reweigh the same formula scaled by m."""
    x = torch.tensor([[*z, 0.0, 0.0]])
    lab = torch.tensor([y])
    r = expectation(z) - y
    mae = ntl.ntl_dot_loss(x, lab, DIGITS, error="mae").item()
    hub = ntl.ntl_dot_loss(x, lab, DIGITS, error="huber", huber_delta=delta).item()
    mse = ntl.ntl_dot_loss(x, lab, DIGITS, error="mse").item()
    assert mae == pytest.approx(abs(r), rel=1e-4, abs=1e-5)
    assert hub == pytest.approx(huber64(r, delta), rel=1e-4, abs=1e-5)
    assert mse == pytest.approx(ntl.ntl_mse_loss(x, lab, DIGITS).item(), rel=1e-6, abs=1e-7)
    assert min(mae, hub, mse) >= 0.0
    assert hub <= min(0.5 * r * r, delta * abs(r)) + 1e-5
    if reweigh:
        zz = np.array([*z, 0.0, 0.0], dtype=np.float64)
        p = np.exp(zz - zz.max())
        m = p[:10].sum() / p.sum()
        got = ntl.ntl_dot_loss(x, lab, DIGITS, error="huber", huber_delta=delta, reweigh=True).item()
        D = 1.01 * huber64(9.0, delta)
        assert got == pytest.approx(m * huber64(r, delta) + D * (1 - m), rel=1e-4, abs=1e-5)


@SETTINGS
@given(st.integers(0, 9), st.integers(0, 9), st.floats(0.05, 0.95))
def test_dot_errors_zero_when_expectation_equals_target(a, b, frac):
    assume(a != b)
    lo, hi = min(a, b), max(a, b)
    y = lo + max(1, round(frac * (hi - lo)))
    assume(lo < y < hi)
    p_hi = (y - lo) / (hi - lo)
    row = [NEG] * 12
    row[lo], row[hi] = math.log(1 - p_hi), math.log(p_hi)
    for error in ("mae", "huber"):
        assert ntl.ntl_dot_loss(torch.tensor([row]), torch.tensor([y]), DIGITS, error=error).item() == \
            pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------ squash_factor
def squashed_table64(vals, sf):
    vals = np.array(vals, dtype=np.float64)
    d = np.abs(vals[:, None] - vals[None, :])
    nz = d[d > 0]
    scale = (sf - 1) / (d.max() - nz.min())
    return np.where(d > 0, 1 + (d - nz.min()) * scale, 0.0)


@st.composite
def squashable_vocabs(draw):
    """A NumberVocab with >= 3 distinct values (two different nonzero distances)."""
    v = draw(number_vocabs())
    gaps = np.diff(np.array(v.values, dtype=np.float64))
    assume(v.max_distance > gaps[gaps > 0].min())
    return v


@SETTINGS
@given(squashable_vocabs(), st.floats(1.01, 50.0), st.data())
def test_squash_equals_table_formula_and_bounds(vocab, sf, data):
    """W1 with squash_factor = sum_k q_k T[k, y] for the float64 table (ntloss's definition);
    0 <= loss <= squash_factor; zero for a point mass on the target; the closest distinct value
    costs 1 and the farthest squash_factor."""
    k = data.draw(st.integers(0, vocab.K - 1))
    z = data.draw(st.lists(logit, min_size=16, max_size=16))
    label = torch.tensor([vocab.token_ids[k]])
    got = ntl.ntl_wasserstein_loss(torch.tensor([z]), label, vocab, squash_factor=sf).item()
    zz = np.array([z[i] for i in vocab.token_ids], dtype=np.float64)
    q = np.exp(zz - zz.max())
    q /= q.sum()
    table = squashed_table64(vocab.values, sf)
    assert got == pytest.approx(float(q @ table[:, k]), rel=1e-4, abs=1e-5)
    assert -1e-6 <= got <= sf * (1 + 1e-5)
    point = [NEG] * 16
    point[vocab.token_ids[k]] = 0.0
    assert ntl.ntl_wasserstein_loss(torch.tensor([point]), label, vocab, squash_factor=sf).item() == 0.0
    # point masses on every value j for every target i: the loss is the table T[j, i]; its
    # smallest nonzero entry is 1 and its largest squash_factor
    K = vocab.K
    rows = torch.full((K * K, 16), NEG)
    ids = torch.tensor(vocab.token_ids)
    rows[torch.arange(K * K), ids.repeat(K)] = 0.0
    costs = ntl.ntl_wasserstein_loss(rows, ids.repeat_interleave(K), vocab, squash_factor=sf,
                                     reduction="none").view(K, K).numpy()
    np.testing.assert_allclose(costs, table.T, rtol=1e-5, atol=1e-5)
    assert costs[costs > 0].min() == pytest.approx(1.0, rel=1e-5)
    assert costs.max() == pytest.approx(sf, rel=1e-5)


@SETTINGS
@given(digit_logits, target, st.booleans())
def test_squash_nine_on_digits_is_plain_w1(z, y, reweigh):
    """For the digits (distances 1..9) squash_factor = 9 is the identity table."""
    x = torch.tensor([[*z, 0.0, 0.0]])
    lab = torch.tensor([y])
    a = ntl.ntl_wasserstein_loss(x, lab, DIGITS, squash_factor=9, reweigh=reweigh).item()
    b = ntl.ntl_wasserstein_loss(x, lab, DIGITS, reweigh=reweigh).item()
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


@SETTINGS
@given(target, st.floats(1.5, 30.0))
def test_squash_monotone_in_distance(y, sf):
    rows = []
    for d in range(10):
        r = [0.0] * 10 + [NEG, NEG]
        r[d] = 12.0
        rows.append(r)
    losses = ntl.ntl_wasserstein_loss(torch.tensor(rows), torch.full((10,), y), DIGITS,
                                      squash_factor=sf, reduction="none").tolist()
    for d1 in range(10):
        for d2 in range(10):
            if abs(d1 - y) < abs(d2 - y):
                assert losses[d1] < losses[d2]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(digit_logits, text_logits), min_size=2, max_size=2),
       st.lists(st.sampled_from([0, 3, 9, 10, -100]), min_size=2, max_size=2),
       st.sampled_from(["mae", "huber", "squash"]), st.booleans())
def test_new_losses_gradient_matches_finite_differences(rows, ys, kind, reweigh):
    x = torch.tensor([z + t for z, t in rows])
    labels = torch.tensor(ys)
    w = torch.tensor([1.0, 2.5])
    if kind in ("mae", "huber"):  # stay off the kinks of |r| (and of Huber's switch at delta)
        for (z, _), y in zip(rows, ys, strict=True):
            if 0 <= y <= 9:
                r = abs(expectation(z) - y)
                assume(r > 0.05 and abs(r - 1.5) > 0.05)

    def f(inp):
        if kind == "squash":
            return ntl.ntl_wasserstein_loss(inp, labels, DIGITS, squash_factor=4.0, weights=w,
                                            reweigh=reweigh)
        return ntl.ntl_dot_loss(inp, labels, DIGITS, error=kind, huber_delta=1.5, weights=w,
                                reweigh=reweigh)

    check_fd(f, x)


@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=6, max_size=6), st.sampled_from(["mean", "sum", "none"]))
def test_integer_weights_equal_their_float_values(wts, reduction):
    """An int64 weight (e.g. an attention mask) is its float value."""
    g = torch.Generator().manual_seed(sum(wts))
    x = torch.randn(6, V, generator=g)
    labels = torch.tensor([0, 3, 9, 10, -100, 5])
    wi = torch.tensor(wts)
    for fn in (ntl.ntl_wasserstein_loss, ntl.ntl_mse_loss):
        a = fn(x, labels, DIGITS, weights=wi, reduction=reduction)
        b = fn(x, labels, DIGITS, weights=wi.float(), reduction=reduction)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
