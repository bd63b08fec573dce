"""Tests of ``ntl demo`` (issue 9): the task, the answer parser and metrics, decoding, the
three arms differing only in the loss, and the ``--quick`` smoke run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import ntl
from ntl.demo import main
from ntl.demo.task import (
    CharTokenizer,
    Problem,
    answer_metrics,
    build_batch,
    digit_accuracy,
    make_problems,
    max_answer_len,
    mean_absolute_error,
    parse_answer,
)
from ntl.demo.train import ModelConfig, build_model, greedy_answers

TINY = ["--steps", "3", "--batch-size", "8", "--eval-size", "24", "--hidden", "32",
        "--layers", "1", "--no-plot", "--no-progress", "--threads", "1"]


# ---------------------------------------------------------------------------
# parser and metrics on hand-made outputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("123", 123),
        ("007", 7),  # leading zeros allowed
        ("-5", -5),  # a sign is allowed (the demo's vocabulary cannot produce it)
        ("0", 0),
        (" 42\n", 42),  # surrounding whitespace stripped
        ("12a", None),
        ("", None),
        ("   ", None),
        ("1 2", None),
        ("+5", None),
        ("--5", None),
        ("-", None),
        ("5-", None),
        ("1.5", None),
        ("<pad>", None),
        ("12<bos>", None),
        ("٣", None),  # a non-ASCII digit
    ],
)
def test_parse_answer(text, value):
    assert parse_answer(text) == value


def test_mean_absolute_error_by_hand():
    # errors of the parsable answers: |123-100| = 23, |7-7| = 0, |-5-5| = 10 -> 33 / 3
    assert mean_absolute_error([123, None, 7, -5], [100, 50, 7, 5]) == pytest.approx(11.0)
    assert mean_absolute_error([None, None], [1, 2]) is None
    assert mean_absolute_error([4], [4]) == 0.0
    with pytest.raises(ValueError, match="preds"):
        mean_absolute_error([1, 2], [1])


@pytest.mark.parametrize(
    ("text", "truth", "acc"),
    [
        ("579", 579, 1.0),
        ("589", 579, 2 / 3),
        ("57", 579, 0.0),  # right-aligned: '7' vs '9', '5' vs '7'
        ("79", 579, 2 / 3),  # the hundreds digit is missing
        ("1579", 579, 3 / 4),  # one extra leading digit
        ("007", 7, 1 / 3),
        ("0", 0, 1.0),
        ("-579", 579, 1.0),  # the sign is judged by exact match and MAE, not here
        ("12a", 12, 0.0),
        ("", 5, 0.0),
    ],
)
def test_digit_accuracy_by_hand(text, truth, acc):
    assert digit_accuracy(text, truth) == pytest.approx(acc)


def test_answer_metrics_by_hand():
    texts = ["579", "580", "", "007", "12*"]
    truths = [579, 579, 3, 7, 12]
    m = answer_metrics(texts, truths)
    assert m["n"] == 5
    assert m["exact_match"] == pytest.approx(2 / 5)  # "579" and "007" (numerically 7)
    assert m["unparsable"] == pytest.approx(2 / 5)
    assert m["mae"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["median_ae"] == 0.0
    # "580" vs 579 shares only the hundreds digit: 1/3; "007" vs 7: 1/3
    assert m["digit_accuracy"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 3 + 0) / 5)
    with pytest.raises(ValueError, match="texts"):
        answer_metrics(["1"], [1, 2])


# ---------------------------------------------------------------------------
# tokenizer, task, batches
# ---------------------------------------------------------------------------


def test_tokenizer_digits_and_roundtrip():
    tok = CharTokenizer()
    vocab = ntl.DigitVocab.from_tokenizer(tok)
    assert list(vocab.token_ids) == tok.encode("0123456789")
    assert vocab.vocab_size == len(tok)
    s = "012+345=357"
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode([tok.bos_token_id, *tok.encode("7"), tok.eos_token_id]) == "<bos>7<eos>"
    assert tok.decode([tok.bos_token_id, *tok.encode("7")], skip_special_tokens=True) == "7"
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("1x")


def test_build_batch_masks_everything_but_the_answer():
    tok = CharTokenizer()
    ids, labels = build_batch([Problem(12, "+", 5), Problem(9, "*", 99)], tok, 3, 16)
    e = tok.encode
    row0 = [tok.bos_token_id, *e("012+005="), *e("17"), tok.eos_token_id]
    assert ids[0, : len(row0)].tolist() == row0
    assert ids[0, len(row0):].eq(tok.pad_token_id).all()
    want0 = [-100] * 9 + [*e("17"), tok.eos_token_id] + [-100] * (16 - 12)
    assert labels[0].tolist() == want0
    want1 = [-100] * 9 + [*e("891"), tok.eos_token_id] + [-100] * (16 - 13)
    assert labels[1].tolist() == want1
    with pytest.raises(ValueError, match="length"):
        build_batch([Problem(999, "*", 999)], tok, 3, 10)


def test_make_problems_deterministic_in_range_and_excluding():
    digits = {"+": 3, "*": 2}
    a = make_problems(300, digits, seed=5)
    assert a == make_problems(300, digits, seed=5)
    assert a != make_problems(300, digits, seed=6)
    assert {p.op for p in a} == {"+", "*"}
    for p in a:
        hi = 1000 if p.op == "+" else 100
        assert 0 <= p.a < hi and 0 <= p.b < hi
    held = set(a[:100])
    b = make_problems(2000, digits, seed=7, exclude=held)
    assert not held & set(b)
    assert max_answer_len(digits) == 4 and max_answer_len({"*": 3}) == 6
    assert Problem(12, "*", 34).answer == 408 and Problem(999, "+", 1).answer == 1000
    with pytest.raises(ValueError, match="digits"):
        make_problems(3, {"-": 2}, seed=0)
    with pytest.raises(ValueError, match="digits"):
        make_problems(3, {"+": 0}, seed=0)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a busy machine
    yield
    torch.set_num_threads(old)


def test_greedy_with_cache_equals_naive_greedy(one_thread):
    """The batched KV-cache decoder against a plain full-recompute argmax loop."""
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(tok, ModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                         intermediate_size=64), 16, torch.device("cpu"))
    # give the random model a bias towards digits and <eos> so the outputs vary
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    probs = make_problems(12, {"+": 3}, seed=1)
    got = greedy_answers(model, probs, tok, 3, 5, torch.device("cpu"), batch_size=5)
    want = []
    with torch.no_grad():
        for p in probs:
            seq = [tok.bos_token_id, *tok.encode(p.prompt(3))]
            out = []
            for _ in range(5):
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                seq.append(nxt)
            want.append(tok.decode(out))
    assert got == want


# ---------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------


def _check_metrics(m):
    assert m["n"] > 0
    for k in ("exact_match", "digit_accuracy", "unparsable"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])
    for k in ("mae", "median_ae"):
        assert m[k] is not None and math.isfinite(m[k]) and m[k] >= 0.0, (k, m[k])


def test_quick_demo_runs_offline_and_arms_differ_only_in_loss(tmp_path, monkeypatch, capsys,
                                                            one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "CE+NTL-W1" in printed and "| problems" in printed
    res = json.loads((out / "results.json").read_text())
    arms = ["CE", "CE+NTL-MSE", "CE+NTL-W1"]
    run = res["runs"][0]
    assert res["config"]["quick"] is True and res["config"]["seeds"] == [0]
    assert res["versions"]["torch"] == torch.__version__ and res["date"]
    assert 1_000_000 <= res["config"]["model"]["parameters"] <= 3_000_000
    for a in arms:
        for g in ("all", "add", "mul"):
            _check_metrics(run["arms"][a]["metrics"][g])
        assert run["arms"][a]["train"]["train_seconds"] > 0
        assert all(math.isfinite(x) for x in run["arms"][a]["train"]["history"]["loss"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res["plot"] is None
    else:
        assert res["plot"] == "results.png" and (out / "results.png").stat().st_size > 1000

    fs = res["first_step"]
    # same init and same batch: the CE parts agree; the NTL arms' totals differ from CE
    assert fs["CE+NTL-MSE"]["ce"] == pytest.approx(fs["CE"]["ce"], rel=1e-6)
    assert fs["CE+NTL-W1"]["ce"] == pytest.approx(fs["CE"]["ce"], rel=1e-6)
    assert fs["CE"]["loss"] == pytest.approx(fs["CE"]["ce"], rel=1e-6)
    for a, w in (("CE+NTL-MSE", 0.3), ("CE+NTL-W1", 0.3)):
        assert fs[a]["loss"] == pytest.approx(fs[a]["ce"] + w * fs[a]["ntl"], rel=1e-5)
        assert fs[a]["loss"] > fs["CE"]["loss"] + 0.01

    # independent reference for the first step: rebuild init + first batch, plain torch losses
    cfg = res["config"]
    tok = CharTokenizer()
    digits = {"+": cfg["max_digits"]["add"], "*": cfg["max_digits"]["mul"]}
    held = set(make_problems(cfg["eval_size"], digits, cfg["eval_seed"]))
    first = make_problems(cfg["steps"] * cfg["batch_size"], digits, 0, exclude=held)
    ids, labels = build_batch(first[: cfg["batch_size"]], tok, max(digits.values()), cfg["seq_len"])
    torch.manual_seed(0)
    m = cfg["model"]
    model = build_model(tok, ModelConfig(m["hidden_size"], m["num_layers"], m["num_heads"],
                                         m["intermediate_size"]), cfg["seq_len"], torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    lab = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    mse = ntl.ntl_mse_loss(logits, lab, tok, backend="torch")
    w1 = ntl.ntl_wasserstein_loss(logits, lab, tok, backend="torch")
    assert fs["CE"]["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert fs["CE+NTL-MSE"]["ntl"] == pytest.approx(mse.item(), rel=1e-5)
    assert fs["CE+NTL-W1"]["ntl"] == pytest.approx(w1.item(), rel=1e-5)


def test_tiny_demo_is_deterministic_and_aggregates_seeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--out", str(a), "--seeds", "0", "1"]) == 0
    assert main([*TINY, "--out", str(b), "--seeds", "0", "1"]) == 0
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    for run_a, run_b in zip(ra["runs"], rb["runs"], strict=True):
        for arm in run_a["arms"]:
            assert run_a["arms"][arm]["train"]["history"] == run_b["arms"][arm]["train"]["history"]
            assert run_a["arms"][arm]["metrics"] == run_b["arms"][arm]["metrics"]
            assert run_a["arms"][arm]["samples"] == run_b["arms"][arm]["samples"]
    # different seeds train differently
    assert (ra["runs"][0]["arms"]["CE"]["train"]["history"]
            != ra["runs"][1]["arms"]["CE"]["train"]["history"])
    # mean and sample std over the two seeds, by hand
    for arm in ("CE", "CE+NTL-W1"):
        xs = [r["arms"][arm]["metrics"]["all"]["digit_accuracy"] for r in ra["runs"]]
        s = ra["summary"][arm]["all"]["digit_accuracy"]
        assert s["n"] == 2
        assert s["mean"] == pytest.approx((xs[0] + xs[1]) / 2)
        assert s["std"] == pytest.approx(abs(xs[0] - xs[1]) / math.sqrt(2))
    assert "±" in ra["table"]
    # paired differences against CE, by hand
    ds = [r["arms"]["CE+NTL-MSE"]["metrics"]["all"]["exact_match"]
          - r["arms"]["CE"]["metrics"]["all"]["exact_match"] for r in ra["runs"]]
    d = ra["paired_vs_CE"]["CE+NTL-MSE"]["all"]["exact_match"]
    assert d["mean"] == pytest.approx(sum(ds) / 2) and "CE" not in ra["paired_vs_CE"]


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main([*TINY, "--out", str(tmp_path), "--ntl-weight", "-1"]) == 2
    assert "--ntl-weight" in capsys.readouterr().err
    assert main([*TINY, "--out", str(tmp_path), "--device", "nonsense"]) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*TINY, "--out", str(tmp_path), "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ops", "div"])


def test_cli_dispatches_demo(tmp_path):
    from ntl.cli import main as cli_main

    assert cli_main(["demo", *TINY, "--out", str(tmp_path), "--ops", "add"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["ops"] == ["add"] and list(res["summary"]["CE"]) == ["all"]
    assert all(s["prompt"].count("+") == 1 for s in res["runs"][0]["arms"]["CE"]["samples"])


def test_triton_backend_matches_torch_in_the_demo(tmp_path):
    """The demo's loss through the Triton kernels (interpreter on CPU) gives the same
    training trajectory as the PyTorch path, to float tolerance."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    tiny = [*TINY, "--steps", "2", "--eval-size", "4", "--ops", "add"]
    assert main([*tiny, "--out", str(tmp_path / "t"), "--backend", "torch"]) == 0
    assert main([*tiny, "--out", str(tmp_path / "k"), "--backend", "triton"]) == 0
    rt = json.loads((tmp_path / "t" / "results.json").read_text())["runs"][0]["arms"]
    rk = json.loads((tmp_path / "k" / "results.json").read_text())["runs"][0]["arms"]
    for arm in rt:
        for part in ("loss", "ce", "ntl"):
            assert rk[arm]["train"]["history"][part] == pytest.approx(
                rt[arm]["train"]["history"][part], rel=1e-4, abs=1e-5)
