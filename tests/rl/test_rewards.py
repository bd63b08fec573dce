"""Rewards (ntl.rewards = ntl.rl.rewards): verl compute_score, NTL bonuses, batched bonus; the
moved framework signatures stay importable (their tests moved with them into the adapters)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import gsm8k_file

from ntl.metrics import digit_probs
from ntl.rewards import (
    compute_ntl_bonus_all,
    compute_ntl_bonus_final_answer,
    compute_score,
    compute_score_ntl_enhanced,
    ntl_bonus_from_digit_probs,
    proximity,
)

# Two final-answer digits: right (p .5, max .5) and wrong (p .2, max .7).
PROBS = {"target_prob": [0.5, 0.2], "max_prob": [0.5, 0.7], "pred_digit": [1, 7], "target_digit": [1, 8]}
# 0.4 * 1/2 + 0.3 * (.5 + .7)/2 + 0.3 * (.5 + .2)/2 = .2 + .18 + .105
PROBS_BONUS = 0.485


# --------------------------------------------------------------------------- GSM8K
def _gsm8k(split):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(gsm8k_file(split))
    return (
        list(df["data_source"]),
        [e["answer"] for e in df["extra_info"]],
        [r["ground_truth"] for r in df["reward_model"]],
    )


@pytest.mark.parametrize("split,n", [("train", 7473), ("test", 1319)])
def test_gsm8k_reference_scores(split, n):
    srcs, sols, gts = _gsm8k(split)
    assert len(sols) == n
    wrong_full, wrong_changed = [], []
    for i, (src, s, g) in enumerate(zip(srcs, sols, gts, strict=True)):
        r = compute_score(src, s, g)
        if not (r["score"] == 1.0 and r["acc"] is True and r["pred"] == g and r["ntl_bonus"] == 0.0):
            wrong_full.append(i)
        changed = s[: s.rfind("####")] + f"#### {int(g) + 1}"
        r = compute_score(src, changed, g)
        if not (r["score"] == 0.0 and r["acc"] is False and r["pred"] == str(int(g) + 1)):
            wrong_changed.append(i)
    assert not wrong_full and not wrong_changed, (wrong_full[:5], wrong_changed[:5])


# --------------------------------------------------------------------------- compute_score
def test_compute_score_basic_keys():
    r = compute_score("openai/gsm8k", "so #### 18", "18", {"index": 0})
    assert r == {"score": 1.0, "acc": True, "pred": "18", "ntl_bonus": 0.0}
    r = compute_score("openai/gsm8k", "no idea", "18")
    assert r == {"score": 0.0, "acc": False, "pred": "", "ntl_bonus": 0.0}
    assert compute_score("", "\\boxed{18.00}", "18")["score"] == 1.0
    assert compute_score("", "it is 18", "18")["score"] == 0.0
    assert compute_score("", "it is 18", "18", flexible=True)["score"] == 1.0
    # verl may pass extra options: ignored
    assert compute_score("", "#### 5", "5", some_verl_option=3)["score"] == 1.0


def test_compute_score_bonus_types():
    # final_answer with probabilities: 0 + 0.1 * 0.485
    r = compute_score("", "#### 17", "18", use_ntl_bonus=True, digit_probs=PROBS)
    assert r["ntl_bonus"] == pytest.approx(PROBS_BONUS) and r["score"] == pytest.approx(0.0485)
    # final_answer without probabilities: text digit agreement of 17 vs 18 = 1/2
    r = compute_score("", "#### 17", "18", use_ntl_bonus=True, ntl_bonus_weight=0.2)
    assert r["ntl_bonus"] == pytest.approx(0.5) and r["score"] == pytest.approx(0.1)
    # proximity: exp(-1/18)
    r = compute_score("", "#### 17", "18", use_ntl_bonus=True, ntl_bonus_type="proximity")
    assert r["ntl_bonus"] == pytest.approx(math.exp(-1 / 18))
    r = compute_score("", "#### 18", "18", use_ntl_bonus=True, ntl_bonus_type="proximity")
    assert r["score"] == pytest.approx(1.1)
    # all: correct answer -> gate 1; no probabilities -> c
    r = compute_score("", "#### 18", "18", use_ntl_bonus=True, ntl_bonus_type="all", digit_probs=PROBS)
    assert r["score"] == pytest.approx(1.0 + 0.1 * PROBS_BONUS)
    r = compute_score("", "#### 17", "18", use_ntl_bonus=True, ntl_bonus_type="all", digit_probs=PROBS)
    assert r["score"] == 0.0 and r["ntl_bonus"] == 0.0
    r = compute_score("", "#### 18", "18", use_ntl_bonus=True, ntl_bonus_type="all")
    assert r["ntl_bonus"] == 1.0
    # no answer: final_answer text fallback and proximity give 0
    for kind in ("final_answer", "proximity", "all"):
        assert compute_score("", "hmm", "18", use_ntl_bonus=True, ntl_bonus_type=kind)["score"] == 0.0


def test_compute_score_bad_options():
    with pytest.raises(ValueError, match="ntl_bonus_type"):
        compute_score("", "#### 1", "1", ntl_bonus_type="digits")
    with pytest.raises(ValueError, match="ntl_bonus_weight"):
        compute_score("", "#### 1", "1", ntl_bonus_weight=-1)
    with pytest.raises(ValueError, match="ground_truth"):
        compute_score("", "#### 1", "one")
    with pytest.raises(TypeError, match="solution_str"):
        compute_score("", None, "1")


# --------------------------------------------------------------------------- bonuses
def test_bonus_final_answer_formats():
    assert compute_ntl_bonus_final_answer(PROBS) == pytest.approx(PROBS_BONUS)
    alt = {"target_prob": [0.5, 0.2], "max_prob": [0.5, 0.7], "correct": [True, False]}
    assert compute_ntl_bonus_final_answer(alt) == pytest.approx(PROBS_BONUS)
    masked = {
        "target_prob": torch.tensor([0.5, 0.9, 0.2]), "max_prob": torch.tensor([0.5, 0.9, 0.7]),
        "correct": torch.tensor([True, True, False]), "mask": torch.tensor([True, False, True]),
    }
    assert compute_ntl_bonus_final_answer(masked) == pytest.approx(PROBS_BONUS)
    empty = {"target_prob": [], "max_prob": [], "correct": []}
    assert compute_ntl_bonus_final_answer(empty) == 0.0
    # text fallback
    assert compute_ntl_bonus_final_answer(pred="5", ground_truth="15") == pytest.approx(0.5)
    assert compute_ntl_bonus_final_answer(pred=None, ground_truth="15") == 0.0
    with pytest.raises(ValueError, match="ground_truth"):
        compute_ntl_bonus_final_answer()


def test_bonus_bad_digit_probs():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_ntl_bonus_final_answer({"target_prob": [1.5], "max_prob": [0.5], "correct": [1]})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_ntl_bonus_final_answer({"target_prob": [float("nan")], "max_prob": [0.5], "correct": [1]})
    with pytest.raises(ValueError, match="lacks"):
        compute_ntl_bonus_final_answer({"target_prob": [0.5]})
    with pytest.raises(ValueError, match="differ in length"):
        compute_ntl_bonus_final_answer({"target_prob": [0.5], "max_prob": [0.5, 0.1], "correct": [1]})
    with pytest.raises(ValueError, match="correct"):
        compute_ntl_bonus_final_answer({"target_prob": [0.5], "max_prob": [0.5]})
    with pytest.raises(TypeError, match="digit_probs"):
        compute_ntl_bonus_final_answer([0.5, 0.5])


def test_bonus_all():
    assert compute_ntl_bonus_all(PROBS, correct=True) == pytest.approx(PROBS_BONUS)
    assert compute_ntl_bonus_all(PROBS) == pytest.approx(PROBS_BONUS)
    assert compute_ntl_bonus_all(PROBS, correct=False) == 0.0
    assert compute_ntl_bonus_all(correct=True) == 1.0
    assert compute_ntl_bonus_all(correct=False) == 0.0
    with pytest.raises(ValueError):
        compute_ntl_bonus_all()


@pytest.mark.parametrize(
    "pred,truth,expected",
    [
        ("17", "18", math.exp(-1 / 18)),
        ("0", "0", 1.0),
        ("5", "0", math.exp(-5)),
        ("0.5", "0", math.exp(-0.5)),
        ("-10", "-20", math.exp(-0.5)),
        ("18.0", "18", 1.0),
        (None, "18", 0.0),
        ("", "18", 0.0),
    ],
)
def test_proximity(pred, truth, expected):
    assert proximity(pred, truth) == pytest.approx(expected)


def test_enhanced():
    r = compute_score_ntl_enhanced("", "#### 17", "18")  # a = p = 0.5
    assert r["score"] == pytest.approx(0.25 * 0.5 + 0.15 * 0.5)
    assert r["digit_agreement"] == 0.5 and r["prob_quality"] == 0.5 and r["acc"] is False
    assert compute_score_ntl_enhanced("", "#### 18", "18")["score"] == pytest.approx(1.0)
    probs = {"target_prob": [0.9, 0.3], "max_prob": [0.9, 0.6], "correct": [1, 0]}
    r = compute_score_ntl_enhanced("", "#### 17", "18", digit_probs=probs)  # p = 0.6
    assert r["score"] == pytest.approx(0.25 * 0.5 + 0.15 * 0.6)
    assert compute_score_ntl_enhanced("", "nothing", "18")["score"] == 0.0


# --------------------------------------------------------------------------- batched
def test_ntl_bonus_from_digit_probs_hand_values():
    tp = torch.tensor([[0.5, 0.9, 0.2, 0.0], [0.1, 0.1, 0.1, 0.1], [0.3, 0.0, 0.0, 0.0]])
    mp = torch.tensor([[0.5, 0.9, 0.7, 0.0], [0.9, 0.9, 0.9, 0.9], [0.6, 0.0, 0.0, 0.0]])
    cor = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    b = ntl_bonus_from_digit_probs(tp, mp, cor, mask)
    # row 0: PROBS; row 1: no digits -> 0; row 2: .3 * .6 + .3 * .3 = .27
    assert b.tolist() == pytest.approx([PROBS_BONUS, 0.0, 0.27])
    g = ntl_bonus_from_digit_probs(tp, mp, cor, mask, gate=torch.tensor([False, True, True]))
    assert g.tolist() == pytest.approx([0.0, 0.0, 0.27])
    # same as the per-sample function
    for i in range(3):
        one = {"target_prob": tp[i], "max_prob": mp[i], "correct": cor[i], "mask": mask[i]}
        assert compute_ntl_bonus_final_answer(one) == pytest.approx(b[i].item())


def test_bonus_from_metrics_digit_probs(qwen_tok):
    """metrics.digit_probs -> batched bonus and per-sample compute_score agree."""
    from ntl.targets import build_digit_targets

    texts, truths = ["#### 17", "#### 18", "no answer"], ["18", "18", "3"]
    rows = [qwen_tok.encode(t) for t in texts]
    T = max(map(len, rows))
    ids = torch.full((3, T), qwen_tok.pad_token_id)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    tg = build_digit_targets(ids, truths, qwen_tok, response_mask=mask)
    logits = torch.randn(3, T, 151936, generator=torch.Generator().manual_seed(0))
    dp = digit_probs(logits, tg, qwen_tok)
    batched = ntl_bonus_from_digit_probs(dp)
    for i in range(3):
        row = type(dp)(*(getattr(dp, f)[i] for f in dp.__dataclass_fields__))
        r = compute_score("", texts[i], truths[i], use_ntl_bonus=True, digit_probs=row)
        assert r["ntl_bonus"] == pytest.approx(batched[i].item(), abs=1e-6)
    assert batched[2].item() == 0.0 and batched[0].item() > 0.0


# --------------------------------------------------------------------------- moved names
MOVED = {"TRUTH_COLUMNS": "ntl_trl.rewards", "completion_text": "ntl_trl.rewards",
         "correctness_reward": "ntl_trl.rewards", "make_ntl_reward": "ntl_trl.rewards",
         "proximity_reward": "ntl_trl.rewards", "scatter_to_last_token": "ntl_verl.batch"}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_framework_signatures_moved_to_their_adapter_and_stay_importable(name):
    """TRL reward functions and verl's scatter live in their adapter (tested there:
    adapters/trl/tests/test_trl_rewards.py, adapters/verl/tests/test_batch_scatter.py);
    ntl.rewards (= ntl.rl.rewards) still hands out the same objects."""
    import importlib
    import sys

    import ntl.rewards
    import ntl.rl.rewards

    assert ntl.rewards is ntl.rl.rewards is sys.modules["ntl.rewards"]
    adapter = importlib.import_module(MOVED[name])
    assert getattr(ntl.rewards, name) is getattr(adapter, name)
    assert name not in vars(ntl.rl.rewards)  # defined once, in the adapter
    with pytest.raises(AttributeError, match="no attribute"):
        _ = ntl.rewards.no_such_reward  # pyright: ignore[reportAttributeAccessIssue]


def test_old_module_paths_are_the_moved_modules():
    """ntl.<old> is the ntl.rl module object itself, so monkeypatching either patches both."""
    import importlib

    pairs = {"answers": "answers", "targets": "targets", "metrics": "metrics", "rewards": "rewards",
             "logit_transform": "logit_transform", "aggregation": "normalization",
             "accumulation": "normalization"}
    for old, new in pairs.items():
        assert importlib.import_module(f"ntl.{old}") is importlib.import_module(f"ntl.rl.{new}"), old


def test_monkeypatching_the_old_path_reaches_the_new_one(monkeypatch):
    import ntl.answers
    import ntl.rl.answers

    monkeypatch.setattr(ntl.answers, "extract_answer", lambda *a, **k: None)
    assert ntl.rl.answers.extract_answer("#### 5") is None
    monkeypatch.undo()
    assert ntl.rl.answers.extract_answer("#### 5") is not None


# --------------------------------------------------------------------------- properties
probs_lists = st.integers(0, 6).flatmap(
    lambda n: st.fixed_dictionaries({
        "target_prob": st.lists(st.floats(0, 1), min_size=n, max_size=n),
        "max_prob": st.lists(st.floats(0, 1), min_size=n, max_size=n),
        "correct": st.lists(st.booleans(), min_size=n, max_size=n),
    })
)
numbers = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.decimals(-(10**6), 10**6, places=3, allow_nan=False, allow_infinity=False).map(str),
)


@settings(max_examples=150, deadline=None)
@given(
    pred=st.one_of(numbers, st.text(max_size=20)),
    truth=numbers,
    probs=st.one_of(st.none(), probs_lists),
    kind=st.sampled_from(["final_answer", "all", "proximity"]),
    use=st.booleans(),
    w=st.floats(0, 2),
)
def test_property_score_ranges(pred, truth, probs, kind, use, w):
    sol = f"work\n#### {pred}"
    r = compute_score("", sol, truth, use_ntl_bonus=use, ntl_bonus_type=kind,
                      ntl_bonus_weight=w, digit_probs=probs)
    assert isinstance(r["acc"], bool) and isinstance(r["pred"], str)
    assert 0.0 <= r["ntl_bonus"] <= 1.0 + 1e-12
    assert 0.0 <= r["score"] <= 1.0 + w + 1e-9
    assert r["score"] == pytest.approx(float(r["acc"]) + (w * r["ntl_bonus"] if use else 0.0))
    e = compute_score_ntl_enhanced("", sol, truth, digit_probs=probs)
    assert 0.0 <= e["score"] <= 1.0 + 1e-12
    assert 0.0 <= proximity(r["pred"] or None, truth) <= 1.0
    if r["acc"]:
        assert proximity(r["pred"], truth) == 1.0 and e["digit_agreement"] == 1.0


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_property_batched_bonus_range(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(B, T, generator=g), torch.rand(B, T, generator=g)
    tp, mp = torch.minimum(a, b), torch.maximum(a, b)
    cor = torch.rand(B, T, generator=g) < 0.5
    mask = torch.rand(B, T, generator=g) < 0.6
    out = ntl_bonus_from_digit_probs(tp, mp, cor, mask)
    assert out.shape == (B,) and out.dtype == torch.float32
    assert bool(((out >= 0) & (out <= 1 + 1e-6)).all())
    assert bool((out[mask.sum(-1) == 0] == 0).all())
