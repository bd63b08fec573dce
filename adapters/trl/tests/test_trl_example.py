"""examples/trl/grpo_gsm8k_ntl.py --tiny: offline GRPO + NTL on the GSM8K parquet."""

import importlib.util
import json
import os

import pytest
from shared_data import DEFAULT_GSM8K_DIR, GSM8K_DIR

pytest.importorskip("trl.trainer.grpo_trainer")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SCRIPT = os.path.join(REPO, "examples", "trl", "grpo_gsm8k_ntl.py")


def _load():
    spec = importlib.util.spec_from_file_location("grpo_gsm8k_ntl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.usefixtures("gsm8k_dir")
def test_tiny_mode_runs_and_logs_ntl(tmp_path, capsys):
    mod = _load()
    assert mod.DEFAULT_DATA == DEFAULT_GSM8K_DIR
    rc = mod.main(["--tiny", "--max-steps", "2", "--train-size", "4", "--max-completion-length", "16",
                   "--output-dir", str(tmp_path), "--data-dir", GSM8K_DIR])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"step"')]
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["ntl/total_digits"] for r in rows) > 0
    assert all(r["ntl/loss"] is None or r["ntl/loss"] >= 0 for r in rows)


def test_normal_mode_needs_a_model_path():
    mod = _load()
    with pytest.raises(SystemExit):
        mod.parse_args([])
    with pytest.raises(FileNotFoundError, match="data-dir"):
        mod.load_gsm8k("/nonexistent", 2, conversational=True)


@pytest.mark.usefixtures("gsm8k_dir")
def test_normal_mode_with_a_local_model_directory(tmp_path, capsys):
    """The --model-path route (AutoModel/AutoTokenizer from a local folder, chat template),
    with a tiny Qwen2 saved next to Qwen2.5's real tokenizer instead of the 0.5B model."""
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
                   "--num-generations", "2", "--max-completion-length", "8",
                   "--output-dir", str(tmp_path / "out"), "--data-dir", GSM8K_DIR])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"step"')]
    assert [r["step"] for r in rows] == [1]
    assert "ntl/total_digits" in rows[0]
