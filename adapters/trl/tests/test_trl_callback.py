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
from transformers import TrainerCallback  # noqa: E402


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


def _trainer(tmp_path, callbacks=None, cls=None, model=None, reward=digit_count_reward, **args_kw):
    tok = char_tokenizer()
    args_kw.setdefault("max_steps", 1)
    return (cls or trl.GRPOTrainer)(
        model=model if model is not None else tiny_qwen2(tok), reward_funcs=reward,
        processing_class=tok, train_dataset=tiny_dataset(), callbacks=callbacks,
        args=trainer_args(output_dir=str(tmp_path), temperature=0.8, **args_kw))


def test_fp16_loss_scale_reaches_the_injected_gradient(tmp_path):
    """A GradScaler multiplies every gradient by S = 2^16 and the optimizer step divides by S:
    the injected NTL gradient is scaled too, so the update is the unscaled one. (accelerate
    only makes a scaler for fp16 on GPUs; a CPU GradScaler stands in for it here.)"""
    runs = {}
    for name, scaler, cb in [("cb", False, True), ("cb_scaled", True, True), ("plain", True, False)]:
        tr = _trainer(tmp_path / name, callbacks=[NTLCallback(ntl_weight=1.0)] if cb else None)
        if scaler:
            tr.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        tr.train()
        if scaler:
            assert tr.accelerator.scaler.get_scale() >= 2.0**16  # no step was skipped
        runs[name] = params(tr.model)
    for k in runs["cb"]:
        torch.testing.assert_close(runs["cb_scaled"][k], runs["cb"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(runs["plain"][k], runs["cb"][k], atol=1e-4) for k in runs["cb"])


class Reporter(TrainerCallback):
    """Sits where report_to integrations sit: before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_metrics_reach_callbacks_before_it_like_reporters(tmp_path):
    reporter, cb = Reporter(), NTLCallback(ntl_weight=0.5)
    tr = _trainer(tmp_path, callbacks=[reporter, cb], max_steps=2)
    tr.train()
    assert tr.callback_handler.callbacks[0] is cb
    seen = [h for h in reporter.logs if "ntl/loss" in h]
    assert len(seen) == 2 and all(h["ntl/total_digits"] > 0 for h in seen)
    hist = [h for h in tr.state.log_history if "ntl/loss" in h]
    assert [h["ntl/loss"] for h in hist] == [h["ntl/loss"] for h in seen]
    # attach(): the explicit way, also first
    other = _trainer(tmp_path / "a")
    other.add_callback(Reporter())
    cb2 = NTLCallback().attach(other)
    assert other.callback_handler.callbacks[0] is cb2


def test_refused_set_ups(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        _trainer(tmp_path / "m", callbacks=[NTLCallback()], cls=NTLGRPOTrainer)
    two = _trainer(tmp_path / "2", callbacks=[NTLCallback(), NTLCallback(0.2)])
    with pytest.raises(ValueError, match="NTLCallbacks"):
        two.train()
    tools = _trainer(tmp_path / "t", callbacks=[NTLCallback()])
    tools.tools = [len]  # stand-in for GRPOTrainer(tools=[...]); tool_mask never reaches a forward
    with pytest.raises(ValueError, match="tools"):
        tools.train()
    from types import SimpleNamespace

    ds = SimpleNamespace(is_deepspeed_enabled=True, callback_handler=SimpleNamespace(callbacks=[]))
    with pytest.raises(ValueError, match="fp16 with DeepSpeed"):
        NTLCallback()._check_trainer(ds, SimpleNamespace(fp16=True))
    with pytest.raises(RuntimeError, match="attach"):
        NTLCallback().on_train_begin(SimpleNamespace(), None, None, model=tiny_qwen2(char_tokenizer()))


def test_hooks_of_a_crashed_run_are_removed_not_stacked(tmp_path):
    from ntl_trl.callback import _INSTALLED

    def boom(completions, **kwargs):
        raise RuntimeError("reward server down")

    model = tiny_qwen2(char_tokenizer())
    first = NTLCallback(ntl_weight=1.0)
    crashed = _trainer(tmp_path / "x", callbacks=[first], model=model, reward=boom)
    with pytest.raises(RuntimeError, match="reward server down"):
        crashed.train()
    assert _INSTALLED.get(model) is first and model.model._forward_hooks  # left behind
    second = NTLCallback(ntl_weight=1.0)
    again = _trainer(tmp_path / "y", callbacks=[second], model=model)
    again.train()
    clean = _trainer(tmp_path / "z", callbacks=[NTLCallback(ntl_weight=1.0)])
    clean.train()
    pa, pc = params(again.model), params(clean.model)
    for k in pc:  # one injection, not two
        torch.testing.assert_close(pa[k], pc[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not model.model._forward_hooks and model not in _INSTALLED


def test_no_digits_warns_once(tmp_path, caplog):
    import logging

    from trl_tiny import PROMPTS, script_generate

    model = script_generate(tiny_qwen2(char_tokenizer()), char_tokenizer(),
                            {p: ["no digits here"] for p in PROMPTS})
    tr = _trainer(tmp_path, callbacks=[NTLCallback(ntl_weight=0.5)], model=model, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="ntl"):
        tr.train()
    # once on the `ntl` logger (the trainer's logger gets a copy; whether transformers
    # propagates it to caplog depends on its logging settings, so count ntl's own)
    msgs = [r.getMessage() for r in caplog.records
            if r.name == "ntl" and "no completion digit" in r.getMessage()]
    assert len(msgs) == 1
    assert all(h["ntl/total_digits"] == 0 for h in tr.state.log_history if "ntl/total_digits" in h)
