"""verl 0.9 NTL engine on models that map their logits (issue 24, item 5).

Gemma 2 soft-caps its final logits (``c tanh(z / c)``), Granite divides them by
``logits_scaling`` and Cohere multiplies them by ``logit_scale``. The engine's non-fused path reads
the model's own logits; its fused-kernel path (``use_fused_kernels``: no logits exist) computes
digit logits from the decoder's hidden state and must apply the same map. Both are checked
against the digit columns of a plain Hugging Face forward's logits (computed before verl patches
the model), and the NTL term of the update against the full-logit reference, on CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import verl_version

v = verl_version()
if v is None or v.release[:2] < (0, 9):
    pytest.skip("needs verl >= 0.9 (scripts/test_verl.sh runs this in its venv)", allow_module_level=True)

import harness as H  # noqa: E402
from harness import DIGIT_IDS, expected_targets, ref_ntl  # noqa: E402

T = 0.7  # sampling temperature: the map is applied before dividing by it
FAMILIES = ("gemma2", "granite", "cohere")


def mapped_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny causal LM of ``family`` whose logit map bends/rescales its digit logits."""
    import transformers

    common = dict(vocab_size=H.V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    if family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0,
                                        attn_logit_softcapping=None, sliding_window=128)
        cls = transformers.Gemma2ForCausalLM
    elif family == "granite":
        cfg = transformers.GraniteConfig(**common, logits_scaling=4.0)
        cls = transformers.GraniteForCausalLM
    elif family == "cohere":
        cfg = transformers.CohereConfig(**common, logit_scale=0.25)
        cls = transformers.CohereForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    m = cls(cfg).float()
    with torch.no_grad():  # digit logits well beyond the soft-cap, so that the cap bends them
        m.get_output_embeddings().weight.mul_(40.0)
    return m


@pytest.fixture(scope="module")
def batch(qwen_tok):
    return H.encode(qwen_tok)


def own_digit_logits(model, batch) -> list[torch.Tensor]:
    """Per sample ``[prompt+response, K]``: the digit columns of the model's own logits (a plain
    Hugging Face forward, which applies the model's logit map) divided by ``T``."""
    return [lg[:, DIGIT_IDS] / T for lg in H.full_logits(model, batch)]


def raw_digit_logits(model, batch) -> list[torch.Tensor]:
    """The same rows *without* the map: ``h @ W[ids].T / T`` from the decoder's hidden state."""
    input_ids, attn, pos, P, _ = H.padded(batch)
    with torch.no_grad():
        h = model.get_decoder()(input_ids=input_ids, attention_mask=attn, position_ids=pos).last_hidden_state
        z = h @ model.get_output_embeddings().weight[DIGIT_IDS].T / T
    return [z[i, P - len(p):P + len(r)] for i, (p, r) in enumerate(zip(batch.prompts, batch.responses, strict=True))]


def fuse(model) -> None:
    """verl's fused-kernel forward (torch backend) on ``model`` only (its own class, as verl
    patches ``model.__class__.forward``)."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    model.__class__ = type(f"Fused{type(model).__name__}", (type(model),), {})
    apply_monkey_patch(model, use_fused_kernels=True, fused_kernels_backend="torch")


def spy_digit_logits(monkeypatch) -> list[torch.Tensor]:
    """Record every jagged ``[B, seq, K]`` digit-logit tensor the engine hands verl."""
    import ntl_verl.engine as ne

    seen: list[torch.Tensor] = []
    orig = ne.NTLEngineMixin._ntl_digit_logits

    def recording(self, *args, **kwargs):
        z = orig(self, *args, **kwargs)
        seen.append(z.detach().clone())
        return z

    monkeypatch.setattr(ne.NTLEngineMixin, "_ntl_digit_logits", recording)
    return seen


def update(model, tok, monkeypatch, batch, *, weight, fused, rmpad=True, micro=4):
    """One update (forward + backward) of the NTL engine; returns the sum of its micro-batch losses."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    cfg = H.actor_config(ntl_weight=weight, ntl_labels="final_answer")
    eng = H.make_engine(model, tok, monkeypatch=monkeypatch, config=cfg)
    td = H.assign_update_meta(H.v1_batch(batch), rmpad=rmpad, temperature=T, micro=micro, fused=fused)
    if fused:
        tu.assign_non_tensor(td, use_fused_kernels=True)
    model.zero_grad(set_to_none=True)
    out = eng.forward_backward_batch(td, functools.partial(ppo_loss, config=cfg), forward_only=False)
    return float(sum(out["loss"]))


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", FAMILIES)
def test_configs_carry_the_map_the_test_relies_on(family):
    """The map is on and moves the digit logits (else the tests below could not fail)."""
    from ntl.logit_transform import logit_map_of

    scale, softcap = logit_map_of(mapped_model(family).config)
    assert (scale, softcap) == {"gemma2": (1.0, 3.0), "granite": (0.25, None), "cohere": (0.25, None)}[family]


@pytest.mark.parametrize("rmpad", [True, False], ids=["rmpad", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_path_gives_the_digit_columns_of_the_models_own_logits(qwen_tok, batch, dist_group, monkeypatch,
                                                                    family, rmpad):
    model = mapped_model(family)
    want = own_digit_logits(model, batch)
    raw = raw_digit_logits(model, batch)
    # the map matters at the digit columns: the unmapped logits are far from the model's
    assert max(float((r - w).abs().max()) for r, w in zip(raw, want, strict=True)) > 0.5
    got = {}
    for fused in (False, True):
        if fused:
            fuse(model)
        seen = spy_digit_logits(monkeypatch)
        update(model, qwen_tok, monkeypatch, batch, weight=1.0, fused=fused, rmpad=rmpad)
        assert len(seen) == 1  # one micro-batch: all four samples, in order
        got[fused] = list(seen[0].unbind())
        monkeypatch.undo()
    for fused, rows in got.items():
        assert len(rows) == len(want)
        for i, (z, w) in enumerate(zip(rows, want, strict=True)):
            assert z.shape == w.shape, (fused, i)
            torch.testing.assert_close(z, w, rtol=1e-4, atol=1e-4, msg=f"{family} fused={fused} sample {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_ntl_term_is_the_same_on_the_fused_and_logits_paths(qwen_tok, batch, dist_group, monkeypatch, family):
    """NTL term of the update (loss at weight 1 minus at weight 0) on each path equals the W1/MSE of
    the model's own logits (``harness.ref_ntl``); the unmapped hidden-state logits would give another."""
    model = mapped_model(family, seed=3)
    tg = expected_targets(qwen_tok, batch, "final_answer")
    ref = ref_ntl(model, batch, tg, temperature=T)
    term = {}
    for fused in (False, True):
        if fused:
            fuse(model)
        l0 = update(model, qwen_tok, monkeypatch, batch, weight=0.0, fused=fused, micro=2)
        l1 = update(model, qwen_tok, monkeypatch, batch, weight=1.0, fused=fused, micro=2)
        term[fused] = l1 - l0
    assert term[True] == pytest.approx(term[False], rel=1e-4, abs=1e-6)
    assert term[False] == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_fused_path_refuses_a_logit_map_it_does_not_know(qwen_tok, batch, dist_group, monkeypatch):
    """A config declaring a final-logit soft-cap under another name (RecurrentGemma's
    ``logits_soft_cap``) is refused by name on the fused path instead of being ignored."""
    model: Any = H.tiny_model(seed=2)  # a Hugging Face model (config is not nn.Module's)
    model.config.logits_soft_cap = 5.0
    fuse(model)
    with pytest.raises(ValueError, match=r"logits_soft_cap=5\.0"):
        update(model, qwen_tok, monkeypatch, batch, weight=1.0, fused=True)
