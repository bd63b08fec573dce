#!/usr/bin/env python3
"""GRPO on GSM8K with the Number Token Loss (TRL 1.16 + ntl_trl).

Two modes:

* ``--tiny``: fully offline smoke run on CPU (< 1 min): a 2-layer Qwen2 built from a
  config and a character-level tokenizer built from the data's characters (digits are
  single tokens), a few GRPO steps with NTL; prints the ``ntl/*`` metrics.
* default: Qwen2.5-0.5B-Instruct (or any causal LM) from a *local* directory
  (``--model-path``; nothing is downloaded), conversational prompts through the model's
  chat template.

Data: verl-format parquet files (``prompt`` = one user message, ``reward_model.ground_truth``)
in ``--data-dir`` (default: ``../shared/data/gsm8k`` next to the repository).

Examples::

    python examples/trl/grpo_gsm8k_ntl.py --tiny
    python examples/trl/grpo_gsm8k_ntl.py --model-path /models/Qwen2.5-0.5B-Instruct \\
        --max-steps 200 --ntl-weight 0.1 --ntl-labels final_answer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "gsm8k")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="offline CPU smoke run with a tiny model")
    p.add_argument("--model-path", help="local directory of the model (e.g. Qwen2.5-0.5B-Instruct)")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="directory with train.parquet")
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--max-steps", type=int, default=None, help="default: 3 (tiny), 500")
    p.add_argument("--train-size", type=int, default=None, help="rows of train.parquet to use")
    p.add_argument("--ntl-weight", type=float, default=0.1)
    p.add_argument("--ntl-method", default="wasserstein", choices=["wasserstein", "mse"])
    p.add_argument("--ntl-labels", default=None, choices=["final_answer", "all"],
                   help="default: final_answer; with --tiny: all over every completion (an "
                        "untrained tiny model never writes a correct '#### N')")
    p.add_argument("--all-completions", action="store_true",
                   help="with --ntl-labels all: every completion, not only correct ones")
    p.add_argument("--callback", action="store_true",
                   help="use NTLCallback on a plain GRPOTrainer instead of NTLGRPOTrainer "
                        "(implies all labels over every completion, normalised per micro-batch)")
    p.add_argument("--num-generations", type=int, default=None, help="default: 4 (tiny), 8")
    p.add_argument("--max-completion-length", type=int, default=None, help="default: 24 (tiny), 512")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (completions)")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.tiny and not args.model_path:
        p.error("give --model-path DIR (a local model directory) or --tiny")
    if args.ntl_labels is None:
        args.ntl_labels = "all" if args.tiny else "final_answer"
        args.all_completions = args.all_completions or args.tiny
    return args


def load_gsm8k(data_dir: str, n: int | None, conversational: bool):
    """train.parquet -> datasets.Dataset with ``prompt`` and ``ground_truth`` columns."""
    import pandas as pd
    from datasets import Dataset

    path = os.path.join(data_dir, "train.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; pass --data-dir (the verl-format GSM8K folder)")
    df = pd.read_parquet(path)
    if n is not None:
        df = df.iloc[:n]
    msgs = [[{"role": m["role"], "content": m["content"]} for m in p] for p in df["prompt"]]
    prompts = msgs if conversational else [m[-1]["content"] for m in msgs]
    truths = [str(r["ground_truth"]) for r in df["reward_model"]]
    return Dataset.from_dict({"prompt": prompts, "ground_truth": truths})


def tiny_model_and_tokenizer(texts: list[str], seed: int):
    """Character-level tokenizer over ``texts`` and a 2-layer Qwen2 built from a config."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chars = sorted(set("".join(texts)) | set("0123456789#"))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    return Qwen2ForCausalLM(cfg), tok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import tempfile

    import torch
    from ntl_trl import NTLCallback, NTLConfig, NTLGRPOTrainer
    from ntl_trl.rewards import correctness_reward, proximity_reward
    from trl import GRPOConfig, GRPOTrainer

    t0 = time.time()
    tiny = args.tiny
    ds = load_gsm8k(args.data_dir, args.train_size or (16 if tiny else None), conversational=not tiny)
    if tiny:
        model, tok = tiny_model_and_tokenizer(list(ds["prompt"]) + list(ds["ground_truth"]), args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
        tok.padding_side = "left"

    on_cpu = tiny or not torch.cuda.is_available()
    out = args.output_dir or tempfile.mkdtemp(prefix="grpo_gsm8k_ntl_")
    num_gen = args.num_generations or (4 if tiny else 8)
    cfg = GRPOConfig(
        output_dir=out, use_cpu=on_cpu, bf16=not on_cpu, report_to=[] if tiny else "none",
        max_steps=args.max_steps or (3 if tiny else 500),
        per_device_train_batch_size=args.batch_size or num_gen,
        num_generations=num_gen,
        max_completion_length=args.max_completion_length or (24 if tiny else 512),
        learning_rate=args.learning_rate or (1e-3 if tiny else 1e-6),
        temperature=args.temperature, beta=0.0, logging_steps=1, save_strategy="no",
        seed=args.seed, disable_tqdm=tiny, gradient_checkpointing=not tiny,
    )
    rewards = [correctness_reward, proximity_reward]
    if args.callback:
        trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=cfg, train_dataset=ds,
                              processing_class=tok,
                              callbacks=[NTLCallback(args.ntl_weight, args.ntl_method)])
    else:
        ntl_cfg = NTLConfig(ntl_weight=args.ntl_weight, ntl_method=args.ntl_method,
                            ntl_labels=args.ntl_labels, answer_column="ground_truth",
                            correct_only=not args.all_completions)
        trainer = NTLGRPOTrainer(model=model, reward_funcs=rewards, args=cfg, train_dataset=ds,
                                 processing_class=tok, ntl_config=ntl_cfg)
    trainer.train()
    keys = ("reward", "ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence",
            "ntl/answer_rate")
    for h in trainer.state.log_history:
        if "step" in h and any(k in h for k in keys):
            print(json.dumps({"step": h["step"], **{k: h.get(k) for k in keys}}))
    print(f"done in {time.time() - t0:.1f}s; output in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
