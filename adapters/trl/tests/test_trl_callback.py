"""NTLCallback (gradient injection) on TRL 1.16's GRPOTrainer: same update as the mixin."""

import pytest
import torch
from trl_tiny import (
    char_tokenizer,
    digit_count_reward,
    params,
    tiny_dataset,
    tiny_qwen2,
    trainer_args,
)

trl = pytest.importorskip("trl")
pytest.importorskip("trl.trainer.grpo_trainer")
from ntl_trl import NTLCallback, NTLConfig, NTLGRPOTrainer  # noqa: E402


def _run(tmp_path, *, mixin_weight=None, callback=None, n_prompts=8, **args_kw):
    tok = char_tokenizer()
    kw = {}
    cls = trl.GRPOTrainer
    if mixin_weight is not None:
        cls = NTLGRPOTrainer
        kw["ntl_config"] = NTLConfig(ntl_weight=mixin_weight, ntl_labels="all", correct_only=False)
    tr = cls(model=tiny_qwen2(tok), reward_funcs=digit_count_reward, processing_class=tok,
             train_dataset=tiny_dataset(n_prompts), callbacks=[callback] if callback else None,
             args=trainer_args(output_dir=str(tmp_path), temperature=0.8, **args_kw), **kw)
    tr.train()
    return tr


def test_callback_gives_the_mixins_update_and_metrics(tmp_path):
    """GA 2 with one micro-batch per generation (where the mixin's window normalisation is
    the micro-batch mean / G), over 3 micro-batches: the last window is short (1 micro-batch),
    and both routes divide by the current G there."""
    ga = dict(num_train_epochs=1, max_steps=-1, per_device_train_batch_size=2, num_generations=2,
              gradient_accumulation_steps=2, steps_per_generation=1, gradient_checkpointing=True)
    mixin = _run(tmp_path / "m", mixin_weight=0.7, n_prompts=3, **ga)
    cb = NTLCallback(ntl_weight=0.7)
    hooked = _run(tmp_path / "c", callback=cb, n_prompts=3, **ga)
    plain = _run(tmp_path / "p", n_prompts=3, **ga)
    assert mixin.state.global_step == hooked.state.global_step == 2  # windows of 2 and 1
    pm, pc, pp = params(mixin.model), params(hooked.model), params(plain.model)
    for k in pm:
        torch.testing.assert_close(pc[k], pm[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(pp[k], pm[k]) for k in pm)
    m_logs = [h for h in mixin.state.log_history if "ntl/loss" in h]
    c_logs = [h for h in hooked.state.log_history if "ntl/loss" in h]
    assert len(m_logs) == len(c_logs) == 2
    for a, b in zip(m_logs, c_logs, strict=True):
        for key in ("ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert sum(h["ntl/total_digits"] for h in c_logs) > 0
    # hooks are gone after training: a grad-enabled forward no longer injects anything
    lm = hooked.model
    assert not lm.model._forward_hooks and not lm._forward_pre_hooks
    assert "generate" not in vars(lm)


def test_callback_validates_its_options():
    with pytest.raises(ValueError, match="ntl_weight"):
        NTLCallback(ntl_weight=-1.0)
    with pytest.raises(ValueError, match="ntl_method"):
        NTLCallback(ntl_method="l1")
    with pytest.raises(ValueError, match="temperature"):
        NTLCallback(temperature=0.0)


def test_lora_policy_mixin_equals_callback_and_differs_from_plain(tmp_path):
    """With a PEFT LoRA policy (PEFT calls the LM's forward directly, bypassing its hooks)."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    def run(name, **kw):
        tok = char_tokenizer()
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
        cls = kw.pop("cls", trl.GRPOTrainer)
        tr = cls(model=tiny_qwen2(tok), reward_funcs=digit_count_reward, processing_class=tok,
                 train_dataset=tiny_dataset(), peft_config=lora,
                 args=trainer_args(output_dir=str(tmp_path / name), max_steps=1), **kw)
        tr.train()
        lora_params = {k: v.detach().clone() for k, v in tr.model.named_parameters() if "lora_" in k}
        assert lora_params
        return lora_params, tr

    mixin, tm = run("m", cls=NTLGRPOTrainer,
                    ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels="all", correct_only=False))
    hooked, tc = run("c", callbacks=[NTLCallback(ntl_weight=1.0)])
    plain, _ = run("p")
    for k in mixin:
        torch.testing.assert_close(hooked[k], mixin[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.allclose(plain[k], mixin[k]) for k in mixin)
    lm = [h["ntl/loss"] for h in tm.state.log_history if "ntl/loss" in h]
    lc = [h["ntl/loss"] for h in tc.state.log_history if "ntl/loss" in h]
    assert lm == pytest.approx(lc) and lm[0] > 0
