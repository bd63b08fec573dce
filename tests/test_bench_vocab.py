"""``ntl bench --tokenizer``: Llama-3's 1,110 number tokens (V = 128,256) next to Qwen2.5's digits.

CPU, tiny N, one timed run: checks what the run measures and reports (vocab, V, labels,
skips, the side-by-side ratios), never a timing.
"""

from __future__ import annotations

import json

import pytest
import torch

from ntl.bench.cases import make_labels
from ntl.bench.harness import main, parse_args

LLAMA3_V = 128_256
QWEN_V = 151_936


@pytest.fixture(scope="module")
def llama3_number_ids() -> set[int]:
    """Llama-3's number tokens read straight off its vocabulary (not through ntl): every token
    whose text is 1-3 ASCII digits ('0'..'999', '00', '007', ...)."""
    from ntl.tokenizers import llama3_tokenizer

    vocab = llama3_tokenizer().get_vocab()
    return {i for t, i in vocab.items() if t.isascii() and t.isdigit() and len(t) <= 3}


def test_llama3_number_ids_by_hand(llama3_number_ids):
    # 10 + 100 + 1000 digit strings of widths 1, 2, 3: each is one Llama-3 token
    assert len(llama3_number_ids) == 10 + 100 + 1000


def test_labels_hit_exactly_the_number_share(llama3_number_ids):
    """--digit-frac of the labels are number tokens of the vocab, the rest text or -100; with
    Llama-3's scattered number ids no text label may land on one."""
    ids = torch.tensor(sorted(llama3_number_ids))
    N = 4000
    lab = make_labels(N, LLAMA3_V, ids, digit_frac=0.2, ignore_frac=0.02, seed=3)
    is_num = torch.tensor([int(x) in llama3_number_ids for x in lab.tolist()])
    assert int(is_num.sum()) == 800 and int((lab == -100).sum()) == 80
    assert int(lab.max()) < LLAMA3_V
    from ntl.tokenizers import llama3_tokenizer

    texts = {i: t for t, i in llama3_tokenizer().get_vocab().items()}
    widths = {len(texts[int(x)]) for x in lab[is_num].tolist()}
    assert widths == {1, 2, 3}  # drawn over the whole number vocabulary, multi-digit tokens included


def test_qwen_labels_unchanged_by_hand():
    """The qwen2 default keeps its labels: text ids on a digit id move by exactly 10 K = 100
    (Qwen's digit ids 15..24; V = 200 so that some text draws hit them)."""
    digit_ids = torch.arange(15, 25)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 200, (500,), generator=g)
    hit = (text >= 15) & (text < 25)
    lab = make_labels(500, 200, digit_ids, digit_frac=0.0, ignore_frac=0.0, seed=0)
    # no number labels and no -100: the labels are the drawn text ids, digits moved by +100
    assert bool(hit.any()) and torch.equal(lab, torch.where(hit, text + 100, text))


def test_llama3_run_reports_its_vocab(tmp_path, capsys):
    rc = main(["--device", "cpu", "--n", "24", "--tokenizer", "llama3",
               "--cases", "ntl-w1", "ce+ntl", "number-level",
               "--providers", "ntl", "ntloss", "ce", "ntl-fused",
               "--repeats", "1", "--out", str(tmp_path), "--name", "l3", "--no-plot", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "l3.json").read_text())
    cfg = doc["config"]
    assert cfg["vocab_size"] == LLAMA3_V
    assert cfg["vocabs"] == [{"name": "llama3", "tokenizer": "llama3", "class": "NumberVocab", "K": 1110,
                              "V": LLAMA3_V, "max_width": 3}]
    recs = {(r["case"], r["provider"]): r for r in doc["results"]}
    assert {r["vocab"] for r in doc["results"]} == {"llama3"}
    for key in (("ntl-w1", "ntl"), ("ce+ntl", "ce"), ("ce+ntl", "ntl-fused")):
        r = recs[key]
        assert r["status"] == "ok", r
        assert r["check"]["ok"], r  # the loss equals the float64 reference over all 1,110 number tokens
    # digit-level comparisons are skipped with their reason, not run on the wrong vocab
    assert recs[("ntl-w1", "ntloss")]["status"] == "skipped"
    assert "digit level" in recs[("ntl-w1", "ntloss")]["reason"]
    nl = recs[("number-level", "ntl")]
    assert nl["status"] == "skipped" and "llama3" in nl["reason"] and "K=1110" in nl["reason"]
    md = (tmp_path / "l3.md").read_text()
    assert "llama3: NumberVocab K = 1110" in md and f"V = {LLAMA3_V}" in md


def test_two_vocabs_side_by_side_in_one_run(tmp_path):
    rc = main(["--device", "cpu", "--n", "16", "--tokenizer", "qwen2", "llama3", "--cases", "ntl-w1", "ce+ntl",
               "--providers", "ntl", "ce", "ntl-fused", "--repeats", "1", "--out", str(tmp_path), "--name", "both",
               "--no-plot", "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "both.json").read_text())
    assert [(v["name"], v["K"], v["V"]) for v in doc["config"]["vocabs"]] == [("qwen2", 10, QWEN_V),
                                                                              ("llama3", 1110, LLAMA3_V)]
    recs = {(r["case"], r["provider"], r["vocab"]): r for r in doc["results"]}
    assert {v for _, _, v in recs} == {"qwen2", "llama3"}
    for v in ("qwen2", "llama3"):
        # "x CE" refers to F.cross_entropy with the record's own vocab (its own V)
        ce = recs[("ce+ntl", "ce", v)]["modes"]["fwd+bwd"]
        fused = recs[("ce+ntl", "ntl-fused", v)]["modes"]["fwd+bwd"]
        assert ce["ratio_to_ce"] == pytest.approx(1.0)
        assert fused["ratio_to_ce"] == pytest.approx(fused["time_ms"]["median"] / ce["time_ms"]["median"])
        assert all(r["check"]["ok"] for (_, _, vv), r in recs.items() if vv == v and r.get("check"))
    md = (tmp_path / "both.md").read_text()
    assert "## Vocab comparison: llama3 / qwen2" in md and "## ntl-w1 [llama3]" in md
    q = recs[("ntl-w1", "ntl", "qwen2")]["modes"]["fwd+bwd"]["time_ms"]["median"]
    ll = recs[("ntl-w1", "ntl", "llama3")]["modes"]["fwd+bwd"]["time_ms"]["median"]
    row = next(line for line in md.splitlines() if line.startswith("| ntl-w1 | 16 | float32 | ntl |"))
    assert f"{ll / q:.2f}x" in row  # the comparison's ratio: llama3 median / qwen2 median


def test_unknown_tokenizer_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--tokenizer", "gpt2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "invalid choice: 'gpt2'" in err and "llama3" in err
    with pytest.raises(SystemExit) as e:
        parse_args(["--tokenizer", "llama3", "llama3"])
    assert e.value.code == 2 and "each tokenizer once" in capsys.readouterr().err
    assert parse_args([]).tokenizer == ["qwen2"] and parse_args([]).vocab_size is None  # the default
