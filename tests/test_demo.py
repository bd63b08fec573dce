"""Tests of ``ntl demo``'s supervised stage (issues 9 and 14): the task and tokenizer, the
answer parser and metrics, decoding, the statistics, the three arms differing only in the
loss, determinism (also across worker processes) and the ``--quick`` run twice.

The RL stage (needs TRL) is tested in ``tests/test_demo_rl.py``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ntl
from ntl.answers import extract_answer
from ntl.demo import main
from ntl.demo.common import strip_volatile
from ntl.demo.config import Settings
from ntl.demo.report import compare_to_reference
from ntl.demo.runner import default_jobs, run_jobs
from ntl.demo.sft import ce_model_paths, load_ce_model
from ntl.demo.stats import position_in_range, t_critical, t_interval, verdict
from ntl.demo.task import (
    Problem,
    answer_metrics,
    build_batch,
    corrupt_answer_digits,
    demo_tokenizer,
    digit_accuracy,
    encode,
    make_problems,
    max_answer_len,
    mean_absolute_error,
    parse_answer,
    prompt_width,
)
from ntl.demo.train import ModelConfig, TrainConfig, build_model, greedy_answers

TINY = ["--steps", "3", "--batch-size", "8", "--eval-size", "24", "--hidden", "32",
        "--layers", "1", "--no-plot", "--no-progress", "--jobs", "1"]


# ---------------------------------------------------------------------------
# parser and metrics on hand-made outputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("####123", 123),
        ("####007", 7),  # leading zeros allowed
        ("####-5", -5),  # a sign is allowed (the demo's vocabulary cannot produce it)
        ("####0", 0),
        (" ####42\n", 42),  # surrounding whitespace stripped
        ("123", None),  # no marker
        ("####", None),
        ("####12a", None),
        ("", None),
        ("####1 2", None),
        ("#### 12", None),  # the demo writes no space
        ("####+5", None),
        ("####--5", None),
        ("####5-", None),
        ("####1.5", None),
        ("####12####3", None),
        ("###12", None),
        ("####5<pad>", None),
        ("<bos>####12", None),
        ("####٣", None),  # a non-ASCII digit
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
        ("####579", 579, 1.0),
        ("####589", 579, 2 / 3),
        ("####57", 579, 0.0),  # right-aligned: '7' vs '9', '5' vs '7'
        ("####79", 579, 2 / 3),  # the hundreds digit is missing
        ("####1579", 579, 3 / 4),  # one extra leading digit
        ("####007", 7, 1 / 3),
        ("####0", 0, 1.0),
        ("####-579", 579, 1.0),  # the sign is judged by exact match and MAE, not here
        ("579", 579, 0.0),  # no marker: unparsable
        ("####12a", 12, 0.0),
        ("", 5, 0.0),
    ],
)
def test_digit_accuracy_by_hand(text, truth, acc):
    assert digit_accuracy(text, truth) == pytest.approx(acc)


def test_answer_metrics_by_hand():
    texts = ["####579", "####580", "", "####007", "####12*"]
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


def test_tokenizer_digits_marker_and_roundtrip():
    tok = demo_tokenizer()
    vocab = ntl.DigitVocab.from_tokenizer(tok)
    v = tok.get_vocab()
    assert [v[d] for d in "0123456789"] == list(vocab.token_ids)
    assert vocab.vocab_size == len(tok) == 18
    s = "012+345=####357"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == len("012+345=") + 1 + 3  # '####' is one token
    assert ids == encode(v, s)  # the dict encoder agrees with the tokenizer's own split
    assert tok(s)["input_ids"] == [tok.bos_token_id, *ids]  # tok(text) prepends <bos>
    assert tok.decode(ids) == s
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id]) == f"<bos>{s}<eos>"
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == s
    # ntl's final-answer extraction reads the completion like GSM8K's "#### 357"
    assert extract_answer("####357").text == "357"
    with pytest.raises(ValueError, match="'x'"):
        encode(v, "1x")
    with pytest.raises(ValueError, match="'<'"):
        encode(v, "<pad>")  # specials are not text


def test_build_batch_masks_everything_but_the_completion():
    tok = demo_tokenizer()
    v = tok.get_vocab()
    ids, labels = build_batch([Problem(12, "+", 5), Problem(9, "*", 99)], tok, 3, 16)
    row0 = [tok.bos_token_id, *encode(v, "012+005="), v["####"], *encode(v, "17"), tok.eos_token_id]
    assert ids[0, : len(row0)].tolist() == row0
    assert ids[0, len(row0):].eq(tok.pad_token_id).all()
    want0 = [-100] * 9 + [v["####"], *encode(v, "17"), tok.eos_token_id] + [-100] * (16 - 13)
    assert labels[0].tolist() == want0
    want1 = [-100] * 9 + [v["####"], *encode(v, "891"), tok.eos_token_id] + [-100] * (16 - 14)
    assert labels[1].tolist() == want1
    with pytest.raises(ValueError, match="length"):
        build_batch([Problem(999, "*", 999)], tok, 3, 12)


def test_corrupt_answer_digits_one_wrong_digit_per_hit_row():
    """rate 1: every row gets exactly one changed token, an answer digit (never the marker,
    <eos>, the prompt or padding), changed to a different digit, in ids and labels alike;
    rate 0 changes nothing; the draws follow the generator; bad rates are refused."""
    tok = demo_tokenizer()
    v = tok.get_vocab()
    digits = {v[str(d)] for d in range(10)}
    probs = make_problems(400, {"+": (3, 3), "*": (3, 1)}, 5)
    ids, labels = build_batch(probs, tok, 3, 16)
    i1, l1 = corrupt_answer_digits(ids, labels, tok, 1.0, torch.Generator().manual_seed(1))
    changed = i1 != ids
    assert changed.sum(1).eq(1).all() and changed.eq(l1 != labels).all()
    r, c = changed.nonzero(as_tuple=True)
    assert all(int(ids[a, b]) in digits and int(labels[a, b]) == int(ids[a, b]) for a, b in zip(r, c, strict=True))
    assert all(int(i1[a, b]) in digits and int(i1[a, b]) != int(ids[a, b]) for a, b in zip(r, c, strict=True))
    assert labels.eq(-100).eq(l1.eq(-100)).all()  # the label mask is untouched
    # every wrong digit is drawn among the nine others: the shift (new - old) mod 10 covers 1..9
    val = {v[str(d)]: d for d in range(10)}
    shifts = {(val[int(i1[a, b])] - val[int(ids[a, b])]) % 10 for a, b in zip(r, c, strict=True)}
    assert shifts == set(range(1, 10))
    # and the position among the answer digits: first digits and last digits both get hit
    first = (labels != -100).int().argmax(1) + 1  # the position after '####'
    assert (c == first[r]).any() and (c != first[r]).any()
    # a row without answer digits (its labels masked) is left alone even at rate 1
    masked = labels.clone()
    masked[0] = -100
    im, lm = corrupt_answer_digits(ids, masked, tok, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(im[0], ids[0]) and torch.equal(lm[0], masked[0])
    assert (im[1:] != ids[1:]).sum(1).eq(1).all()
    i0, l0 = corrupt_answer_digits(ids, labels, tok, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(i0, ids) and torch.equal(l0, labels)
    i2, _ = corrupt_answer_digits(ids, labels, tok, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(i1, i2)
    ih, _ = corrupt_answer_digits(ids, labels, tok, 0.3, torch.Generator().manual_seed(2))
    frac = (ih != ids).any(1).float().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / 400) ** 0.5
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            corrupt_answer_digits(ids, labels, tok, bad, torch.Generator())


def test_machine_info_records_the_cpu_kernels_torch_uses():
    """results.json's ``machine`` names the CPU kernels torch dispatches to: forcing the
    scalar ones (``ATEN_CPU_CAPABILITY=default``, read by torch at start-up) shows as
    ``"default"``; on Linux the CPU model is read from /proc/cpuinfo."""
    import subprocess
    import sys

    code = ("from ntl.demo.common import machine_info; from ntl.demo.config import Settings; "
            "m = machine_info(Settings())['machine']; print(m['torch_cpu_capability'], '|', m['cpu_model'])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    cap, model = (x.strip() for x in out.split("|"))
    assert cap.lower() == "default"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")}
        if names:
            assert model in names


def test_make_problems_deterministic_in_range_and_excluding():
    digits = {"+": (3, 3), "*": (3, 1)}
    a = make_problems(400, digits, seed=5)
    assert a == make_problems(400, digits, seed=5)
    assert a != make_problems(400, digits, seed=6)
    assert {p.op for p in a} == {"+", "*"}
    for p in a:
        assert 0 <= p.a < 1000
        assert 0 <= p.b < (1000 if p.op == "+" else 10)
    assert max(p.b for p in a if p.op == "*") == 9
    held = set(a[:100])
    b = make_problems(2000, digits, seed=7, exclude=held)
    assert not held & set(b)
    assert max_answer_len(digits) == 4 and max_answer_len({"*": (3, 3)}) == 6
    assert prompt_width(digits) == 3 and prompt_width({"*": (2, 1)}) == 2
    assert Problem(12, "*", 34).answer == 408 and Problem(999, "+", 1).answer == 1000
    assert Problem(12, "*", 4).prompt(3) == "012*004=" and Problem(12, "*", 4).completion == "####48"
    for bad in ({"-": (2, 2)}, {"+": (0, 2)}, {"+": 3}, {}):
        with pytest.raises(ValueError, match="digits"):
            make_problems(3, bad, seed=0)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a busy machine
    yield
    torch.set_num_threads(old)


def test_greedy_with_cache_equals_naive_greedy(one_thread):
    """The batched KV-cache decoder against a plain full-recompute argmax loop."""
    tok = demo_tokenizer()
    v = tok.get_vocab()
    torch.manual_seed(0)
    model = build_model(tok, ModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                         intermediate_size=64), 16, torch.device("cpu"))
    # give the random model a bias towards digits and <eos> so the outputs vary
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    probs = make_problems(12, {"+": (3, 3)}, seed=1)
    got = greedy_answers(model, probs, tok, 3, 6, torch.device("cpu"), batch_size=5)
    want = []
    with torch.no_grad():
        for p in probs:
            seq = [tok.bos_token_id, *encode(v, p.prompt(3))]
            out = []
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                seq.append(nxt)
            want.append(tok.decode(out))
    assert got == want
    assert model.training  # decoding restores the mode


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def test_t_critical_matches_the_printed_table():
    # two-sided 95 % Student-t critical values from a textbook table
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_critical(df) == pytest.approx(t, abs=1e-3)
    with pytest.raises(ValueError, match="df"):
        t_critical(0)


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_t_critical_agrees_with_scipy_without_using_it(level):
    """The quantile is computed without scipy (a core install can run ``ntl demo``); scipy's
    ``t.ppf`` is the independent reference here, for df 1..200."""
    from scipy import stats

    for df in [*range(1, 41), 57, 99, 100, 200]:
        assert t_critical(df, level) == pytest.approx(float(stats.t.ppf(0.5 + level / 2, df)),
                                                      rel=1e-9, abs=1e-9)


def test_demo_stats_import_no_scipy(tmp_path):
    """``ntl.demo.stats`` in a process where ``import scipy`` fails: the interval still works
    (the demo used to train every arm, then die on ``ModuleNotFoundError: scipy``)."""
    import subprocess
    import sys

    (tmp_path / "scipy").mkdir()
    (tmp_path / "scipy" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'scipy'\")\n")
    code = ("from ntl.demo.stats import t_interval; "
            "d = t_interval([1.0, 2.0, 3.0, 4.0, 5.0]); print(round(d['hi'], 6))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert float(p.stdout) == pytest.approx(3.0 + 2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)


def test_t_interval_by_hand():
    d = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(10 / 4)
    half = 2.7764451 * sd / math.sqrt(5)
    assert d["mean"] == pytest.approx(3.0) and d["std"] == pytest.approx(sd)
    assert d["lo"] == pytest.approx(3.0 - half, rel=1e-6) and d["hi"] == pytest.approx(3.0 + half, rel=1e-6)
    assert (d["min"], d["max"], d["n"]) == (1.0, 5.0, 5)
    one = t_interval([0.5])
    assert one["lo"] is None and one["hi"] is None and one["std"] == 0.0
    assert t_interval([None, 1.0, 3.0])["n"] == 2  # missing values are left out


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=12),
       st.floats(-1e3, 1e3, allow_nan=False))
def test_t_interval_agrees_with_scipy_and_shifts(xs, c):
    import numpy as np
    from scipy import stats

    d = t_interval(xs)
    arr = np.asarray(xs)
    sem = arr.std(ddof=1) / math.sqrt(len(xs))
    if sem > 0:
        lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=arr.mean(), scale=sem)
        assert d["lo"] == pytest.approx(lo, rel=1e-6, abs=1e-6)
        assert d["hi"] == pytest.approx(hi, rel=1e-6, abs=1e-6)
    s = t_interval([x + c for x in xs])
    assert s["lo"] == pytest.approx(d["lo"] + c, abs=1e-6)
    assert s["hi"] == pytest.approx(d["hi"] + c, abs=1e-6)


def test_verdicts_in_plain_words():
    covers = t_interval([0.01, -0.02, 0.03, 0.0, -0.01])
    assert "no detectable difference" in verdict("B", "A", "exact", covers, higher_is_better=True)
    up = t_interval([0.05, 0.06, 0.04, 0.05, 0.07])
    assert ": higher, better" in verdict("B", "A", "exact", up, higher_is_better=True)
    assert ": higher, worse" in verdict("B", "A", "MAE", up, higher_is_better=False)
    down = t_interval([-3.0, -2.0, -4.0])
    assert ": lower, better" in verdict("B", "A", "MAE", down, higher_is_better=False)
    assert "3 seeds" in verdict("B", "A", "MAE", down, higher_is_better=False)
    assert "no interval" in verdict("B", "A", "MAE", t_interval([1.0]), higher_is_better=False)
    assert position_in_range(0.5, 0.4, 0.6) == "inside"
    assert position_in_range(0.3, 0.4, 0.6) == "below"
    assert position_in_range(0.7, 0.4, 0.6) == "above"
    assert position_in_range(None, 0.4, 0.6) == "n/a"


def test_compare_to_reference_places_each_arm():
    ref = {"summary": {"CE": {"all": {"exact_match": {"min": 0.5, "max": 0.6},
                                      "mae": {"min": 1.0, "max": 2.0},
                                      "digit_accuracy": {"min": 0.8, "max": 0.9}}}}}
    summary = {"CE": {"all": {"exact_match": {"mean": 0.55}, "mae": {"mean": 3.0},
                              "digit_accuracy": {"mean": 0.7}}}}
    (line,) = compare_to_reference(summary, ref, ["CE"])
    assert "exact 0.550 inside" in line and "MAE 3.00 above" in line and "digit acc 0.700 below" in line
    assert compare_to_reference(summary, None, ["CE"]) == []


def _square_job(payload, progress):
    progress(2)
    progress(1)
    if payload < 0:
        raise ArithmeticError(f"negative payload {payload}")
    return payload * payload


def test_run_jobs_in_process_order_progress_and_errors():
    assert run_jobs(_square_job, [3, 1, 2], jobs=1, labels=["a", "b", "c"], totals=[3, 3, 3],
                    progress=False) == [9, 1, 4]
    with pytest.raises(ArithmeticError, match="negative payload -1"):
        run_jobs(_square_job, [2, -1], jobs=1, labels=["a", "b"], totals=[3, 3], progress=False)
    with pytest.raises(ValueError, match="jobs"):
        run_jobs(_square_job, [1], jobs=0, labels=["a"], totals=[1])
    with pytest.raises(ValueError, match="same length"):
        run_jobs(_square_job, [1, 2], jobs=1, labels=["a"], totals=[1, 1])
    assert default_jobs(15, 3) >= 3 and default_jobs(2, 3) == 2 and default_jobs(1, 3) == 1


# ---------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------


def _check_metrics(m):
    assert m["n"] > 0
    for k in ("exact_match", "digit_accuracy", "unparsable"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])
    for k in ("mae", "median_ae"):
        assert m[k] is None or (math.isfinite(m[k]) and m[k] >= 0.0), (k, m[k])


def test_tiny_demo_arms_differ_only_in_loss(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    assert main([*TINY, "--steps", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CE+NTL-W1" in printed and "| problems" in printed and "paired differences" in printed
    res = json.loads((out / "results.json").read_text())
    arms = ["CE", "CE+NTL-MSE", "CE+NTL-W1"]
    run = res["runs"][0]
    assert res["config"]["seeds"] == [0] and res["stage"] == "supervised"
    assert res["versions"]["torch"] == torch.__version__ and res["date"]
    for a in arms:
        for g in ("all", "add", "mul"):
            _check_metrics(run["arms"][a]["metrics"][g])
        assert len(run["arms"][a]["train"]["history"]["loss"]) == 4
        assert all(math.isfinite(x) for x in run["arms"][a]["train"]["history"]["loss"])
    assert res["plot"] is None

    fs = res["first_step"]
    # same init and same batch: the CE parts agree; the NTL arms' totals differ from CE
    assert fs["CE+NTL-MSE"]["ce"] == pytest.approx(fs["CE"]["ce"], rel=1e-6)
    assert fs["CE+NTL-W1"]["ce"] == pytest.approx(fs["CE"]["ce"], rel=1e-6)
    assert fs["CE"]["loss"] == pytest.approx(fs["CE"]["ce"], rel=1e-6)
    for a in ("CE+NTL-MSE", "CE+NTL-W1"):
        assert fs[a]["loss"] == pytest.approx(fs[a]["ce"] + 0.3 * fs[a]["ntl"], rel=1e-5)
        assert fs[a]["loss"] > fs["CE"]["loss"] + 0.01

    # independent reference for the first step: rebuild init + first batch, plain torch losses
    cfg = res["config"]
    tok = demo_tokenizer()
    digits = {"+": tuple(cfg["task"]["max_digits"]["add"]), "*": tuple(cfg["task"]["max_digits"]["mul"])}
    held = set(make_problems(cfg["task"]["eval_size"], digits, cfg["task"]["eval_seed"]))
    B = cfg["train"]["batch_size"]
    first = make_problems(cfg["train"]["steps"] * B, digits, 0, exclude=held)
    ids, labels = build_batch(first[:B], tok, prompt_width(digits), cfg["task"]["seq_len"])
    torch.manual_seed(0)
    m = cfg["model"]
    model = build_model(tok, ModelConfig(m["hidden_size"], m["num_layers"], m["num_heads"],
                                         m["intermediate_size"]), cfg["task"]["seq_len"], torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    lab = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    mse = ntl.ntl_mse_loss(logits, lab, tok, backend="torch")
    w1 = ntl.ntl_wasserstein_loss(logits, lab, tok, backend="torch")
    assert fs["CE"]["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert fs["CE+NTL-MSE"]["ntl"] == pytest.approx(mse.item(), rel=1e-5)
    assert fs["CE+NTL-W1"]["ntl"] == pytest.approx(w1.item(), rel=1e-5)

    # the CE model is saved for the RL stage, under the hash of its configuration
    s = Settings(digits=digits, eval_size=24, model=ModelConfig(32, 1, 4, 128),
                 train=TrainConfig(steps=4, batch_size=8, lr=3e-3, warmup=1))
    pt, _ = ce_model_paths(str(out), s, 0)
    assert (tmp_path / "demo" / "models").is_dir() and pt.endswith(".pt")
    loaded = load_ce_model(str(out), s, 0, torch.device("cpu"))
    assert loaded is not None, sorted(p.name for p in (out / "models").iterdir())
    assert loaded[1]["metrics"] == run["arms"]["CE"]["metrics"]
    other = Settings(digits=digits, eval_size=24, model=ModelConfig(32, 1, 4, 128),
                     train=TrainConfig(steps=5, batch_size=8, lr=3e-3, warmup=1))
    assert ce_model_paths(str(out), other, 0)[0] != pt
    assert load_ce_model(str(out), other, 0, torch.device("cpu")) is None


def test_tiny_demo_is_deterministic_and_pairs_seeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--out", str(a), "--seeds", "0", "1", "2"]) == 0
    assert main([*TINY, "--out", str(b), "--seeds", "0", "1", "2"]) == 0
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    assert strip_volatile(ra) == strip_volatile(rb)
    assert ra["timing"]["total_seconds"] > 0
    # different seeds train differently
    assert (ra["runs"][0]["arms"]["CE"]["train"]["history"]
            != ra["runs"][1]["arms"]["CE"]["train"]["history"])
    # mean and sample std over the seeds, by hand
    for arm in ("CE", "CE+NTL-W1"):
        xs = [r["arms"][arm]["metrics"]["all"]["digit_accuracy"] for r in ra["runs"]]
        s = ra["summary"][arm]["all"]["digit_accuracy"]
        mean = sum(xs) / 3
        assert s["n"] == 3 and s["mean"] == pytest.approx(mean)
        assert s["std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in xs) / 2))
    # paired differences against CE with a t-interval (df = 2), by hand
    ds = [r["arms"]["CE+NTL-MSE"]["metrics"]["all"]["digit_accuracy"]
          - r["arms"]["CE"]["metrics"]["all"]["digit_accuracy"] for r in ra["runs"]]
    d = ra["paired_vs_CE"]["CE+NTL-MSE"]["all"]["digit_accuracy"]
    md = sum(ds) / 3
    sd = math.sqrt(sum((x - md) ** 2 for x in ds) / 2)
    assert d["mean"] == pytest.approx(md)
    assert d["hi"] - d["mean"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5, abs=1e-12)
    assert "CE" not in ra["paired_vs_CE"] and len(ra["verdicts"]) == 8  # 2 arms x 4 metrics


@pytest.mark.slow
def test_worker_processes_give_the_same_metrics_as_one_process(tmp_path):
    """One torch thread per job: the results do not depend on --jobs (spawned workers)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--out", str(a)]) == 0
    assert main([*TINY[:-2], "--jobs", "3", "--out", str(b)]) == 0
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    assert rb["config"]["jobs"] == 3
    assert strip_volatile(ra) == strip_volatile(rb)


@pytest.mark.slow
def test_quick_demo_twice_writes_identical_metrics(tmp_path):
    """The CI check of issue 14: `ntl demo --quick` twice, same arguments, same metrics."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--quick", "--no-progress", "--no-plot", "--out", str(a)]) == 0
    assert main(["--quick", "--no-progress", "--no-plot", "--out", str(b)]) == 0
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    assert ra["config"]["quick"] is True
    assert strip_volatile(ra) == strip_volatile(rb)
    tr = ra["runs"][0]["arms"]["CE"]["train"]
    assert tr["final_window"]["ce"] < 0.7 * tr["first_step"]["ce"]  # it learns


def test_plot_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    args = [a for a in TINY if a != "--no-plot"]
    assert main([*args, "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["plot"] == "results.png" and (tmp_path / "results.png").stat().st_size > 10_000


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    for args, name in ((["--steps", "0"], "--steps"), (["--ntl-weight", "-1"], "--ntl-weight"),
                       (["--device", "nonsense"], "--device"), (["--jobs", "-1"], "--jobs"),
                       (["--seeds", "1", "1"], "--seeds"), (["--hidden", "30"], "--hidden"),
                       (["--mul-digits", "0", "1"], "--mul-digits"),
                       (["--num-generations", "1"], "--num-generations"),
                       (["--rl", "--backend", "torch"], "--backend")):
        assert main([*TINY, "--out", str(tmp_path), *args]) == 2
        assert name in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*TINY, "--out", str(tmp_path), "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ops", "div"])


def test_rl_stage_without_trl_says_what_to_install(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("trl") is not None:
        pytest.skip("TRL is installed here; tests/test_demo_rl.py runs the RL stage")
    assert main([*TINY, "--rl", "--out", str(tmp_path)]) == 2
    assert ".[demo]" in capsys.readouterr().err


def test_cli_dispatches_demo(tmp_path):
    from ntl.cli import main as cli_main

    assert cli_main(["demo", *TINY, "--out", str(tmp_path), "--ops", "add"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["task"]["ops"] == ["add"] and list(res["summary"]["CE"]) == ["all"]
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
