"""NTLTrainer: the plain ``transformers.Trainer`` recipe (no TRL), through ``trainer.train()``.

The model's own forward builds the logits and its ``ForCausalLMLoss`` is the CE; NTL comes from
the backbone's hidden state of that forward. Expected values come from the full logits
(``sft_tiny.reference``) at the parameters of each step, on the batches the collator built.
"""

import os
import sys
import textwrap

import pytest
import torch
from ntl_trl.config import NTLSFTConfig
from ntl_trl.supervised import NTLTrainer
from sft_tiny import (
    REPO,
    fresh_model,
    grads_of,
    gsm8k_rows,
    n_digits,
    needs_gsm8k,
    params,
    record,
    reference,
    step_logs,
    tiny_qwen,
    tokenizer,
)
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

pytestmark = needs_gsm8k
LR = 0.5


def tokenized(tok, rows):
    """input_ids = question + "\\n" + answer + EOS; labels -100 on the question."""
    from datasets import Dataset

    ids, labels = [], []
    for r in rows:
        p = tok(r["question"] + "\n").input_ids
        c = [*tok(r["answer"]).input_ids, tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def hf_args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], max_steps=1,
              per_device_train_batch_size=2, logging_steps=1, save_strategy="no", seed=0,
              optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
              weight_decay=0.0, disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def make(tmp_path, rows, weight=0.3, plain=False, **overrides):
    tok = tokenizer()
    kw = dict(model=tiny_qwen(tok), args=hf_args(tmp_path, **overrides),
              train_dataset=tokenized(tok, rows), processing_class=tok,
              data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    tr = Trainer(**kw) if plain else NTLTrainer(**kw, ntl_config=NTLSFTConfig(weight))
    return tr, tok


def test_logged_ntl_and_loss_equal_full_logit_reference_each_step(tmp_path):
    rows = gsm8k_rows(4)
    tr, tok = make(tmp_path, rows, weight=0.3, max_steps=2)
    rec, snaps = record(tr)
    tr.train()
    logs = step_logs(tr)
    assert len(logs) == 2
    for k, log in enumerate(logs):
        batch = rec.batches[k]
        ref = reference(fresh_model(tok, snaps.states[k]), [batch], tok)
        texts = [tok.decode(x) for x in batch["input_ids"]]
        want = sum(n_digits(r["answer"]) for r in rows if any(r["question"] in t for t in texts))
        assert log["ntl/total_digits"] == ref["n"] == want  # the question's digits are masked
        assert log["ntl/loss"] == pytest.approx(float(ref["ntl_mean"]), rel=1e-4, abs=1e-5)
        assert log["ntl/digit_accuracy"] == pytest.approx(ref["acc"], abs=1e-6)
        expected = float(ref["ce_mean"]) + 0.3 * float(ref["ntl_mean"])
        assert log["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_weight_zero_bit_identical_and_update_adds_ntl_gradient(tmp_path):
    rows = gsm8k_rows(2)
    plain, tok = make(tmp_path / "a", rows, plain=True)
    rec, snaps = record(plain)
    plain.train()
    zero, _ = make(tmp_path / "b", rows, weight=0.0)
    zero.train()
    w = 0.7
    ntl_tr, _ = make(tmp_path / "c", rows, weight=w)
    ntl_tr.train()
    p0, pz, pw = params(plain.model), params(zero.model), params(ntl_tr.model)
    assert all(torch.equal(p0[k], pz[k]) for k in p0)
    assert step_logs(plain)[0]["loss"] == step_logs(zero)[0]["loss"]
    assert step_logs(zero)[0]["ntl/total_digits"] > 0
    ref_model = fresh_model(tok, snaps.states[0])
    g = grads_of(ref_model, reference(ref_model, [rec.batches[0]], tok, requires_grad=True)["ntl_mean"])
    for name, g_ntl in g.items():
        torch.testing.assert_close(pw[name] - p0[name], -LR * w * g_ntl, rtol=1e-4, atol=2e-6)
    assert max(float((pw[k] - p0[k]).abs().max()) for k in pw) > 1e-3


def test_accumulation_1x4_equals_4x1(tmp_path):
    rows = [*gsm8k_rows(3, skip=1), {"question": "Say hello.", "answer": "Hello there, friend."}]
    assert len({n_digits(r["answer"]) for r in rows}) == 4
    one, _ = make(tmp_path / "a", rows, weight=1.0, per_device_train_batch_size=4)
    one.train()
    four, _ = make(tmp_path / "b", rows, weight=1.0, per_device_train_batch_size=1,
                   gradient_accumulation_steps=4)
    four.train()
    p1, p4 = params(one.model), params(four.model)
    for k in p1:
        torch.testing.assert_close(p4[k], p1[k], rtol=1e-4, atol=1e-6)
    (l1,), (l4,) = step_logs(one), step_logs(four)
    assert l1["ntl/total_digits"] == l4["ntl/total_digits"] == sum(n_digits(r["answer"]) for r in rows)
    assert l1["ntl/loss"] == pytest.approx(l4["ntl/loss"], rel=1e-5)


def test_recipe_needs_no_trl(tmp_path):
    """NTLTrainer with ``trl`` made unimportable: constructs, trains a step, logs ntl/*."""
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "trl" or name.startswith("trl."):
                    raise ImportError("trl is blocked in this test")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import pathlib
        import test_trl_hf_trainer as t
        tr, tok = t.make(pathlib.Path({str(tmp_path)!r}), t.gsm8k_rows(2))
        tr.train()
        assert "trl" not in sys.modules, "trl was imported"
        log = t.step_logs(tr)[0]
        assert log["ntl/total_digits"] > 0 and log["ntl/loss"] > 0
        print("OK", log["ntl/loss"])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(REPO, "src"), os.path.join(REPO, "adapters", "trl"), os.environ.get("PYTHONPATH", "")])}
    import ranks  # tests/support (conftest.py); not at module level: the child imports this file

    out = ranks.run_process([sys.executable, "-c", code], env=env, timeout=180)  # 9-22 s here
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_refusals(tmp_path):
    from ntl_trl import NTLConfig
    from transformers import Qwen2Model

    tok = tokenizer()
    ds = tokenized(tok, gsm8k_rows(1))
    backbone = tiny_qwen(tok).model  # a Qwen2Model: no LM head
    assert isinstance(backbone, Qwen2Model)
    with pytest.raises(TypeError, match="no causal LM head"):
        NTLTrainer(model=backbone, args=hf_args(tmp_path), train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        NTLTrainer(model=tiny_qwen(tok), args=hf_args(tmp_path), train_dataset=ds)
    with pytest.raises(TypeError, match="NTLSFTConfig"):
        NTLTrainer(model=tiny_qwen(tok), args=hf_args(tmp_path), train_dataset=ds,
                   processing_class=tok, ntl_config=NTLConfig())
