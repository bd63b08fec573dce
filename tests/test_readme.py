"""The README's Python blocks run as documented (offline: a tiny Qwen2 built from a config,
``ntl.tokenizers.qwen2_tokenizer()`` for ``AutoTokenizer.from_pretrained(...)``).

Every ```python block of README.md must be one this file knows how to run: a new block fails
``test_every_python_block_is_run`` until a runner is added here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from toy_tokenizers import char_tokenizer  # tests/support

ROOT = Path(__file__).resolve().parents[1]
FROM_PRETRAINED = re.compile(r"AutoTokenizer\.from_pretrained\([^)]*\)")


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def block(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"README.md has {len(found)} python blocks with {marker!r}"
    return found[0]


MARKERS = {"quick start": "ntl.cross_entropy_with_ntl(logits, targets, tok", "trl": "NTLGRPOTrainer(",
           "sft": "NTLSFTTrainer("}


def test_every_python_block_is_run():
    blocks = python_blocks()
    assert blocks, "README.md has no python block"
    for b in blocks:
        assert any(m in b for m in MARKERS.values()), (
            f"tests/test_readme.py does not run this README block; add a runner:\n{b}")


def test_documented_submodules_after_import_ntl():
    """``import ntl`` alone, in a fresh interpreter, makes the documented spellings work."""
    code = ("import ntl; tok = ntl.tokenizers.qwen2_tokenizer(); "
            "assert ntl.answers.extract_answer('so #### 42').text == '42'; "
            "assert callable(ntl.targets.build_digit_targets) and callable(ntl.rewards.compute_score); "
            "print(len(tok))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "151665"


def tiny_qwen2(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def test_quick_start(qwen_tok):
    import ntl
    from ntl.tokenizers import QWEN2_5_VOCAB_SIZE

    src = block(MARKERS["quick start"])
    assert FROM_PRETRAINED.search(src)
    src = FROM_PRETRAINED.sub("ntl.tokenizers.qwen2_tokenizer()", src)
    model = tiny_qwen2(QWEN2_5_VOCAB_SIZE)  # Qwen2.5's padded vocabulary, 151,936 logits
    input_ids = torch.tensor([qwen_tok.encode("add 12+30=42, 7*6=42 and 100-1=99")])
    ns = {"model": model, "input_ids": input_ids}
    exec(compile(src, "README.md (quick start)", "exec"), ns)

    logits, targets = ns["logits"], ns["targets"]
    assert logits.shape == (1, input_ids.shape[1], QWEN2_5_VOCAB_SIZE)
    # the shift by hand: position t is scored on token t+1, the last position on nothing
    assert targets[0, :-1].tolist() == input_ids[0, 1:].tolist() and targets[0, -1] == -100
    # NTL-W1 by hand: softmax over the ten digit logits, sum_k q_k |k - y|, mean over digit targets
    digit_ids = [qwen_tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    terms = []
    for t, y in enumerate(targets[0].tolist()):
        if y in digit_ids:
            q = torch.softmax(logits[0, t, digit_ids].double(), dim=-1)
            terms.append((q * (torch.arange(10.0, dtype=torch.float64) - digit_ids.index(y)).abs()).sum())
    assert len(terms) == sum(c.isdigit() for c in "add 12+30=42, 7*6=42 and 100-1=99")
    w1 = torch.stack(terms).mean()
    assert float(ns["loss_ntl"]) == pytest.approx(float(w1), rel=1e-5)
    ce = F.cross_entropy(logits[0].double(), targets[0], ignore_index=-100)
    assert float(ns["loss"]) == pytest.approx(float(ce + 0.3 * w1), rel=1e-5)
    ns["loss"].backward()  # the documented loss trains the model
    assert model.model.embed_tokens.weight.grad is not None
    assert isinstance(ntl.tokenizers.qwen2_tokenizer(), type(qwen_tok))


def _char_tokenizer():
    chars = "0123456789 #+-*=?.\nabcdefghijklmnopqrstuvwxyz"
    return char_tokenizer(["<pad>", "<eos>", "<unk>"], sorted(set(chars)), pad_token="<pad>",
                          eos_token="<eos>", unk_token="<unk>")


def test_trl_block(tmp_path):
    if importlib.util.find_spec("trl") is None:
        if os.environ.get("CI"):
            pytest.fail("trl is not installed (.venv has TRL 1.16: requirements/core.txt)")
        pytest.skip("needs trl (pip install -e '.[trl]')")
    from datasets import Dataset
    from trl import GRPOConfig

    from ntl.rewards import correctness_reward

    src = block(MARKERS["trl"])
    # the block's placeholders, filled with the tiny pieces below (names it uses as they are)
    for placeholder, value in (("model=...", "model=model"), ("reward_funcs=[...]", "reward_funcs=[reward]"),
                               ("GRPOConfig(...)", "GRPOConfig(**grpo_args)")):
        src = src.replace(placeholder, value)
    assert "..." not in src, f"unfilled placeholder in\n{src}"
    tok = _char_tokenizer()
    ns = {
        "GRPOConfig": GRPOConfig,
        "model": tiny_qwen2((len(tok) + 7) // 8 * 8),
        "reward": correctness_reward,
        "tok": tok,
        "ds": Dataset.from_dict({"prompt": ["12+30=", "7*6=", "9-4=", "8*2="],
                                 "ground_truth": ["42", "42", "5", "16"]}),
        "grpo_args": dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                          max_completion_length=6, num_generations=4, per_device_train_batch_size=4,
                          max_steps=1, logging_steps=1, save_strategy="no", seed=0,
                          disable_tqdm=True, beta=0.0),
    }
    exec(compile(src, "README.md (TRL)", "exec"), ns)
    trainer = ns["trainer"]
    cfg = trainer.ntl_config
    assert (cfg.ntl_weight, cfg.ntl_method, cfg.ntl_labels, cfg.answer_column) == (
        0.1, "wasserstein", "final_answer", "ground_truth")
    trainer.train()
    logged = [k for row in trainer.state.log_history for k in row]
    assert "ntl/total_digits" in logged, logged


def test_sft_block(tmp_path):
    if importlib.util.find_spec("trl") is None:
        if os.environ.get("CI"):
            pytest.fail("trl is not installed (.venv has TRL 1.16: requirements/core.txt)")
        pytest.skip("needs trl (pip install -e '.[trl]')")
    from datasets import Dataset
    from trl import SFTConfig

    src = block(MARKERS["sft"]).replace("SFTConfig(...)", "SFTConfig(**sft_args)")
    assert "..." not in src.split("#")[0], f"unfilled placeholder in\n{src}"
    tok = _char_tokenizer()
    ns = {
        "SFTConfig": SFTConfig,
        "model": tiny_qwen2((len(tok) + 7) // 8 * 8),
        "tok": tok,
        "ds": Dataset.from_dict({"prompt": ["12+30=", "7*6=", "9-4=", "8*2="],
                                 "completion": ["42", "42", "5", "16"]}),
        "sft_args": dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                         per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                         save_strategy="no", seed=0, disable_tqdm=True),
    }
    exec(compile(src, "README.md (SFT)", "exec"), ns)
    trainer = ns["trainer"]
    assert (trainer.ntl_config.ntl_weight, trainer.ntl_config.ntl_method) == (0.3, "wasserstein")
    trainer.train()
    rows = [row for row in trainer.state.log_history if "ntl/total_digits" in row]
    # completion digits only: "42", "42", "5", "16"
    assert rows and rows[0]["ntl/total_digits"] == 7, trainer.state.log_history
