"""ntl.logit_transform.logit_map_of / LogitTransform.for_config: the model's logit map read from
its config (the one helper both adapters use), hand values, and refusal of maps it does not know."""

import math
from types import SimpleNamespace

import pytest
import torch

from ntl.logit_transform import LogitTransform, logit_map_of


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({}, (1.0, None)),
        ({"final_logit_softcapping": 30.0}, (1.0, 30.0)),  # Gemma 2
        ({"final_logit_softcapping": None}, (1.0, None)),  # Gemma 3 (no cap)
        ({"logit_scale": 0.0625}, (0.0625, None)),  # Cohere
        ({"output_multiplier": 2.0}, (2.0, None)),
        ({"lm_head_multiplier": 0.5}, (0.5, None)),  # Falcon-H1
        ({"logits_scaling": 8.0}, (0.125, None)),  # Granite divides
        ({"logits_scaling": 8.0, "model_type": "hyperclovax"}, (8.0, None)),  # HyperCLOVA X multiplies
        ({"logit_scale": None, "output_multiplier": 3.0, "logits_scaling": 8.0}, (3.0, None)),
        ({"logits_scaling": 4.0, "final_logit_softcapping": 2.0}, (0.25, 2.0)),
        # attention / router soft-caps and contrastive inits are not final-logit maps
        ({"attn_logit_softcapping": 50.0, "moe_router_logit_softcapping": 5.0,
          "logit_scale_init_value": 2.66}, (1.0, None)),
    ],
)
def test_hand_values(attrs, expected):
    assert logit_map_of(SimpleNamespace(**attrs)) == expected


def test_none_config_and_composite_text_config():
    assert logit_map_of(None) == (1.0, None)
    text = SimpleNamespace(final_logit_softcapping=5.0, logit_scale=2.0)
    outer = SimpleNamespace(get_text_config=lambda: text, logit_scale=99.0)  # a VLM: the text config counts
    assert logit_map_of(outer) == (2.0, 5.0)


def test_for_config_is_cap_tanh_of_scaled_logits_over_temperature():
    f = LogitTransform.for_config(SimpleNamespace(final_logit_softcapping=3.0, logits_scaling=4.0), 0.5)
    assert f == LogitTransform(scale=0.25, softcap=3.0, temperature=0.5)
    z = torch.tensor([-40.0, -1.0, 0.0, 2.0, 40.0])
    want = torch.tensor([3 * math.tanh(v / 4 / 3) / 0.5 for v in z.tolist()])
    torch.testing.assert_close(f(z), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        LogitTransform.for_config(SimpleNamespace(), 0.0)


@pytest.mark.parametrize(
    ("attrs", "name"),
    [
        ({"logits_soft_cap": 30.0}, "logits_soft_cap"),  # RecurrentGemma
        ({"output_logit_soft_cap": 15.0}, "output_logit_soft_cap"),  # xLSTM
        ({"dim_model_base": 256, "hidden_size": 2304}, "dim_model_base"),  # MiniCPM
        ({"final_logits_multiplier": 0.5}, "final_logits_multiplier"),  # named like a logit map
    ],
)
def test_unknown_logit_maps_are_refused_by_name(attrs, name):
    with pytest.raises(ValueError, match=name):
        logit_map_of(SimpleNamespace(**attrs))
    with pytest.raises(ValueError, match=name):
        LogitTransform.for_config(SimpleNamespace(**attrs), 0.7)


def test_unset_unknown_fields_are_not_refused():
    assert logit_map_of(SimpleNamespace(logits_soft_cap=None, dim_model_base=None,
                                        final_logits_multiplier=False)) == (1.0, None)


def test_hugging_face_configs():
    transformers = pytest.importorskip("transformers")
    assert logit_map_of(transformers.Gemma2Config(final_logit_softcapping=3.0)) == (1.0, 3.0)
    assert logit_map_of(transformers.GraniteConfig(logits_scaling=4.0)) == (0.25, None)
    assert logit_map_of(transformers.CohereConfig(logit_scale=0.25)) == (0.25, None)
    assert logit_map_of(transformers.Qwen2Config()) == (1.0, None)
    recurrent = getattr(transformers, "RecurrentGemmaConfig", None)
    if recurrent is not None:
        with pytest.raises(ValueError, match="logits_soft_cap"):
            logit_map_of(recurrent())
