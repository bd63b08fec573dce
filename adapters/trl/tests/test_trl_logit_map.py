"""TRL's hidden-state capture on models that map their logits (issue 24, item 5).

Gemma 2 soft-caps its final logits, Granite divides them by ``logits_scaling``, Cohere multiplies
them by ``logit_scale``. The capture computes digit logits from the backbone's hidden state and
must apply the same map: its digit logits equal the digit columns of the model's own logits (a
plain forward) divided by the temperature, and its NTL sum equals the W1 of those columns. The
map it applies is the one ``ntl.logit_transform.LogitTransform.for_config`` gives (the helper
verl's fused-kernel hook uses), so the two adapters cannot drift apart.
"""

from typing import Any

import pytest
import torch
from ntl_trl._capture import HiddenNTLCapture, digit_logits_for_rows
from ntl_trl._common import resolve_model_vocab
from ntl_trl._model import find_lm_parts
from trl_tiny import char_tokenizer, digit_ids

from ntl.logit_transform import LogitTransform

T = 0.7
FAMILIES = ("gemma2", "granite", "cohere")


def mapped_model(tok, family: str, seed: int = 0) -> Any:
    """A tiny causal LM of ``family`` (a Hugging Face model: its methods are not nn.Module's)."""
    import transformers

    common = dict(vocab_size=(len(tok) + 7) // 8 * 8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                  tie_word_embeddings=False)
    if family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0,
                                        attn_logit_softcapping=None, sliding_window=64)
        cls = transformers.Gemma2ForCausalLM
    elif family == "granite":
        cfg = transformers.GraniteConfig(**common, logits_scaling=4.0)
        cls = transformers.GraniteForCausalLM
    else:
        cfg = transformers.CohereConfig(**common, logit_scale=0.25)
        cls = transformers.CohereForCausalLM
    torch.manual_seed(seed)
    m = cls(cfg).float()
    with torch.no_grad():  # digit logits well beyond the soft-cap, so that the cap bends them
        m.get_output_embeddings().weight.mul_(40.0)
    return m


def _ids(tok, B=3, L=9, seed=1):
    return torch.randint(3, len(tok), (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_digit_logits_are_the_digit_columns_of_the_models_own_logits(family):
    tok = char_tokenizer()
    model = mapped_model(tok, family)
    parts = find_lm_parts(model)
    vocab = resolve_model_vocab(tok, parts.vocab_size)
    dig = digit_ids(tok)
    ids = _ids(tok)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()[..., dig] / T  # the model applies its own map
        h = parts.backbone(input_ids=ids).last_hidden_state
        got = digit_logits_for_rows(parts, h.reshape(-1, h.shape[-1]), vocab, parts.logit_transform(T))
        raw = h @ model.get_output_embeddings().weight[dig].T / T
    torch.testing.assert_close(got.view_as(want), want, rtol=1e-5, atol=1e-5)
    assert float((raw - want).abs().max()) > 0.5  # the map matters at the digit columns
    # the map the TRL adapter applies is the shared helper's (the one verl's fused hook uses)
    assert parts.logit_transform(T) == LogitTransform.for_config(model.config, T)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_ntl_sum_is_the_w1_of_the_models_own_logits(family):
    """HiddenNTLCapture inside the model's own forward: sum of W1 over the number-token targets,
    against a float64 W1 of the model's full logits (causal shift: state t-1 scores token t)."""
    tok = char_tokenizer()
    model = mapped_model(tok, family, seed=2)
    parts = find_lm_parts(model)
    vocab = resolve_model_vocab(tok, parts.vocab_size)
    dig = digit_ids(tok)
    ids = _ids(tok, seed=3)
    targets = ids[:, 1:].clone()  # token t scored by the state at t - 1 (start=0)
    cap = HiddenNTLCapture(parts, vocab, method="wasserstein")
    cap.arm(targets, start=0, transform=parts.logit_transform(T))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    res = cap.disarm()
    cap.remove()
    terms = []
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y in dig:
                q = torch.softmax(logits[b, t, dig] / T, -1)
                terms.append(sum(q[k] * abs(k - dig.index(y)) for k in range(10)))
    assert len(terms) > 0 and float(res.sums[0]) == len(terms)
    torch.testing.assert_close(res.loss_sum.double(), torch.stack(terms).sum(), rtol=1e-5, atol=1e-5)
