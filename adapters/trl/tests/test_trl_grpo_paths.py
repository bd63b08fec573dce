"""NTLGRPOTrainer through the full training path on the routes a real run takes: completions
that write ``#### N`` (a scripted ``generate``; everything after generation is real TRL),
the window normalisation (GA 1x4 == 4x1), no answers (warning), ``beta > 0`` (reference model
and PEFT), ``num_iterations > 1``, evaluation, soft-capped / scaled logits, ZeRO-3.

With ``constant_reward`` every advantage is 0, so the policy loss has no gradient and a
step's update is ``-lr * ntl_weight * grad NTL`` alone (SGD, no clipping); the expected NTL
is computed here from the model's full logits and hand-written targets.
"""

import logging

import pytest
import torch
from datasets import Dataset
from trl_tiny import (
    char_tokenizer,
    constant_reward,
    crafted_batch,
    grads_of,
    ntl_through_compute_loss,
    params,
    sampled_digit_targets,
    script_generate,
    tiny_qwen2,
    trainer_args,
    w1_with_targets,
)

trl = pytest.importorskip("trl")
pytest.importorskip("trl.trainer.grpo_trainer")
from ntl_trl import NTLConfig, NTLGRPOTrainer  # noqa: E402
from ntl_trl.trainer import NTL_COUNT_KEY, NTL_TARGETS_KEY  # noqa: E402

T, LR = 0.7, 0.5

# Completions the tiny policy "writes", and the final-answer targets they get against the
# ground truths 42 and 5: {completion text: {completion position: target digit}}.
SCRIPT = {"12+30=": ["so #### 42", "x 3 #### 142"], "9-4=": ["#### 7", "none"]}
TRUTH = {"12+30=": "42", "9-4=": "5"}
FINAL_ANSWER_TARGETS = {
    "so #### 42": {8: 4, 9: 2},  # the answer is right: each digit targets itself
    "x 3 #### 142": {9: 0, 10: 4, 11: 2},  # hundreds has no counterpart in 42 -> 0; the 3 gets none
    "#### 7": {5: 5},
    "none": {},  # no answer
}


class Recording:
    """Mixed into a trainer class: keeps every micro-batch compute_loss sees, with its mode."""

    batches: list  # set by make()
    model: torch.nn.Module  # the trainer's

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches.append(({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in inputs.items()}, "train" if self.model.training else "eval",
                             {k: v.detach().clone() for k, v in model.named_parameters()}))
        # the trainer's compute_loss (this class is mixed in before the trainer)
        return super().compute_loss(model, inputs, *args, **kwargs)  # pyright: ignore[reportAttributeAccessIssue]


class RecNTL(Recording, NTLGRPOTrainer):
    pass


def make(tmp_path, *, script=SCRIPT, truth=TRUTH, cls=RecNTL, model=None, **kw):
    tok = char_tokenizer()
    ntl_kw = {k: kw.pop(k) for k in list(kw) if k in ("ntl_config", "peft_config", "eval_dataset")}
    ds = Dataset.from_dict({"prompt": list(script), "ground_truth": [truth[p] for p in script]})
    kw.setdefault("num_generations", 2)
    kw.setdefault("max_steps", 1)
    model = model if model is not None else tiny_qwen2(tok)
    script_generate(model, tok, script)
    tr = cls(model=model, reward_funcs=constant_reward, processing_class=tok, train_dataset=ds,
             args=trainer_args(output_dir=str(tmp_path), temperature=T, learning_rate=LR, **kw),
             **ntl_kw)
    tr.batches = []
    return tr


def load(model, theta):
    """``model`` with the recorded parameters ``theta`` (names as in named_parameters)."""
    with torch.no_grad():
        live = dict(model.named_parameters())
        for k, v in theta.items():
            live[k].copy_(v)
    return model


def final_answer_targets(mb, tok):
    """Hand targets of a recorded micro-batch: {(row, position): digit}."""
    out = {}
    for b, text in enumerate(tok.batch_decode(mb["completion_ids"], skip_special_tokens=True)):
        for t, y in FINAL_ANSWER_TARGETS[text].items():
            out[(b, t)] = y
    return out


def test_final_answer_through_training_targets_the_ground_truth(tmp_path):
    """'####' completions through the real GRPO step: logged NTL, the targets and the update
    all follow the ground truths (would fail if NTL were 0 or misaligned)."""
    w = 1.0
    tr = make(tmp_path, per_device_train_batch_size=4,
              ntl_config=NTLConfig(ntl_weight=w, ntl_labels="final_answer"))
    theta0 = params(tr.model)
    tr.train()
    assert len(tr.batches) == 1
    mb, _, _ = tr.batches[0]
    tok = tr.processing_class
    targets = final_answer_targets(mb, tok)
    assert len(targets) == 6 and float(mb[NTL_COUNT_KEY]) == 6
    digit_ids = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    for (b, t), y in targets.items():
        assert int(mb[NTL_TARGETS_KEY][b, t]) == digit_ids[y]
    assert int((mb[NTL_TARGETS_KEY] != -100).sum()) == 6  # no other position is targeted
    ref_model = tiny_qwen2(tok)
    total, n = w1_with_targets(ref_model, mb, tok, T, targets, requires_grad=True)
    log = next(h for h in tr.state.log_history if "ntl/loss" in h)
    assert log["ntl/total_digits"] == 6
    assert log["ntl/loss"] == pytest.approx(float(total.detach()) / n, rel=1e-5)
    assert log["ntl/loss"] > 0.5  # far from the silent zero
    assert log["ntl/answer_rate"] == pytest.approx(0.75)  # "none" has no answer
    grad = grads_of(ref_model, w * total / n)
    after = params(tr.model)
    for k in theta0:
        torch.testing.assert_close(after[k] - theta0[k], -LR * grad[k], rtol=1e-3, atol=2e-6, msg=k)
    assert max(g.abs().max() for g in grad.values()) > 1e-3


def test_no_answers_warn_once_and_log_the_answer_rate(tmp_path, caplog):
    from transformers.utils import logging as hf_logging

    script = {"12+30=": ["no answer", "4 apples"], "9-4=": ["x", "still 55 none"]}
    tr = make(tmp_path, script=script, per_device_train_batch_size=4, max_steps=2,
              ntl_config=NTLConfig(ntl_weight=0.5, ntl_labels="final_answer"))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hf = hf_logging.get_logger("transformers.trainer")
    hf.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ntl"):
            tr.train()
    finally:
        hf.removeHandler(handler)
    ntl_msgs = [r.getMessage() for r in caplog.records if r.name == "ntl" and "no digit target" in r.getMessage()]
    assert len(ntl_msgs) == 1, ntl_msgs  # once, not per step
    assert "0% of them have a final answer" in ntl_msgs[0] and "####" in ntl_msgs[0]
    assert sum("no digit target" in m for m in seen) == 1  # and in the trainer's log
    logs = [h for h in tr.state.log_history if "ntl/answer_rate" in h]
    assert len(logs) == 2 and all(h["ntl/answer_rate"] == 0.0 for h in logs)
    assert all(h["ntl/total_digits"] == 0 for h in logs)
    # with answers written there is no warning
    caplog.clear()
    ok = make(tmp_path / "ok", per_device_train_batch_size=4,
              ntl_config=NTLConfig(ntl_weight=0.5, ntl_labels="final_answer"))
    with caplog.at_level(logging.WARNING, logger="ntl"):
        ok.train()
    assert not [r for r in caplog.records if "no digit target" in r.getMessage()]


def test_window_normalisation_gives_1x4_the_update_of_4x1(tmp_path):
    """Uneven digit counts (3, 0, 4, 1) over one generation batch: 4 micro-batches of 1
    accumulated == 1 micro-batch of 4 == -lr * w * grad(sum over the 8 digits / 8)."""
    script = {"12+30=": ["1 #### 23", "no", "4567 x", "8"]}
    cfg = NTLConfig(ntl_weight=1.0, ntl_labels="all", correct_only=False)
    a = make(tmp_path / "a", script=script, num_generations=4, per_device_train_batch_size=1,
             gradient_accumulation_steps=4, ntl_config=cfg)
    b = make(tmp_path / "b", script=script, num_generations=4, per_device_train_batch_size=4,
             gradient_accumulation_steps=1, ntl_config=cfg)
    theta0 = params(a.model)
    a.train()
    b.train()
    assert len(a.batches) == 4 and len(b.batches) == 1
    tok = a.processing_class
    counts = sorted(len(sampled_digit_targets(mb, tok)) for mb, _, _ in a.batches)
    assert counts == [0, 1, 3, 4]
    pa, pb = params(a.model), params(b.model)
    ref_model = tiny_qwen2(tok)
    mb = b.batches[0][0]
    total, n = w1_with_targets(ref_model, mb, tok, T, sampled_digit_targets(mb, tok), requires_grad=True)
    assert n == 8
    grad = grads_of(ref_model, total / n)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(pa[k] - theta0[k], -LR * grad[k], rtol=1e-3, atol=2e-6, msg=k)


@pytest.mark.parametrize("ref", ["ref_model", "peft"])
def test_beta_positive_keeps_ntl_on_the_policy_forward(tmp_path, ref):
    """beta > 0: the reference log-probs come from a separate model (or, with PEFT, the same
    backbone with the adapter off); NTL stays the policy's, equal to the full-logit value."""
    tok = char_tokenizer()
    model = tiny_qwen2(tok)
    kw = {}
    if ref == "ref_model":  # TRL builds the reference from the policy's path: save it locally
        model.save_pretrained(tmp_path / "policy")
        model.config._name_or_path = str(tmp_path / "policy")
    else:
        pytest.importorskip("peft")
        from peft import LoraConfig

        kw["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       task_type="CAUSAL_LM")
    tr = make(tmp_path, model=model, per_device_train_batch_size=4, max_steps=2, beta=0.1,
              ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels="final_answer"), **kw)
    tr.train()
    assert len(tr.batches) == 2
    logs = [h for h in tr.state.log_history if "ntl/loss" in h]
    assert len(logs) == 2 and all("kl" in h for h in logs)
    assert logs[1]["kl"] > 0  # the second step's policy has moved away from the reference
    for (mb, _, theta), log in zip(tr.batches, logs, strict=True):
        # the recorded parameters on the trained model itself (PEFT: with its adapter)
        m = load(tr.model, theta)
        total, n = w1_with_targets(m, mb, tok, T, final_answer_targets(mb, tok))
        assert log["ntl/loss"] == pytest.approx(float(total) / n, rel=1e-5)
    assert logs[0]["ntl/loss"] != pytest.approx(logs[1]["ntl/loss"], rel=1e-6)


def test_num_iterations_reuses_the_batch_and_its_targets(tmp_path):
    tr = make(tmp_path, per_device_train_batch_size=4, max_steps=2, num_iterations=2,
              ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels="final_answer"))
    tr.train()
    (b1, _, _), (b2, _, _) = tr.batches
    assert torch.equal(b1["completion_ids"], b2["completion_ids"])
    assert torch.equal(b1[NTL_TARGETS_KEY], b2[NTL_TARGETS_KEY])
    assert "old_per_token_logps" in b1  # TRL's num_iterations > 1 path
    tok = tr.processing_class
    logs = [h for h in tr.state.log_history if "ntl/loss" in h]
    for (mb, _, theta), log in zip(tr.batches, logs, strict=True):
        m = load(tiny_qwen2(tok), theta)
        total, n = w1_with_targets(m, mb, tok, T, final_answer_targets(mb, tok))
        assert log["ntl/loss"] == pytest.approx(float(total) / n, rel=1e-5)
    assert logs[1]["ntl/loss"] < logs[0]["ntl/loss"]  # the NTL step lowered it


def test_evaluation_logs_eval_ntl_and_adds_it_to_the_eval_loss(tmp_path):
    eval_ds = Dataset.from_dict({"prompt": ["12+30="], "ground_truth": ["42"]})
    w = 0.5
    tr = make(tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=2,
              eval_strategy="steps", eval_steps=1, eval_dataset=eval_ds,
              ntl_config=NTLConfig(ntl_weight=w, ntl_labels="final_answer"))
    tr.train()
    evals = [(mb, theta) for mb, mode, theta in tr.batches if mode == "eval"]
    assert len(evals) == 1
    mb, theta = evals[0]
    tok = tr.processing_class
    m = load(tiny_qwen2(tok), theta)
    targets = final_answer_targets(mb, tok)
    total, n = w1_with_targets(m, mb, tok, T, targets)
    assert n == 5  # "so #### 42" (2) and "x 3 #### 142" (3)
    log = next(h for h in tr.state.log_history if "eval_ntl/loss" in h)
    assert log["eval_ntl/total_digits"] == n
    assert log["eval_ntl/loss"] == pytest.approx(float(total) / n, rel=1e-5)
    assert log["eval_loss"] == pytest.approx(w * float(total) / n, rel=1e-4)  # policy loss is 0


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_softcapped_and_scaled_logits_get_the_same_map(tmp_path, family):
    """Gemma 2 soft-caps its logits, Cohere scales them: NTL equals the W1 of the model's own
    (transformed) full logits divided by the temperature, and differs from the untransformed one."""
    import transformers

    tok = char_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    if family == "gemma2":  # initializer_range: logits large enough for the cap to bend them
        cfg = transformers.Gemma2Config(**common, head_dim=16, initializer_range=1.0, final_logit_softcapping=2.0,
                                        attn_logit_softcapping=None, sliding_window=64)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=4.0))
    tr = NTLGRPOTrainer(model=model, reward_funcs=constant_reward, processing_class=tok,
                        train_dataset=Dataset.from_dict({"prompt": ["a"], "ground_truth": ["1"]}),
                        args=trainer_args(output_dir=str(tmp_path), temperature=T),
                        ntl_config=NTLConfig(ntl_weight=1.0, ntl_labels="all", correct_only=False))
    assert (tr._ntl_parts.softcap, tr._ntl_parts.logit_scale) == (
        (2.0, 1.0) if family == "gemma2" else (None, 4.0))
    inputs = crafted_batch(tok, ["ab 7 #### 12", "so 90 x"])
    loss, _ = ntl_through_compute_loss(tr, inputs)
    targets = sampled_digit_targets(inputs, tok)
    total, n = w1_with_targets(tr.model, inputs, tok, T, targets)  # the model applies its own map
    torch.testing.assert_close(loss, total / n, rtol=1e-5, atol=1e-6)
    # the map matters here: the raw h @ W.T logits give another value
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        h = tr.model.model(input_ids=ids).last_hidden_state
    P = inputs["prompt_ids"].shape[1]
    dig = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    raw = []
    with torch.no_grad():  # (float() of the loss below would warn about its graph otherwise)
        for (b, t), y in targets.items():
            q = torch.softmax(h[b, P + t - 1] @ tr.model.lm_head.weight[dig].T / T, -1)
            raw.append(sum(q[k] * abs(k - y) for k in range(10)))
    assert float(torch.stack(raw).mean()) != pytest.approx(float(loss.detach()), rel=0.05)


def test_zero3_is_refused_at_construction(tmp_path, monkeypatch):
    import transformers.integrations.deepspeed as hf_ds

    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="ZeRO-3"):
        make(tmp_path, ntl_config=NTLConfig(ntl_weight=0.1, ntl_labels="final_answer"))
