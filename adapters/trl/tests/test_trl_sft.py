"""NTLSFTTrainer (TRL 1.16 SFTTrainer) through ``trainer.train()`` on GSM8K rows, with Qwen2.5's
offline tokenizer and a tiny Qwen2 built from a config (Qwen2.5's 151,936-row head).

Every expected value is computed here from the model's full logits (``sft_tiny.reference``:
the causal shift by hand, ``ntl.ntl_loss`` on the logits, ``F.cross_entropy``), at the
parameters the trainer had at the start of each step, on the batches its collator built.
SGD with a constant learning rate and no clipping, so an update is ``-lr * gradient``.
"""

import itertools
import logging
import math
import os

import pytest
import torch
from sft_tiny import (
    conversations,
    fresh_model,
    grads_of,
    gsm8k_rows,
    n_digits,
    needs_gsm8k,
    params,
    prompt_completion,
    record,
    reference,
    step_logs,
    tiny_qwen,
    tokenizer,
)

trl = pytest.importorskip("trl")
from ntl_trl import NTLCallback, NTLConfig, NTLSFTConfig, NTLSFTTrainer  # noqa: E402

pytestmark = needs_gsm8k
LR = 0.5


def sft_args(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], max_steps=1,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", seed=0, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        disable_tqdm=True, dataset_num_proc=None,
    )  # gradient_checkpointing: SFTConfig's default (True)
    kw.update(overrides)
    return trl.SFTConfig(**kw)


def make(tmp_path, ds, weight=0.3, method="wasserstein", cls=None, seed=0, **overrides):
    tok = tokenizer()
    cls = cls or NTLSFTTrainer
    extra = {} if cls is trl.SFTTrainer else {"ntl_config": NTLSFTConfig(weight, method)}
    tr = cls(model=tiny_qwen(tok, seed=seed), args=sft_args(tmp_path, **overrides), train_dataset=ds,
             processing_class=tok, **extra)
    return tr, tok


def completion_of(tok, batch, rows, b):
    """The dataset row of batch row ``b`` (matched by its question)."""
    text = tok.decode(batch["input_ids"][b])
    (row,) = [r for r in rows if r["question"] in text]
    return row


# -- the value, every step -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
def test_logged_ntl_and_loss_equal_full_logit_reference_each_step(tmp_path, method):
    rows = gsm8k_rows(6)
    tr, tok = make(tmp_path, prompt_completion(rows), weight=0.3, method=method, max_steps=3)
    rec, snaps = record(tr)
    tr.train()
    logs = step_logs(tr)
    assert len(logs) == 3 and len(snaps.states) == 3
    for k, log in enumerate(logs):
        batch = rec.batches[k]
        ref = reference(fresh_model(tok, snaps.states[k]), [batch], tok, method)
        assert ref["n"] > 0
        assert log["ntl/total_digits"] == ref["n"]
        assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4, abs=1e-5)
        assert log["ntl/digit_accuracy"] == pytest.approx(ref["acc"], abs=1e-6)
        assert log["ntl/confidence"] == pytest.approx(ref["conf"], rel=1e-4, abs=1e-6)
        # the trainer's loss is its own CE plus 0.3 x NTL
        expected = float(ref["ce_mean"]) + 0.3 * float(ref["ntl_mean"])
        assert log["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        # completion-only: the digit targets are exactly the digits of the completions
        want = sum(n_digits(completion_of(tok, batch, rows, b)["answer"])
                   for b in range(batch["input_ids"].shape[0]))
        assert ref["n"] == want
        assert "entropy" in log and "mean_token_accuracy" in log  # TRL's own metrics stay


def test_update_is_ce_update_plus_ntl_gradient(tmp_path):
    """theta(w) - theta(0) after one step == -lr * w * grad(mean NTL over the window's digits)."""
    rows = gsm8k_rows(2)
    w = 0.7
    tr0, tok = make(tmp_path / "a", prompt_completion(rows), weight=0.0)
    rec0, snaps0 = record(tr0)
    tr0.train()
    trw, _ = make(tmp_path / "b", prompt_completion(rows), weight=w)
    recw, _ = record(trw)
    trw.train()
    assert torch.equal(rec0.batches[0]["input_ids"], recw.batches[0]["input_ids"])
    ref_model = fresh_model(tok, snaps0.states[0])
    ref = reference(ref_model, [rec0.batches[0]], tok, requires_grad=True)
    g = grads_of(ref_model, ref["ntl_mean"])
    p0, pw = params(tr0.model), params(trw.model)
    moved = 0.0
    for name, g_ntl in g.items():
        torch.testing.assert_close(pw[name] - p0[name], -LR * w * g_ntl, rtol=1e-4, atol=2e-6)
        moved = max(moved, float((pw[name] - p0[name]).abs().max()))
    assert moved > 1e-3  # NTL did move the parameters


def test_weight_zero_is_bit_identical_to_plain_sft(tmp_path):
    rows = gsm8k_rows(4)
    plain, _ = make(tmp_path / "a", prompt_completion(rows), cls=trl.SFTTrainer, max_steps=2)
    plain.train()
    zero, _ = make(tmp_path / "b", prompt_completion(rows), weight=0.0, max_steps=2)
    zero.train()
    p, z = params(plain.model), params(zero.model)
    assert p.keys() == z.keys()
    assert all(torch.equal(p[k], z[k]) for k in p)
    assert [h["loss"] for h in step_logs(plain)] == [h["loss"] for h in step_logs(zero)]
    assert all(h["ntl/total_digits"] > 0 for h in step_logs(zero))  # metrics still logged


# -- gradient accumulation ---------------------------------------------------------------------
def test_accumulation_1x4_equals_4x1_with_uneven_digit_counts(tmp_path):
    rows = [*gsm8k_rows(3, skip=1), {"question": "Say hello.", "answer": "Hello there, friend."}]
    ds = prompt_completion(rows)
    counts = [n_digits(r["answer"]) for r in rows]
    assert len(set(counts)) == 4 and 0 in counts  # uneven, one micro-batch without digits
    one, tok = make(tmp_path / "a", ds, weight=1.0, per_device_train_batch_size=4)
    _, snaps = record(one)
    one.train()
    four, _ = make(tmp_path / "b", ds, weight=1.0, per_device_train_batch_size=1,
                   gradient_accumulation_steps=4)
    rec4, _ = record(four)
    four.train()
    ref = reference(fresh_model(tok, snaps.states[0]), rec4.batches[:4], tok)
    # the window mean differs from the mean of per-micro-batch means (so the test can fail)
    assert sorted(ref["ns"]) == sorted(counts)
    per_mb = [s / c for s, c in zip(ref["ntl_sums"], ref["ns"], strict=True) if c]
    assert abs(sum(per_mb) / 4 - float(ref["ntl_mean"])) > 0.05 * float(ref["ntl_mean"])
    p1, p4 = params(one.model), params(four.model)
    for k in p1:
        torch.testing.assert_close(p4[k], p1[k], rtol=1e-4, atol=1e-6)
    (l1,), (l4,) = step_logs(one), step_logs(four)
    assert l1["ntl/total_digits"] == l4["ntl/total_digits"] == ref["n"] == sum(counts)
    assert l1["ntl/loss"] == pytest.approx(l4["ntl/loss"], rel=1e-5)
    assert l4["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4)


# -- masks ---------------------------------------------------------------------------------------
def test_prompt_digits_count_only_without_completion_only_loss(tmp_path):
    rows = gsm8k_rows(2)
    assert all(n_digits(r["question"]) > 0 for r in rows)
    tr, tok = make(tmp_path, prompt_completion(rows), completion_only_loss=False)
    rec, snaps = record(tr)
    tr.train()
    (log,) = step_logs(tr)
    batch = rec.batches[0]
    want = sum(n_digits(r["question"]) + n_digits(r["answer"]) for r in rows)
    assert log["ntl/total_digits"] == want
    ref = reference(fresh_model(tok, snaps.states[0]), [batch], tok)
    assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4)


def test_assistant_only_loss_excludes_user_digits(tmp_path):
    import copy

    rows = gsm8k_rows(2)
    tok = copy.deepcopy(tokenizer())  # TRL sets the chat template on the tokenizer
    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5_training.jinja")
    args = sft_args(tmp_path, assistant_only_loss=True, chat_template_path=path)
    tr = NTLSFTTrainer(model=tiny_qwen(tok), args=args, train_dataset=conversations(rows),
                       processing_class=tok, ntl_config=NTLSFTConfig(0.3))
    rec, snaps = record(tr)
    tr.train()
    (log,) = step_logs(tr)
    assert log["ntl/total_digits"] == sum(n_digits(r["answer"]) for r in rows)  # not the questions'
    ref = reference(fresh_model(tok, snaps.states[0]), [rec.batches[0]], tok)
    assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4)


# -- other trainer paths ----------------------------------------------------------------------
def test_evaluation_logs_eval_ntl_and_adds_it_to_eval_loss(tmp_path):
    """SFT's prediction_step asks compute_loss for outputs, which re-runs the batch without
    gradient for the logits: that second forward is not scored again."""
    rows = gsm8k_rows(3)
    tr, tok = make(tmp_path, prompt_completion(rows[:1]), weight=0.5, per_device_eval_batch_size=3)
    metrics = tr.evaluate(prompt_completion(rows))
    batch = tr.data_collator(_prepared(tr, rows))  # the eval batch, rebuilt
    ref = reference(fresh_model(tok, tr.model.state_dict()), [batch], tok)
    assert metrics["eval_ntl/total_digits"] == ref["n"] == sum(n_digits(r["answer"]) for r in rows)
    assert metrics["eval_ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(float(ref["ce_mean"]) + 0.5 * float(ref["ntl_mean"]),
                                                 rel=1e-5)


def _prepared(tr, rows):
    ds = tr._prepare_dataset(prompt_completion(rows), tr.processing_class, tr.args, False, None, "ref")
    return [ds[i] for i in range(len(ds))]


def test_evaluation_batch_without_digit_targets_is_ce_only(tmp_path):
    """An evaluation batch whose completions hold no digit: NTL adds nothing (no 0 / 0), the
    eval loss is the CE alone and no eval_ntl/loss is logged."""
    rows = [{"question": "Say hello.", "answer": "Hello there, friend."},
            {"question": "Greet me.", "answer": "Hi, how are you?"}]
    tr, tok = make(tmp_path, prompt_completion(rows), weight=0.5, per_device_eval_batch_size=2)
    metrics = tr.evaluate(prompt_completion(rows))
    batch = tr.data_collator(_prepared(tr, rows))  # the eval batch, rebuilt
    ref = reference(fresh_model(tok, tr.model.state_dict()), [batch], tok)
    assert ref["n"] == 0 and ref["tokens"] > 0
    assert metrics["eval_ntl/total_digits"] == 0 and "eval_ntl/loss" not in metrics
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_loss"] == pytest.approx(float(ref["ce_mean"]), rel=1e-5)


def test_training_step_outside_the_loop_with_accumulation(tmp_path):
    """training_step called outside ``train()`` (no window counted) with G = 2 accumulation steps:
    each micro-batch adds (CE + w NTL, both its own means) / G to the gradient, as a
    per-micro-batch CE does; the reference sums those gradients from the full logits."""
    rows = gsm8k_rows(2)
    w, G = 2.0, 2
    tr, tok = make(tmp_path, prompt_completion(rows), weight=w, gradient_accumulation_steps=G)
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    tr.current_gradient_accumulation_steps = G  # as train() sets it for a full window
    batches = [tr.data_collator([r]) for r in _prepared(tr, rows)]
    ref_model = fresh_model(tok, tr.model.state_dict())
    tr.model.zero_grad()
    for batch in batches:
        tr.training_step(tr.model, {k: v.clone() for k, v in batch.items()})
    got = {k: p.grad.detach().clone() for k, p in tr.model.named_parameters()}
    ce = ntl_ = torch.zeros(())
    for batch in batches:
        ref = reference(ref_model, [batch], tok, requires_grad=True)
        assert ref["n"] > 0
        ce, ntl_ = ce + ref["ce_mean"] / G, ntl_ + ref["ntl_mean"] / G
    names, ps = zip(*ref_model.named_parameters(), strict=True)
    g_want = torch.autograd.grad(ce + w * ntl_, ps, retain_graph=True, allow_unused=True)
    g_ntl = torch.autograd.grad(ntl_, ps, allow_unused=True)
    for name, p, g in zip(names, ps, g_want, strict=True):
        torch.testing.assert_close(got[name], torch.zeros_like(p) if g is None else g,
                                   rtol=1e-4, atol=2e-6)
    # the NTL part is large: a term G times too large (or too small) is far outside the tolerance
    assert max(float((w * (G - 1) * g).abs().max()) for g in g_ntl if g is not None) > 1e-2


def test_label_smoothing_path_scores_the_gradient_forward_once(tmp_path):
    """label_smoothing_factor > 0: TRL runs a full-logits forward with gradient, then a fused
    one without for its metrics; NTL comes from the first, once."""
    rows = gsm8k_rows(2)
    tr, tok = make(tmp_path, prompt_completion(rows), label_smoothing_factor=0.1)  # TRL: deprecated
    rec, snaps = record(tr)
    tr.train()
    (log,) = step_logs(tr)
    ref = reference(fresh_model(tok, snaps.states[0]), [rec.batches[0]], tok)
    assert log["ntl/total_digits"] == ref["n"]
    assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4)


def test_padding_free_packing(tmp_path):
    """packing='bfd' flattens the batch into one row (position_ids restart per sequence, the
    label at each restart is -100): NTL sees the same positions as the CE."""
    rows = gsm8k_rows(4)
    tr, tok = make(tmp_path, prompt_completion(rows), packing=True, max_length=512,
                   per_device_train_batch_size=2)
    rec, snaps = record(tr)
    tr.train()
    (log,) = step_logs(tr)
    batch = rec.batches[0]
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    # reference: each packed sequence on its own (its first label is -100: nothing crosses)
    cu = batch["cu_seq_lens_q"].tolist()
    assert len(cu) == len(rows) + 1
    docs = [{"input_ids": batch["input_ids"][:, a:b], "labels": batch["labels"][:, a:b]}
            for a, b in itertools.pairwise(cu)]
    ref = reference(fresh_model(tok, snaps.states[0]), docs, tok)
    assert log["ntl/total_digits"] == ref["n"] == sum(n_digits(r["answer"]) for r in rows)
    assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-5)


# -- refusals and warnings ------------------------------------------------------------------
def test_no_digit_targets_warns_once(tmp_path, caplog):
    rows = [{"question": "Say hello.", "answer": "Hello there."}, {"question": "Greet.", "answer": "Hi!"}]
    tr, _ = make(tmp_path, prompt_completion(rows))
    with caplog.at_level(logging.WARNING, logger="ntl"):
        tr.train()
    msgs = [r.getMessage() for r in caplog.records if r.name == "ntl"]
    assert len(msgs) == 1 and "no supervised digit token" in msgs[0]
    (log,) = step_logs(tr)
    assert log["ntl/total_digits"] == 0 and "ntl/loss" not in log


def test_refusals(tmp_path):
    rows = gsm8k_rows(1)
    ds = prompt_completion(rows)
    tok = tokenizer()
    with pytest.raises(TypeError, match="NTLSFTConfig"):
        NTLSFTTrainer(model=tiny_qwen(tok), args=sft_args(tmp_path), train_dataset=ds,
                      processing_class=tok, ntl_config=NTLConfig())
    with pytest.raises(ValueError, match="NTLCallback"):
        NTLSFTTrainer(model=tiny_qwen(tok), args=sft_args(tmp_path), train_dataset=ds,
                      processing_class=tok, callbacks=[NTLCallback(0.1)])
    # a ZeRO-3-partitioned head (stand-in: the 0-element weight with a ds_id)
    model = tiny_qwen(tok, tied=False)
    model.lm_head.weight.ds_id = 7  # pyright: ignore[reportAttributeAccessIssue] (deepspeed's tag)
    with pytest.raises(ValueError, match="ZeRO-3"):
        NTLSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="ntl_weight"):
        NTLSFTConfig(ntl_weight=-1.0)
    with pytest.raises(ValueError, match="ntl_method"):
        NTLSFTConfig(ntl_method="l1")


def test_tokenizer_without_digit_tokens_is_refused(tmp_path):
    from trl_tiny import char_tokenizer

    tok = char_tokenizer(chars="abcdefgh ?\n")
    ds = prompt_completion([{"question": "abc?", "answer": "def"}])
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id))
    with pytest.raises(ValueError, match="digit"):
        NTLSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=ds, processing_class=tok)


def test_prompt_tuning_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tokenizer()
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    with pytest.raises(ValueError, match="prompt learning"):
        NTLSFTTrainer(model=tiny_qwen(tok), args=sft_args(tmp_path),
                      train_dataset=prompt_completion(gsm8k_rows(1)), processing_class=tok,
                      peft_config=cfg)


def test_lora_adapter(tmp_path):
    """PEFT LoRA (B = 0 at the start, so the first step's forward is the base model's)."""
    peft = pytest.importorskip("peft")
    rows = gsm8k_rows(2)
    tok = tokenizer()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tr = NTLSFTTrainer(model=tiny_qwen(tok), args=sft_args(tmp_path), train_dataset=prompt_completion(rows),
                       processing_class=tok, peft_config=cfg, ntl_config=NTLSFTConfig(0.3))
    rec, _ = record(tr)
    tr.train()
    (log,) = step_logs(tr)
    ref = reference(fresh_model(tok, tiny_qwen(tok).state_dict()), [rec.batches[0]], tok)
    assert log["ntl/total_digits"] == ref["n"] > 0
    assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4)


# -- the capture options the SFT mixin uses ---------------------------------------------------
def _capture_setup():
    from ntl_trl._capture import HiddenNTLCapture
    from ntl_trl._common import resolve_model_vocab
    from ntl_trl._model import find_lm_parts
    from trl_tiny import char_tokenizer, tiny_qwen2

    from ntl.logit_transform import LogitTransform

    tok = char_tokenizer()
    model = tiny_qwen2(tok)
    parts = find_lm_parts(model)
    cap = HiddenNTLCapture(parts, resolve_model_vocab(tok, parts.vocab_size), method="wasserstein")
    ids = tok(["12+30=42", "9-4=5 ok"], return_tensors="pt", padding=True).input_ids
    return model, cap, ids, LogitTransform()


def test_capture_seq_len_and_repeats():
    model, cap, ids, f = _capture_setup()
    targets = ids[:, 1:]
    # repeats="skip": a no-grad re-run of the scored batch is ignored, the sum is the first's
    cap.arm(targets, start=0, transform=f, seq_len=ids.shape[1], repeats="skip")
    model(input_ids=ids)
    first = cap._plan["loss"][0].detach().clone()
    with torch.no_grad():
        model(input_ids=ids)
    res = cap.disarm()
    assert res.forwards == 1 and float(res.sums[0]) > 0
    torch.testing.assert_close(res.loss_sum.detach(), first)
    # a re-run *with* gradient is still an error, and so is the default
    for repeats, grad in (("skip", True), ("error", False)):
        cap.arm(targets, start=0, transform=f, repeats=repeats)
        model(input_ids=ids)
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="rows are left"):
            model(input_ids=ids)
        cap.cancel()
    # seq_len: a forward with other positions (e.g. virtual tokens in front) is refused
    cap.arm(targets, start=0, transform=f, seq_len=ids.shape[1])
    with pytest.raises(RuntimeError, match="positions for labels of length"):
        model(input_ids=torch.cat([ids[:, :2], ids], 1))
    cap.cancel()
    with pytest.raises(ValueError, match="seq_len"):
        cap.arm(targets, start=0, transform=f, seq_len=2)
    with pytest.raises(ValueError, match="repeats"):
        cap.arm(targets, start=0, transform=f, repeats="ignore")
