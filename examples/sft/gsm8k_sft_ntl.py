#!/usr/bin/env python3
"""Supervised fine-tuning on GSM8K with the Number Token Loss (TRL 1.16 + ntl_trl).

The loss is the trainer's cross-entropy plus ``ntl_weight * NTL`` on the supervised digit
tokens (the completion: GSM8K's worked answer ending in ``#### N``), computed from the
backbone's hidden states of the trainer's own forward (``ntl_trl.NTLSFTTrainer``).

Modes:

* ``--tiny``: fully offline smoke run on CPU (< 1 min): a 2-layer Qwen2 built from a config
  with Qwen2.5's offline tokenizer (``ntl.tokenizers.qwen2_tokenizer``), plain-text
  prompt/completion rows, a few steps; prints the ``ntl/*`` metrics of every step and of an
  evaluation on test rows.
* default: a causal LM from a *local* directory (``--model-path``; nothing is downloaded),
  conversational prompt/completion rows through its chat template (the loss covers the
  assistant's answer only).

``--hf-trainer`` uses the plain ``transformers.Trainer`` recipe (``ntl_trl.NTLTrainer``)
on pre-tokenized rows instead of TRL.

Data: verl-format parquet files (``prompt`` = one user message, ``extra_info.answer`` = the
worked solution) in ``--data-dir`` (default: ``../shared/data/gsm8k`` next to the repository).

Examples::

    python examples/sft/gsm8k_sft_ntl.py --tiny
    python examples/sft/gsm8k_sft_ntl.py --model-path /models/Qwen2.5-0.5B-Instruct \\
        --max-steps 500 --ntl-weight 0.3 --batch-size 8 --grad-accum 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "gsm8k")
KEYS = ("loss", "ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence",
        "ntl/target_prob")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="offline CPU smoke run with a tiny model")
    p.add_argument("--model-path", help="local directory of the model (e.g. Qwen2.5-0.5B-Instruct)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="directory with train/test.parquet")
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--hf-trainer", action="store_true",
                   help="plain transformers.Trainer (ntl_trl.NTLTrainer) instead of TRL's SFTTrainer")
    p.add_argument("--max-steps", type=int, default=None, help="default: 3 (tiny), 500")
    p.add_argument("--train-size", type=int, default=None, help="rows of train.parquet (default: 16 tiny)")
    p.add_argument("--eval-size", type=int, default=None, help="rows of test.parquet (default: 2 tiny, 64)")
    p.add_argument("--ntl-weight", type=float, default=0.3)
    p.add_argument("--ntl-method", default="wasserstein", choices=["wasserstein", "mse"])
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: 2 tiny, 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--learning-rate", type=float, default=None, help="default: 1e-3 (tiny), 1e-5")
    p.add_argument("--max-length", type=int, default=1024, help="truncate sequences to this length")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.tiny and not args.model_path:
        p.error("give --model-path DIR (a local model directory) or --tiny")
    return args


def load_gsm8k(data_dir: str, split: str, n: int | None) -> list[dict[str, str]]:
    """``{split}.parquet`` -> ``[{"question": user message, "answer": worked answer}]``."""
    import pandas as pd

    path = os.path.join(data_dir, f"{split}.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; pass --data-dir (the verl-format GSM8K folder)")
    df = pd.read_parquet(path)
    if n is not None:
        df = df.iloc[:n]
    return [{"question": prompt[-1]["content"], "answer": extra["answer"]}
            for prompt, extra in zip(df["prompt"], df["extra_info"], strict=True)]


def sft_dataset(rows: list[dict[str, str]], conversational: bool):
    """Prompt/completion rows for TRL (completion-only loss is its default for them)."""
    from datasets import Dataset

    if conversational:
        return Dataset.from_dict({
            "prompt": [[{"role": "user", "content": r["question"]}] for r in rows],
            "completion": [[{"role": "assistant", "content": r["answer"]}] for r in rows],
        })
    return Dataset.from_dict({"prompt": [r["question"] + "\n" for r in rows],
                              "completion": [r["answer"] for r in rows]})


def tokenized_dataset(tok, rows: list[dict[str, str]], conversational: bool, max_length: int):
    """For the plain Trainer: ``input_ids`` and ``labels`` (-100 on the prompt)."""
    from datasets import Dataset

    ids, labels = [], []
    for r in rows:
        if conversational:
            msgs = [{"role": "user", "content": r["question"]}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            p = tok(text, add_special_tokens=False).input_ids
        else:
            p = tok(r["question"] + "\n").input_ids
        c = [*tok(r["answer"], add_special_tokens=False).input_ids, tok.eos_token_id]
        ids.append((p + c)[:max_length])
        labels.append(([-100] * len(p) + c)[:max_length])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def tiny_model(tok, seed: int):
    """A 2-layer Qwen2 with Qwen2.5's padded vocabulary, built from a config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ntl.tokenizers import QWEN2_5_VOCAB_SIZE

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    ))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import tempfile

    import torch
    from ntl_trl import NTLSFTConfig

    t0 = time.time()
    tiny = args.tiny
    train_rows = load_gsm8k(args.data_dir, "train", args.train_size or (16 if tiny else None))
    eval_rows = load_gsm8k(args.data_dir, "test", args.eval_size or (2 if tiny else 64))
    if tiny:
        from ntl.tokenizers import qwen2_tokenizer

        tok = qwen2_tokenizer()
        model = tiny_model(tok, args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
    conversational = not tiny
    on_cpu = tiny or not torch.cuda.is_available()
    out = args.output_dir or tempfile.mkdtemp(prefix="gsm8k_sft_ntl_")
    common = dict(
        output_dir=out, use_cpu=on_cpu, bf16=not on_cpu, report_to=[] if tiny else "none",
        max_steps=args.max_steps or (3 if tiny else 500),
        per_device_train_batch_size=args.batch_size or (2 if tiny else 8),
        per_device_eval_batch_size=args.batch_size or (2 if tiny else 8),
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate or (1e-3 if tiny else 1e-5),
        logging_steps=1, save_strategy="no", seed=args.seed, disable_tqdm=tiny,
        gradient_checkpointing=not tiny,
    )
    ntl_config = NTLSFTConfig(ntl_weight=args.ntl_weight, ntl_method=args.ntl_method)
    if args.hf_trainer:
        from ntl_trl import NTLTrainer
        from transformers import DataCollatorForSeq2Seq, TrainingArguments

        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        trainer = NTLTrainer(
            model=model, args=TrainingArguments(**common), processing_class=tok,
            train_dataset=tokenized_dataset(tok, train_rows, conversational, args.max_length),
            eval_dataset=tokenized_dataset(tok, eval_rows, conversational, args.max_length),
            data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
            ntl_config=ntl_config,
        )
    else:
        from ntl_trl import NTLSFTTrainer
        from trl import SFTConfig

        trainer = NTLSFTTrainer(
            model=model, args=SFTConfig(**common, max_length=args.max_length, dataset_num_proc=None),
            processing_class=tok, train_dataset=sft_dataset(train_rows, conversational),
            eval_dataset=sft_dataset(eval_rows, conversational), ntl_config=ntl_config,
        )
    trainer.train()
    for h in trainer.state.log_history:
        if "step" in h and "loss" in h:
            print(json.dumps({"step": h["step"], **{k: h.get(k) for k in KEYS}}))
    metrics = trainer.evaluate()
    print(json.dumps({"eval": {k: metrics.get(f"eval_{k}") for k in KEYS}}))
    print(f"done in {time.time() - t0:.1f}s; output in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
