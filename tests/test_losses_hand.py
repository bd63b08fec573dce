"""Hand-computed values of NTL-W1 and NTL-MSE on tiny cases (numbers worked out in comments).

``NEG`` is a logit so small that ``exp(NEG - 0)`` underflows to exactly 0 in fp32,
so the number-token distributions below are exact.
"""

import math

import pytest
import torch

import ntl

NEG = -1e4
DIGITS = list(range(10))  # digit '0'..'9' at ids 0..9; V = 12 (ids 10, 11 are text)
V = 12


def digit_row(probs: dict[int, float], text=(NEG, NEG)) -> list[float]:
    """Logits over V=12 whose digit softmax is ``probs`` ({digit: p}); text logits given."""
    row = [NEG] * 10 + list(text)
    for d, p in probs.items():
        row[d] = math.log(p)
    return row


def run(method, rows, labels, vocab=DIGITS, **kw):
    x = torch.tensor(rows, dtype=torch.float32, requires_grad=True)
    fn = ntl.ntl_wasserstein_loss if method == "w1" else ntl.ntl_mse_loss
    loss = fn(x, torch.tensor(labels), vocab, **kw)
    return x, loss


# ------------------------------------------------- q = [0.5, 0.5, 0, ...], target 3
def test_half_half_target3_w1_value_and_grad():
    # W1 = 0.5*|0-3| + 0.5*|1-3| = 2.5 ; dL/dz_j = q_j (|v_j - y| - L): +0.25, -0.25
    x, loss = run("w1", [digit_row({0: 0.5, 1: 0.5})], [3])
    assert loss.item() == pytest.approx(2.5, abs=1e-6)
    loss.backward()
    want = torch.zeros(1, V)
    want[0, 0], want[0, 1] = 0.25, -0.25
    torch.testing.assert_close(x.grad, want, atol=1e-6, rtol=0)


def test_half_half_target3_mse_value_and_grad():
    # yhat = 0.5 ; MSE = (0.5 - 3)^2 = 6.25 ; dL/dz_j = 2 (yhat - y) q_j (v_j - yhat):
    # j=0: 2*(-2.5)*0.5*(-0.5) = 1.25 ; j=1: 2*(-2.5)*0.5*(0.5) = -1.25
    x, loss = run("mse", [digit_row({0: 0.5, 1: 0.5})], [3])
    assert loss.item() == pytest.approx(6.25, abs=1e-6)
    loss.backward()
    want = torch.zeros(1, V)
    want[0, 0], want[0, 1] = 1.25, -1.25
    torch.testing.assert_close(x.grad, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("target", "w1", "mse"), [
    (0, 4.5, 20.25),  # mean(0..9) = 4.5 ; (4.5 - 0)^2
    (4, 2.5, 0.25),   # (4+3+2+1+0+1+2+3+4+5)/10 ; (4.5 - 4)^2
    (9, 4.5, 20.25),
])  # fmt: skip
def test_uniform_digits(target, w1, mse):
    row = [0.0] * 10 + [NEG, NEG]
    assert run("w1", [row], [target])[1].item() == pytest.approx(w1, abs=1e-5)
    assert run("mse", [row], [target])[1].item() == pytest.approx(mse, abs=1e-5)


def test_point_mass_on_target_is_zero_elsewhere_distance():
    # all mass on 7: W1 to target 2 is 5, MSE 25; on target: 0
    row = digit_row({7: 1.0})
    assert run("w1", [row], [2])[1].item() == pytest.approx(5.0, abs=1e-6)
    assert run("mse", [row], [2])[1].item() == pytest.approx(25.0, abs=1e-6)
    assert run("w1", [row], [7])[1].item() == 0.0
    assert run("mse", [row], [7])[1].item() == 0.0


# ------------------------------------------------- reductions and weights
def test_reductions_with_weights():
    rows = [digit_row({0: 0.5, 1: 0.5}), [0.0] * 10 + [NEG, NEG], digit_row({5: 1.0})]
    labels = [3, 0, 10]  # W1 per row: 2.5, 4.5, text (not taking part)
    w = torch.tensor([1.0, 3.0, 100.0])
    # mean = (1*2.5 + 3*4.5) / (1 + 3) = 4.0 ; sum = 16.0 ; none = [2.5, 13.5, 0]
    assert run("w1", rows, labels, weights=w)[1].item() == pytest.approx(4.0, abs=1e-5)
    assert run("w1", rows, labels, weights=w, reduction="sum")[1].item() == pytest.approx(16.0, abs=1e-5)
    none = run("w1", rows, labels, weights=w, reduction="none")[1]
    torch.testing.assert_close(none, torch.tensor([2.5, 13.5, 0.0]), atol=1e-5, rtol=0)
    # unweighted mean = (2.5 + 4.5) / 2
    assert run("w1", rows, labels)[1].item() == pytest.approx(3.5, abs=1e-5)
    # MSE: 6.25 and 20.25
    assert run("mse", rows, labels, weights=w)[1].item() == pytest.approx((6.25 + 3 * 20.25) / 4, abs=1e-4)
    # -100 and text labels do not count in the mean
    _, loss = run("w1", rows, [3, -100, 11])
    assert loss.item() == pytest.approx(2.5, abs=1e-6)


def test_batched_shape_and_none_reduction():
    rows = torch.tensor([digit_row({0: 0.5, 1: 0.5}), digit_row({9: 1.0})] * 3).view(2, 3, V)
    labels = torch.tensor([[3, 9, -100], [10, 0, 3]])
    # rows alternate a = (q .5/.5 on 0, 1), b = (all on 9):
    # (0,0) a tgt 3 -> 2.5 ; (0,1) b tgt 9 -> 0 ; (0,2) ignored
    # (1,0) text ; (1,1) a tgt 0 -> 0.5 ; (1,2) b tgt 3 -> 6
    out = ntl.ntl_wasserstein_loss(rows, labels, DIGITS, reduction="none")
    torch.testing.assert_close(out, torch.tensor([[2.5, 0.0, 0.0], [0.0, 0.5, 6.0]]), atol=1e-5, rtol=0)
    assert ntl.ntl_wasserstein_loss(rows, labels, DIGITS).item() == pytest.approx(9.0 / 4, abs=1e-5)


# ------------------------------------------------- non-unit gaps
def gap_vocab():
    # ids 2, 5, 7 with values 0, 1, 10 (gaps 1 and 9); V = 8
    return ntl.NumberVocab([7, 2, 5], [10.0, 0.0, 1.0], vocab_size=8)


def gap_row():
    # q over values (0, 1, 10) = (0.25, 0.25, 0.5)
    row = [NEG] * 8
    row[2], row[5], row[7] = 0.0, 0.0, math.log(2.0)
    return row


@pytest.mark.parametrize(("label", "w1", "mse"), [
    (5, 0.25 * 1 + 0.25 * 0 + 0.5 * 9, (5.25 - 1) ** 2),    # target value 1; yhat = 0.25 + 5
    (7, 0.25 * 10 + 0.25 * 9 + 0.0, (5.25 - 10) ** 2),      # target value 10
    (2, 0.0 + 0.25 * 1 + 0.5 * 10, 5.25**2),                # target value 0
])  # fmt: skip
def test_non_unit_gaps(label, w1, mse):
    v = gap_vocab()
    assert run("w1", [gap_row()], [label], vocab=v)[1].item() == pytest.approx(w1, abs=1e-5)
    assert run("mse", [gap_row()], [label], vocab=v)[1].item() == pytest.approx(mse, abs=1e-4)


def test_non_unit_gaps_dict_form_and_grad():
    # {id: value} dict is the same vocab; W1 grad q_j (|v_j - y| - L) with y = 1, L = 4.75:
    # id 2: 0.25*(1 - 4.75) = -0.9375 ; id 5: 0.25*(0 - 4.75) = -1.1875 ; id 7: 0.5*(9 - 4.75) = 2.125
    x, loss = run("w1", [gap_row()], [5], vocab={7: 10.0, 2: 0.0, 5: 1.0})
    assert loss.item() == pytest.approx(4.75, abs=1e-5)
    loss.backward()
    want = torch.zeros(1, 8)
    want[0, 2], want[0, 5], want[0, 7] = -0.9375, -1.1875, 2.125
    torch.testing.assert_close(x.grad, want, atol=1e-5, rtol=0)


def test_soft_target_w1_cdf_form():
    # q = (0.25, 0.25, 0.5), T = (0.5, 0.5, 0): CDFs Q = (0.25, 0.5), C = (0.5, 1.0), gaps (1, 9)
    # W1 = |0.25 - 0.5| * 1 + |0.5 - 1.0| * 9 = 4.75
    x = torch.tensor([gap_row()])
    T = torch.tensor([[0.5, 0.5, 0.0]])
    loss = ntl.ntl_wasserstein_loss(x, torch.tensor([5]), gap_vocab(), target_dist=T)
    assert loss.item() == pytest.approx(4.75, abs=1e-5)
    # T = (0, 0, 1): Q - C = (0.25, 0.5) -> 0.25 + 4.5 ; equals one-hot target 10 (4.75 too)
    T2 = torch.tensor([[0.0, 0.0, 1.0]])
    assert ntl.ntl_wasserstein_loss(x, torch.tensor([5]), gap_vocab(), target_dist=T2).item() == (
        pytest.approx(4.75, abs=1e-5))
    # T = q: distance 0
    T3 = torch.tensor([[0.25, 0.25, 0.5]])
    assert ntl.ntl_wasserstein_loss(x, torch.tensor([5]), gap_vocab(), target_dist=T3).item() == (
        pytest.approx(0.0, abs=1e-6))


# ------------------------------------------------- reweigh (ntloss's full-softmax mass)
def test_reweigh_hand_values():
    # exp(logits): digits 0, 1 -> 0.5 each, two text tokens 0.5 each -> full-softmax mass m = 1/2.
    # L' = m L + 1.01 D (1 - m): W1: 0.5*2.5 + 1.01*9*0.5 = 5.795 ; MSE: 0.5*6.25 + 1.01*81*0.5 = 44.03
    row = digit_row({0: 0.5, 1: 0.5}, text=(math.log(0.5), math.log(0.5)))
    assert run("w1", [row], [3], reweigh=True)[1].item() == pytest.approx(5.795, abs=1e-4)
    assert run("mse", [row], [3], reweigh=True)[1].item() == pytest.approx(44.03, abs=1e-3)
    # all mass on digits: reweigh changes nothing
    row2 = digit_row({0: 0.5, 1: 0.5})
    assert run("w1", [row2], [3], reweigh=True)[1].item() == pytest.approx(2.5, abs=1e-5)


# ------------------------------------------------- Llama-3 multi-digit tokens
def test_llama3_multi_digit_hand_values(llama3_tok):
    vocab = ntl.NumberVocab.from_tokenizer(llama3_tok)
    gv = llama3_tok.get_vocab()
    Vl = len(llama3_tok)
    x = torch.full((4, Vl), -1e4)
    x[0, gv["100"]] = x[0, gv["150"]] = 0.0  # 50/50 on 100 and 150
    x[1, gv["7"]] = 0.0                      # all on "7"
    x[2, gv["0"]] = x[2, gv["999"]] = 0.0    # 50/50 on 0 and 999
    x[3, gv["the"]] = 0.0                    # text row
    labels = torch.tensor([gv["123"], gv["007"], gv["500"], gv["the"]])
    x.requires_grad_(True)
    w1 = ntl.ntl_wasserstein_loss(x, labels, vocab, reduction="none")
    mse = ntl.ntl_mse_loss(x, labels, vocab, reduction="none")
    # W1: 0.5*23 + 0.5*27 = 25 ; "007" has value 7 -> 0 ; 0.5*500 + 0.5*499 = 499.5
    torch.testing.assert_close(w1.detach(), torch.tensor([25.0, 0.0, 499.5, 0.0]), atol=1e-3, rtol=0)
    # MSE: (125 - 123)^2 = 4 ; 0 ; (499.5 - 500)^2 = 0.25
    torch.testing.assert_close(mse.detach(), torch.tensor([4.0, 0.0, 0.25, 0.0]), atol=2e-3, rtol=0)
    # gradient of row 0 (W1): q_j (|v_j - 123| - 25) -> "100": 0.5*(23-25) = -1, "150": +1
    w1.sum().backward()
    assert x.grad[0, gv["100"]].item() == pytest.approx(-1.0, abs=1e-4)
    assert x.grad[0, gv["150"]].item() == pytest.approx(1.0, abs=1e-4)
    assert x.grad[3].abs().max().item() == 0.0
    # the tokenizer itself resolves to its DigitVocab: multi-digit labels do not take part
    assert ntl.ntl_wasserstein_loss(x.detach()[:1], labels[:1], llama3_tok).item() == 0.0


# ------------------------------------------------- module == functional == hand value
@pytest.mark.parametrize(("method", "want"), [("wasserstein", 2.5), ("mse", 6.25), ("w1", 2.5)])
def test_module_matches_hand_value_and_functional(method, want):
    rows = torch.tensor([digit_row({0: 0.5, 1: 0.5}), digit_row({4: 1.0})])
    labels = torch.tensor([3, -100])
    crit = ntl.NumberTokenLoss(DIGITS, method=method, vocab_size=V)
    assert crit(rows, labels).item() == pytest.approx(want, abs=1e-5)
    fn = ntl.ntl_mse_loss if method == "mse" else ntl.ntl_wasserstein_loss
    assert crit(rows, labels).item() == fn(rows, labels, DIGITS).item()
    crit_none = ntl.NumberTokenLoss(DIGITS, method=method, reduction="none", reweigh=True)
    torch.testing.assert_close(crit_none(rows, labels),
                               fn(rows, labels, DIGITS, reduction="none", reweigh=True))
    w = torch.tensor([2.0, 1.0])
    assert crit(rows, labels, weights=w).item() == fn(rows, labels, DIGITS, weights=w).item()
    assert "K=10" in repr(crit)


def test_shift_labels_scores_the_same_pairs_as_slicing():
    ids = torch.tensor([[5, 1, 2, 7], [3, 9, -100, 4]])
    assert ntl.shift_labels(ids).tolist() == [[1, 2, 7, -100], [9, -100, 4, -100]]
    logits = torch.randn(2, 4, 12)
    vocab = list(range(10))
    sliced = ntl.ntl_wasserstein_loss(logits[:, :-1], ids[:, 1:], vocab)
    shifted = ntl.ntl_wasserstein_loss(logits, ntl.shift_labels(ids), vocab)
    torch.testing.assert_close(shifted, sliced)


# ------------------------------------------------- ntl_dot_loss (MAE, Huber) and squash_factor
def test_mae_and_huber_hand_values():
    # q = [0.5, 0.5] on digits 0, 1 -> yhat = 0.5; target 3 -> r = -2.5
    # MAE = 2.5, dL/dz_j = sign(r) q_j (v_j - yhat) = -1 * 0.5 * (-0.5, +0.5) = (+0.25, -0.25)
    # Huber(delta=1): 1 * (2.5 - 0.5) = 2.0, e'(r) = -1 -> the same gradient
    # Huber(delta=4): 0.5 * 2.5^2 = 3.125,   e'(r) = r = -2.5 -> (+0.625, -0.625)
    for error, delta, value, g0 in (("mae", 1.0, 2.5, 0.25), ("huber", 1.0, 2.0, 0.25),
                                    ("huber", 4.0, 3.125, 0.625)):
        x = torch.tensor([digit_row({0: 0.5, 1: 0.5})], requires_grad=True)
        loss = ntl.ntl_dot_loss(x, torch.tensor([3]), DIGITS, error=error, huber_delta=delta)
        assert loss.item() == pytest.approx(value, abs=1e-6)
        loss.backward()
        want = torch.zeros(1, V)
        want[0, 0], want[0, 1] = g0, -g0
        torch.testing.assert_close(x.grad, want, atol=1e-6, rtol=0)


def test_squash_factor_hand_values():
    # digits: d_min = 1, d_max = 9; squash_factor 5 -> d' = 1 + (d - 1) * 4 / 8 = 0.5 + 0.5 d (d > 0)
    # q = [0.5, 0.5] on 0, 1, target 3: 0.5 * (0.5 + 1.5) + 0.5 * (0.5 + 1.0) = 1.75
    # dL/dz_j = q_j (d'_j - L) = 0.5 * (2.0 - 1.75), 0.5 * (1.5 - 1.75) = +0.125, -0.125
    x = torch.tensor([digit_row({0: 0.5, 1: 0.5})], requires_grad=True)
    loss = ntl.ntl_wasserstein_loss(x, torch.tensor([3]), DIGITS, squash_factor=5.0)
    assert loss.item() == pytest.approx(1.75, abs=1e-6)
    loss.backward()
    want = torch.zeros(1, V)
    want[0, 0], want[0, 1] = 0.125, -0.125
    torch.testing.assert_close(x.grad, want, atol=1e-6, rtol=0)
    # the point mass on the target costs 0 (not the squashed "1 + ..." of a distance 0)
    exact = ntl.ntl_wasserstein_loss(torch.tensor([digit_row({3: 1.0})]), torch.tensor([3]), DIGITS,
                                     squash_factor=5.0)
    assert exact.item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("error", ["mae", "huber"])
def test_dot_loss_equals_autograd_on_plain_formula(error, backend):
    """ntl_dot_loss (its analytic gradient) == autograd through the plain formula written here:
    q = softmax(logits[:, ids]), yhat = q @ v, F.l1_loss / F.huber_loss, weighted mean."""
    g = torch.Generator().manual_seed(0)
    ids = [7, 2, 11, 0, 5, 9, 1, 3, 8, 6]  # '0'..'9' at scattered ids, V = 14
    vocab = ntl.DigitVocab(ids, 14)
    x = torch.randn(40, 14, generator=g) * 2
    y = torch.tensor(ids)[torch.randint(0, 10, (40,), generator=g)]
    y[::4] = 4  # text
    y[1::9] = -100
    w = torch.rand(40, generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = ntl.ntl_dot_loss(xa, y, vocab, error=error, huber_delta=1.3, weights=w, backend=backend)
    got.backward()
    take = torch.tensor([int(t) in ids for t in y])
    q = torch.softmax(xb[take][:, ids], -1)
    yhat = q @ torch.arange(10.0)
    target = torch.tensor([ids.index(int(t)) for t in y[take]], dtype=torch.float32)
    f = torch.nn.functional
    e = f.l1_loss(yhat, target, reduction="none") if error == "mae" else \
        f.huber_loss(yhat, target, reduction="none", delta=1.3)
    ref = (e * w[take]).sum() / w[take].sum()
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
