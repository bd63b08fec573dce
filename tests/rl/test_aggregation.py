"""ntl.aggregation: verl's loss_agg_modes on a masked per-token loss (hand-computed references)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ntl.aggregation import LOSS_AGG_MODES, aggregate_loss, aggregation_weights, mask_counts

# 3 sequences x 4 tokens; sequence 2 has no participating token
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                     [5.0, 6.0, 7.0, 8.0],
                     [9.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 0, 1],
                     [0, 1, 0, 0],
                     [0, 0, 0, 0]], dtype=torch.bool)
# per sequence: sums 7 and 6, counts 3 and 1; N = 4, S = 2, T = 4
HAND = {
    "token-mean": (7 + 6) / 4,
    "token-sum": 13.0,
    "seq-mean-token-sum": (7 + 6) / 2,
    "seq-mean-token-mean": (7 / 3 + 6 / 1) / 2,
    "seq-mean-token-sum-norm": (7 + 6) / 2 / 4,
}


def loop_reference(loss, mask, mode, N, S, H):
    """The module docstring's formulas, written as plain loops over sequences and tokens."""
    total = 0.0
    for b in range(loss.shape[0]):
        toks = [float(loss[b, t]) for t in range(loss.shape[1]) if mask[b, t]]
        if not toks:
            continue
        if mode == "token-mean":
            total += sum(toks) / max(N, 1)
        elif mode == "token-sum":
            total += sum(toks)
        elif mode == "seq-mean-token-sum":
            total += sum(toks) / max(S, 1)
        elif mode == "seq-mean-token-mean":
            total += sum(toks) / len(toks) / max(S, 1)
        else:
            total += sum(toks) / max(S, 1) / H
    return total


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_hand_computed(mode):
    assert float(aggregate_loss(LOSS, MASK, mode)) == pytest.approx(HAND[mode], rel=1e-6)


def test_counts():
    assert mask_counts(MASK).tolist() == [4.0, 2.0]


def test_masked_entries_are_ignored_even_nan():
    bad = LOSS.clone()
    bad[~MASK] = float("nan")
    for mode in LOSS_AGG_MODES:
        assert float(aggregate_loss(bad, MASK, mode)) == pytest.approx(HAND[mode], rel=1e-6)


def test_horizon_only_changes_the_norm_mode():
    for mode in LOSS_AGG_MODES:
        a = float(aggregate_loss(LOSS, MASK, mode, horizon=10))
        want = HAND[mode] * 4 / 10 if mode == "seq-mean-token-sum-norm" else HAND[mode]
        assert a == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_nothing_participates_is_zero_and_connected(mode):
    x = LOSS.clone().requires_grad_(True)
    out = aggregate_loss(x, torch.zeros_like(MASK), mode)
    assert float(out) == 0.0 and torch.isfinite(out)
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradient_is_the_weights():
    for mode in LOSS_AGG_MODES:
        x = LOSS.clone().requires_grad_(True)
        aggregate_loss(x, MASK, mode).backward()
        torch.testing.assert_close(x.grad, aggregation_weights(MASK, mode))
        assert torch.equal(x.grad[~MASK], torch.zeros(int((~MASK).sum())))


@given(
    st.integers(1, 7), st.integers(1, 6), st.integers(0, 2**31 - 1),
    st.sampled_from(LOSS_AGG_MODES), st.integers(1, 4),
)
def test_chunks_with_global_counts_sum_to_the_whole(B, T, seed, mode, n_chunks):
    """Any split of the sequences into chunks (micro-batches, DP ranks), each aggregated with the
    whole batch's counts, sums to the whole batch's aggregate; and both equal the loop formula."""
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(B, T, generator=g) * 5
    mask = torch.rand(B, T, generator=g) < 0.5
    N, S = mask_counts(mask).tolist()
    whole = float(aggregate_loss(loss, mask, mode))
    assert whole == pytest.approx(loop_reference(loss, mask, mode, N, S, T), rel=1e-5, abs=1e-6)
    cuts = sorted(torch.randint(0, B + 1, (n_chunks - 1,), generator=g).tolist())
    edges = [0, *cuts, B]
    parts = sum(
        float(aggregate_loss(loss[a:b], mask[a:b], mode, num_tokens=N, num_sequences=S, horizon=T))
        for a, b in itertools.pairwise(edges) if b > a
    )
    assert parts == pytest.approx(whole, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mode": "sample-mean"}, ValueError, "mode must be one of"),
        ({"loss": LOSS[:, :3]}, ValueError, "same shape"),
        ({"loss": LOSS.long()}, TypeError, "loss must be a float tensor"),
        ({"mask": MASK[0]}, ValueError, r"mask must be \[B, T\]"),
        ({"num_tokens": "4"}, TypeError, "num_tokens"),
        ({"mode": "seq-mean-token-sum-norm", "horizon": 0}, ValueError, "horizon must be > 0"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"loss": LOSS, "mask": MASK, "mode": "token-mean", **kwargs}
    with pytest.raises(exc, match=match):
        aggregate_loss(args.pop("loss"), args.pop("mask"), args.pop("mode"), **args)
