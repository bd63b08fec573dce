"""Digit metrics (ntl.metrics) against hand-computed probability tables."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ntl
from ntl.metrics import DigitProbs, digit_probs, digit_stats

IDS = list(range(3, 13))  # digit '0'..'9' = token ids 3..12 in a toy vocabulary of V = 20
V = 20
NEG = float("-inf")


def table():
    """Digit logits [4, 10] = log q, and targets (token ids).

    row 0: q = (.5, .25, .25, 0...), target digit 1 -> argmax 0 (wrong), conf .5, p .25,
           W1 = .5*1 + .25*1 = .75, MSE: yhat = .75, (.75 - 1)^2 = .0625
    row 1: q = (0..., .2 at 8, .8 at 9), target digit 9 -> right, conf .8, p .8,
           W1 = .2*1 = .2, MSE: yhat = 8.8, (8.8 - 9)^2 = .04
    row 2: ignore_index; row 3: target is a non-digit token (id 15): neither counts.
    """
    q = torch.zeros(4, 10)
    q[0, :3] = torch.tensor([0.5, 0.25, 0.25])
    q[1, 8:] = torch.tensor([0.2, 0.8])
    q[2] = 0.1
    q[3] = 0.1
    z = torch.where(q > 0, q.log(), torch.full_like(q, NEG))
    targets = torch.tensor([IDS[1], IDS[9], -100, 15])
    return z, targets


def full_logits(z):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(z.shape[0], V, generator=g) * 5  # non-digit columns must not matter
    full[:, IDS] = z
    return full


@pytest.mark.parametrize("kind", ["digit", "full"])
def test_stats_hand_table(kind):
    z, t = table()
    x = z if kind == "digit" else full_logits(z)
    s = digit_stats(x, t, IDS)
    assert s.loss.item() == pytest.approx((0.75 + 0.2) / 2)
    assert s.digit_accuracy.item() == pytest.approx(0.5)
    assert s.total_digits.item() == 2
    assert s.confidence.item() == pytest.approx((0.5 + 0.8) / 2)
    assert s.target_prob.item() == pytest.approx((0.25 + 0.8) / 2)
    for f in (s.loss, s.digit_accuracy, s.total_digits, s.confidence, s.target_prob):
        assert f.dim() == 0 and f.dtype == torch.float32
    mse = digit_stats(x, t, IDS, method="mse")
    assert mse.loss.item() == pytest.approx((0.0625 + 0.04) / 2)


def test_stats_batched_shape_and_to_dict():
    z, t = table()
    s = digit_stats(full_logits(z).view(2, 2, V), t.view(2, 2), IDS)
    d = s.to_dict()
    assert set(d) == {"ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence", "ntl/target_prob"}
    assert all(isinstance(v, float) for v in d.values())
    assert d["ntl/total_digits"] == 2.0
    assert d["ntl/confidence"] == pytest.approx(0.65)
    assert set(s.to_dict(prefix="val/")) == {k.replace("ntl/", "val/") for k in d}
    # a non-contiguous slice (as logits[:, :-1] would be) gives the same numbers
    x = full_logits(z).view(2, 2, V)
    wide = torch.cat([x, torch.zeros(2, 1, V)], dim=1)[:, :2]
    assert not wide.is_contiguous()
    assert digit_stats(wide, t.view(2, 2), IDS).to_dict() == pytest.approx(d)


def test_temperature():
    # T = 2: q' ∝ sqrt(q); row 0: sqrt(.5, .25, .25) = (.7071, .5, .5) / 1.7071
    z, t = table()
    s = digit_stats(z[:1], t[:1], IDS, temperature=2.0)
    norm = math.sqrt(0.5) + 1.0
    assert s.confidence.item() == pytest.approx(math.sqrt(0.5) / norm, rel=1e-5)
    assert s.target_prob.item() == pytest.approx(0.5 / norm, rel=1e-5)
    assert s.loss.item() == pytest.approx((math.sqrt(0.5) + 0.5) / norm, rel=1e-5)


def test_loss_matches_ntl_losses():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, V, generator=g)
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[0, :3] = -100
    for method in ("wasserstein", "mse"):
        ref = ntl.ntl_loss(logits, labels, IDS, method=method, backend="torch")
        assert digit_stats(logits, labels, IDS, method=method).loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_zero_digits_no_nan():
    z, _ = table()
    s = digit_stats(z, torch.full((4,), -100), IDS)
    assert s.to_dict() == {
        "ntl/loss": 0.0, "ntl/digit_accuracy": 0.0, "ntl/total_digits": 0.0,
        "ntl/confidence": 0.0, "ntl/target_prob": 0.0,
    }
    empty = digit_stats(torch.zeros(0, V), torch.zeros(0, dtype=torch.long), IDS)
    assert empty.total_digits.item() == 0 and empty.confidence.item() == 0.0


def test_bf16_logits_and_no_grad():
    z, t = table()
    x = full_logits(z).bfloat16().requires_grad_()
    s = digit_stats(x, t, IDS)
    assert s.loss.dtype == torch.float32 and not s.loss.requires_grad
    assert s.digit_accuracy.item() == pytest.approx(0.5)


def test_digit_probs_per_position():
    z, t = table()
    p = digit_probs(full_logits(z), t, IDS)
    assert isinstance(p, DigitProbs)
    assert p.mask.tolist() == [True, True, False, False]
    assert p.target_prob.tolist() == pytest.approx([0.25, 0.8, 0.0, 0.0])
    assert p.max_prob.tolist() == pytest.approx([0.5, 0.8, 0.0, 0.0])
    assert p.pred_digit.tolist() == [0, 9, -1, -1]
    assert p.target_digit.tolist() == [1, 9, -1, -1]
    assert p.correct.tolist() == [False, True, False, False]


def test_qwen_tokenizer_vocab(qwen_tok):
    vocab = ntl.DigitVocab.from_tokenizer(qwen_tok)
    z, _ = table()
    t = torch.tensor([16, 24, -100, 220])  # '1', '9', ignored, ' '
    s = digit_stats(z, t, vocab)  # digit logits [4, 10]
    assert s.total_digits.item() == 2 and s.digit_accuracy.item() == pytest.approx(0.5)


def test_bad_inputs():
    z, t = table()
    with pytest.raises(ValueError, match="targets shape"):
        digit_stats(z, t[:3], IDS)
    with pytest.raises(ValueError, match="too narrow"):
        digit_stats(torch.zeros(4, 11), t, IDS)
    with pytest.raises(ValueError, match="temperature"):
        digit_stats(z, t, IDS, temperature=0.0)
    with pytest.raises(ValueError, match="method"):
        digit_stats(z, t, IDS, method="l1")
    with pytest.raises(TypeError, match="floating-point"):
        digit_stats(z.long(), t, IDS)
    with pytest.raises(ValueError, match="ignore_index"):
        digit_stats(z, torch.tensor([3, -5, 4, 5]), IDS)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 30.0),
    frac_ignored=st.floats(0.0, 1.0),
)
def test_property_ranges(n, seed, scale, frac_ignored):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * scale
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < frac_ignored] = -100
    s = digit_stats(logits, labels, IDS)
    p = digit_probs(logits, labels, IDS)
    n_dig = int(((labels >= 3) & (labels <= 12)).sum())
    assert s.total_digits.item() == n_dig
    d = s.to_dict()
    assert all(math.isfinite(v) for v in d.values())
    assert 0.0 <= d["ntl/digit_accuracy"] <= 1.0
    assert 0.0 <= d["ntl/target_prob"] <= d["ntl/confidence"] + 1e-6 <= 1.0 + 1e-6
    assert 0.0 <= d["ntl/loss"] <= 9.0 + 1e-5
    if n_dig:
        assert d["ntl/confidence"] >= 0.1 - 1e-6  # max of a 10-way distribution
    assert bool((p.target_prob <= p.max_prob + 1e-6).all())
    assert bool((p.correct <= p.mask).all())
