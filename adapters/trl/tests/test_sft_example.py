"""examples/sft/gsm8k_sft_ntl.py: --tiny (TRL and plain-Trainer routes) and --model-path."""

import importlib.util
import json
import os

import pytest
from sft_tiny import DEFAULT_GSM8K_DIR, GSM8K_DIR, REPO, needs_gsm8k

pytest.importorskip("trl")

SCRIPT = os.path.join(REPO, "examples", "sft", "gsm8k_sft_ntl.py")


def _load():
    spec = importlib.util.spec_from_file_location("gsm8k_sft_ntl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _printed(out: str) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"step"')]
    (ev,) = [json.loads(line)["eval"] for line in out.splitlines() if line.startswith('{"eval"')]
    return rows, ev


@needs_gsm8k
@pytest.mark.parametrize("route", ["sft", "hf"])
def test_tiny_mode_runs_and_prints_ntl_metrics(tmp_path, capsys, route):
    mod = _load()
    assert mod.DEFAULT_DATA == DEFAULT_GSM8K_DIR
    argv = ["--tiny", "--max-steps", "2", "--train-size", "4", "--eval-size", "2",
            "--output-dir", str(tmp_path), "--data-dir", GSM8K_DIR] + (["--hf-trainer"] if route == "hf" else [])
    assert mod.main(argv) == 0
    rows, ev = _printed(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [1, 2]
    # GSM8K answers are full of digits; every step trains on some, with a positive NTL
    assert all(r["ntl/total_digits"] > 0 and r["ntl/loss"] > 0 for r in rows)
    assert all(0 <= r["ntl/digit_accuracy"] <= 1 for r in rows)
    assert ev["ntl/total_digits"] > 0 and ev["ntl/loss"] > 0 and ev["loss"] > ev["ntl/loss"] * 0.3


def test_normal_mode_needs_a_model_path():
    mod = _load()
    with pytest.raises(SystemExit):
        mod.parse_args([])
    with pytest.raises(FileNotFoundError, match="data-dir"):
        mod.load_gsm8k("/nonexistent", "train", 2)


@needs_gsm8k
def test_normal_mode_with_a_local_model_directory(tmp_path, capsys):
    """The --model-path route (AutoModel/AutoTokenizer from a local folder, chat template,
    conversational prompt/completion), with a tiny Qwen2 saved next to Qwen2.5's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ntl.tokenizers import qwen2_tokenizer

    tok = qwen2_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    mod = _load()
    rc = mod.main(["--model-path", str(tmp_path / "model"), "--max-steps", "1", "--train-size", "2",
                   "--eval-size", "2", "--batch-size", "2", "--output-dir", str(tmp_path / "out"),
                   "--data-dir", GSM8K_DIR])
    assert rc == 0
    rows, ev = _printed(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["ntl/total_digits"] > 0 and ev["ntl/total_digits"] > 0
