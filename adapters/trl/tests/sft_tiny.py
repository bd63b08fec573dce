"""Tiny offline pieces for the SFT tests: Qwen2.5's offline tokenizer, a Qwen2 built from a
config with Qwen2.5's padded vocabulary, GSM8K rows (tests/support/shared_data.py), recorders of
the trainer's batches and parameters, and the independent full-logits reference."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

import ntl
from ntl.tokenizers import QWEN2_5_VOCAB_SIZE, qwen2_tokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
if os.path.join(REPO, "tests", "support") not in sys.path:  # also in subprocesses importing this
    sys.path.append(os.path.join(REPO, "tests", "support"))
from shared_data import DEFAULT_GSM8K_DIR, GSM8K_DIR, gsm8k_file  # noqa: E402, F401

#: The ``gsm8k_dir`` fixture (tests/support/shared_data.py): the GSM8K files, or a skip (a failure in CI).
needs_gsm8k = pytest.mark.usefixtures("gsm8k_dir")
DIGITS = "0123456789"


def tokenizer():
    """Qwen2.5's tokenizer (cached; shared, so tests must not modify it)."""
    return qwen2_tokenizer()


def digit_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids(d) for d in DIGITS]


def tiny_qwen(tok, seed: int = 0, hidden: int = 16, tied: bool = True) -> Qwen2ForCausalLM:
    """A 1-layer Qwen2 with Qwen2.5's padded vocabulary (151,936 rows)."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=1024, tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    ))


def gsm8k_rows(n: int, skip: int = 0) -> list[dict[str, str]]:
    """The ``n`` shortest (question + answer) GSM8K rows among the first 400 of train.parquet,
    after skipping the ``skip`` shortest; ``{"question", "answer"}`` (answers end in ``#### N``)."""
    import pandas as pd

    df = pd.read_parquet(gsm8k_file("train")).iloc[:400]
    rows = sorted(df["extra_info"], key=lambda e: (len(e["question"]) + len(e["answer"]), e["index"]))
    return [{"question": e["question"], "answer": e["answer"]} for e in rows[skip : skip + n]]


def prompt_completion(rows: list[dict[str, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [r["question"] + "\n" for r in rows],
                              "completion": [r["answer"] for r in rows]})


def conversations(rows: list[dict[str, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"messages": [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in rows
    ]})


def n_digits(text: str) -> int:
    """Digit tokens of ``text`` under Qwen2.5's tokenizer (its pre-tokenizer splits every digit)."""
    return sum(c in DIGITS for c in text)


class RecordingCollator:
    """Wraps a data collator and keeps a copy of every batch it builds, in order."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        return batch


class Snapshots(TrainerCallback):
    """The model's state at the start of every optimizer step (before its first micro-batch)."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def record(trainer) -> tuple[RecordingCollator, Snapshots]:
    """Attach a batch recorder and a parameter snapshot callback to ``trainer`` (before ``train``)."""
    rec = RecordingCollator(trainer.data_collator)
    trainer.data_collator = rec
    snaps = Snapshots()
    trainer.add_callback(snaps)
    return rec, snaps


def fresh_model(tok, state: dict[str, torch.Tensor], tied: bool = True) -> Qwen2ForCausalLM:
    """An unpatched Qwen2 (no TRL fused head) holding ``state``; no KV cache, as in training
    (with a cache, transformers does not turn packed ``position_ids`` into a block mask)."""
    m = tiny_qwen(tok, tied=tied)
    m.load_state_dict(state)
    m.config.use_cache = False
    return m


def model_inputs(batch: dict) -> dict:
    """Everything the collator built but the labels (padding-free batches carry ``position_ids``
    and the varlen ``cu_seq_lens_*`` / ``max_length_*`` / ``seq_idx`` kwargs)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "shift_labels") and v is not None}


def reference(model, batches: list[dict], tok, method: str = "wasserstein",
              requires_grad: bool = False) -> dict:
    """Independent NTL, CE and digit metrics of the micro-batches of one window: the model's
    full logits ``[B, T, V]``, the causal shift by hand (``logits[:, :-1]`` score
    ``labels[:, 1:]``), :func:`ntl.ntl_loss` (the logits path) summed over the supervised
    digit positions, ``F.cross_entropy`` summed over the supervised positions; argmax and
    max probability over the ten digit columns by hand."""
    dig = torch.tensor(digit_ids(tok))
    out = {"ntl_sum": 0.0, "n": 0, "ce_sum": 0.0, "tokens": 0, "acc": 0.0, "conf": 0.0, "ntl_sums": [], "ns": []}
    with torch.set_grad_enabled(requires_grad):
        for batch in batches:
            logits = model(**model_inputs(batch)).logits.float()[:, :-1]
            labels = batch["labels"][:, 1:]
            s = ntl.ntl_loss(logits, labels, tok, method=method, reduction="sum", backend="torch")
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=-100, reduction="sum")
            is_digit = torch.isin(labels, dig)
            zd = logits.detach()[is_digit][:, dig]
            y = (labels[is_digit].unsqueeze(-1) == dig).float().argmax(-1)
            out["ntl_sum"] = out["ntl_sum"] + s
            out["ntl_sums"].append(float(s.detach()))
            out["ns"].append(int(is_digit.sum()))
            out["n"] += out["ns"][-1]
            out["ce_sum"] = out["ce_sum"] + ce
            out["tokens"] += int((labels != -100).sum())
            out["acc"] += float((zd.argmax(-1) == y).sum())
            out["conf"] += float(torch.softmax(zd, -1).max(-1).values.sum())
    n = max(out["n"], 1)
    out["ntl_mean"] = out["ntl_sum"] / n
    out["ce_mean"] = out["ce_sum"] / max(out["tokens"], 1)
    out["acc"] /= n
    out["conf"] /= n
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {k: (v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v))
            for k, v in model.named_parameters()}


def step_logs(trainer) -> list[dict]:
    """The per-step training logs (with ``loss``), in order."""
    return [h for h in trainer.state.log_history if "loss" in h and "step" in h]
