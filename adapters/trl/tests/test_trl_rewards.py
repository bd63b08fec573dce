"""TRL reward functions (ntl_trl.rewards; moved from ntl.rewards with their tests)."""

from __future__ import annotations

import math

import pytest
from ntl_trl.rewards import (
    TRUTH_COLUMNS,
    completion_text,
    correctness_reward,
    make_ntl_reward,
    proximity_reward,
)


def test_completion_text():
    assert completion_text("abc") == "abc"
    conv = [{"role": "assistant", "content": "#### 5"}]
    assert completion_text(conv) == "#### 5"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "#### "}, {"type": "text", "text": "6"}]}]
    assert completion_text(parts) == "#### 6"
    with pytest.raises(TypeError):
        completion_text(5)


@pytest.mark.parametrize("col", TRUTH_COLUMNS)
def test_trl_rewards_columns(col):
    comps = ["#### 5", [{"role": "assistant", "content": "\\boxed{6}"}], "#### 8", "nothing"]
    raw = ["5", "6", "9", "1"]
    if col == "answer":  # GSM8K's answer column: the full solution
        raw = [f"It is {x}.\n#### {x}" for x in raw]
    if col == "reward_model":  # verl parquet column
        raw = [{"ground_truth": x, "style": "rule"} for x in raw]
    kw = {col: raw, "prompts": ["q"] * 4, "trainer_state": None}
    assert correctness_reward(comps, **kw) == [1.0, 1.0, 0.0, 0.0]
    assert proximity_reward(comps, **kw) == pytest.approx([1.0, 1.0, math.exp(-1 / 9), 0.0])


def test_trl_missing_column_and_factory():
    with pytest.raises(ValueError, match="ground_truth"):
        correctness_reward(["#### 5"], prompts=["q"])
    with pytest.raises(ValueError, match="entries"):
        correctness_reward(["#### 5", "#### 6"], ground_truth=["5"])
    f = make_ntl_reward("score", use_ntl_bonus=True, ntl_bonus_type="proximity", ntl_bonus_weight=0.5)
    assert f.__name__ == "ntl_score_reward"
    assert f(["#### 4", "#### 5"], ground_truth=["5", "5"]) == pytest.approx([0.5 * math.exp(-1 / 5), 1.5])
    g = make_ntl_reward("enhanced", name="enh")
    assert g.__name__ == "enh" and g(["#### 17"], answer=["18"]) == pytest.approx([0.2])
    assert make_ntl_reward("correctness")(["#### 1"], solution=["1"]) == [1.0]
    with pytest.raises(ValueError, match="kind"):
        make_ntl_reward("bogus")
    with pytest.raises(ValueError, match="ntl_bonus_type"):
        make_ntl_reward("score", ntl_bonus_type="x")


