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



def test_w1_is_an_alias_of_wasserstein_as_in_ntl():
    from ntl_trl import NTLCallback, NTLSFTConfig

    assert NTLConfig(ntl_method="w1").ntl_method == "wasserstein"
    assert NTLSFTConfig(ntl_method="w1").ntl_method == "wasserstein"
    assert NTLCallback(ntl_method="w1").ntl_method == "wasserstein"


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
    assert (parts.logit_scale, parts.softcap) == (1.0, None)
    lm.config.final_logit_softcapping = 30.0  # read, not refused: applied to the digit logits
    assert find_lm_parts(lm).softcap == 30.0


def test_logit_map_is_read_by_the_core():
    """One reader of a model's logit map for both adapters: the TRL adapter's is the core's
    (its cases: tests/rl/test_logit_map_of.py)."""
    from ntl_trl import _model

    import ntl.logit_transform

    assert _model.logit_map_of is ntl.logit_transform.logit_map_of


def test_deepspeed_zero3_is_refused(monkeypatch):
    """ZeRO-3 stand-ins: a partitioned (0-element, ``ds_id``-tagged) head weight, and the
    transformers flag that ZeRO-3 is on."""
    tok = char_tokenizer()
    lm = tiny_qwen2(tok)
    lm.config.tie_word_embeddings = False
    empty = torch.nn.Parameter(torch.empty(0))
    # what deepspeed.zero.Init tags its partitioned parameters with (not a Parameter attribute)
    empty.ds_id = 7  # pyright: ignore[reportAttributeAccessIssue]
    lm.lm_head.weight = empty
    with pytest.raises(ValueError, match="ZeRO-3"):
        find_lm_parts(lm)
    import transformers.integrations.deepspeed as hf_ds

    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="ZeRO-3"):
        find_lm_parts(tiny_qwen2(tok))


def test_reward_wrappers_read_nested_answer_columns():
    completions = ["so #### 42", "#### 41", "no answer"]
    nested = [{"ground_truth": "42", "style": "rule"}] * 3
    fn = reward_with_answer_column(correctness_reward, "reward_model.ground_truth")
    assert fn(completions, reward_model=nested, prompt=["p"] * 3) == [1.0, 0.0, 0.0]
    prox = reward_with_answer_column(proximity_reward, "target")(completions, target=["42"] * 3)
    assert prox[0] == 1.0 and 0.0 < prox[1] < 1.0 and prox[2] == 0.0
    with pytest.raises(KeyError, match="reward_model"):
        fn(completions, prompt=["p"] * 3)
