"""NTLConfig validation, model-part discovery and the reward wrappers (no training)."""

import pytest
import torch
from ntl_trl import NTLConfig
from ntl_trl._model import find_lm_parts
from ntl_trl.rewards import correctness_reward, proximity_reward, reward_with_answer_column
from trl_tiny import char_tokenizer, tiny_qwen2


def test_defaults_and_needs_answers():
    cfg = NTLConfig()
    assert (cfg.ntl_weight, cfg.ntl_method, cfg.ntl_labels) == (0.1, "wasserstein", "final_answer")
    assert cfg.needs_answers
    assert not NTLConfig(ntl_labels="all", correct_only=False, answer_column=None).needs_answers
    assert NTLConfig(ntl_labels="all").needs_answers  # correct_only defaults to True


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"ntl_weight": -0.1}, ValueError, "ntl_weight"),
        ({"ntl_weight": float("nan")}, ValueError, "ntl_weight"),
        ({"ntl_weight": True}, ValueError, "ntl_weight"),
        ({"ntl_method": "l2"}, ValueError, "ntl_method"),
        ({"ntl_labels": "digits"}, ValueError, "ntl_labels"),
        ({"answer_column": ""}, ValueError, "answer_column"),
        ({"answer_column": None}, ValueError, "answer_column"),  # final_answer needs it
        ({"ntl_labels": "all", "answer_column": None}, ValueError, "correct_only"),
        ({"correct_only": "yes"}, TypeError, "correct_only"),
        ({"temperature": 0}, ValueError, "temperature"),
    ],
)
def test_bad_options_are_named(kwargs, err, match):
    with pytest.raises(err, match=match):
        NTLConfig(**kwargs)


def test_find_lm_parts_on_plain_and_wrapped_models():
    tok = char_tokenizer()
    lm = tiny_qwen2(tok)
    parts = find_lm_parts(lm)
    assert parts.lm is lm and parts.backbone is lm.model and parts.lm_head is lm.lm_head
    wrapper = torch.nn.ModuleDict({"policy": lm, "value": torch.nn.Linear(2, 2)})
    assert find_lm_parts(wrapper).lm is lm
    with pytest.raises(TypeError, match="no causal LM head"):
        find_lm_parts(torch.nn.Linear(2, 2))
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        find_lm_parts(lm)


def test_reward_wrappers_read_nested_answer_columns():
    completions = ["so #### 42", "#### 41", "no answer"]
    nested = [{"ground_truth": "42", "style": "rule"}] * 3
    fn = reward_with_answer_column(correctness_reward, "reward_model.ground_truth")
    assert fn(completions, reward_model=nested, prompt=["p"] * 3) == [1.0, 0.0, 0.0]
    prox = reward_with_answer_column(proximity_reward, "target")(completions, target=["42"] * 3)
    assert prox[0] == 1.0 and 0.0 < prox[1] < 1.0 and prox[2] == 0.0
    with pytest.raises(KeyError, match="reward_model"):
        fn(completions, prompt=["p"] * 3)
