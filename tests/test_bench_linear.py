"""The ``linear`` benchmark case, ``--isolate`` and the issue-13 targets (toy shapes; no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from toy_tokenizers import bench_tokenizer

from ntl.bench import report
from ntl.bench.cases import CASES, expected_values, make_inputs
from ntl.bench.harness import main

TOY = ["--device", "cpu", "--n", "48", "--vocab-size", "64", "--hidden-size", "8", "--cases", "linear",
       "--repeats", "2", "--no-plot", "--no-progress"]


@pytest.fixture(scope="module")
def toy_tok():
    """The bench tests' tokenizer (tests/support/toy_tokenizers.py): digits '0'..'9' at ids 20..29."""
    return bench_tokenizer()


def test_linear_expected_values_are_float64_cross_entropy(toy_tok):
    import ntl

    V = 20_000  # several vocabulary blocks of the online log-sum-exp
    vocab = ntl.DigitVocab.from_tokenizer(toy_tok, vocab_size=V)
    inp = make_inputs("linear", 40, V, torch.float32, torch.device("cpu"), vocab, digit_frac=0.3,
                      ignore_frac=0.1, hidden_size=12, seed=3)
    exp = expected_values(inp)
    logits = inp.hidden.detach().double() @ inp.weight.detach().double().T
    ce = F.cross_entropy(logits, inp.labels)
    w1 = ntl.ntl_wasserstein_loss(logits, inp.labels, vocab)
    assert exp["ce"] == pytest.approx(float(ce), rel=1e-12)
    assert exp["w1"] == pytest.approx(float(w1), rel=1e-6)
    assert exp["ce+w1"] == pytest.approx(float(ce) + 0.3 * float(w1), rel=1e-6)


def test_linear_case_in_process(tmp_path, toy_tok, capsys):
    rc = main([*TOY, "--out", str(tmp_path), "--name", "toy"], tokenizer=toy_tok)
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "toy.json").read_text())
    recs = {r["provider"]: r for r in doc["results"]}
    cpu = {"logits+fused", "logits+fused-inplace", "ntl-linear"}
    torch_lce = {"torch-lce", "torch-lce-chunked"}
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        cpu |= torch_lce
    else:  # torch < 2.13 (the floor environment): skipped, saying why
        for k in torch_lce:
            assert recs[k]["status"] == "skipped" and "linear_cross_entropy" in recs[k]["reason"], recs[k]
    assert {k for k, r in recs.items() if r["status"] == "ok"} == cpu
    for k in ("liger-flce", "liger-flce+ntl", "cce"):
        assert recs[k]["status"] == "skipped" and "GPU" in recs[k]["reason"]
    for k in cpu:  # every loss agrees with the float64 reference (CE only for torch's)
        assert recs[k]["check"]["ok"], recs[k]
    if "torch-lce" in cpu:
        assert recs["torch-lce"]["check"]["expected"] < recs["ntl-linear"]["check"]["expected"]
    ours = recs["ntl-linear"]["modes"]["fwd+bwd"]
    # x CE of the linear case is relative to the logits path
    base = recs["logits+fused"]["modes"]["fwd+bwd"]
    assert ours["ratio_to_ce"] == pytest.approx(ours["time_ms"]["median"] / base["time_ms"]["median"])
    assert ours["peak_mem_bytes"] < base["peak_mem_bytes"]  # no [N, V] logits or gradient
    assert doc["config"]["hidden_size_by_case"] == {"linear": 8}
    tg = {t["id"]: t for t in doc["targets"]}
    assert tg["cpu-linear-time-vs-logits"]["status"].startswith("not measured")  # N = 2048 not run
    assert tg["gpu-linear-vs-liger-time"]["status"] == "not measured (needs a CUDA GPU)"


def test_isolate_runs_each_provider_in_its_own_process(tmp_path, toy_tok):
    rc = main([*TOY, "--providers", "logits+fused", "ntl-linear", "--isolate", "--rounds", "2", "--threads", "1",
               "--out", str(tmp_path), "--name", "iso"], tokenizer=toy_tok)
    assert rc == 0
    doc = json.loads((tmp_path / "iso.json").read_text())
    assert doc["config"]["isolated"]["rounds"] == 2 and doc["config"]["threads"] == 1
    ran = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ran} == {"logits+fused", "ntl-linear"}
    for r in ran:
        assert r["check"]["ok"]
        assert len(r["rounds"]) == 2
        assert r["modes"]["fwd+bwd"]["time_ms"]["n"] == 4  # 2 rounds x 2 repeats, pooled
        assert r["modes"]["fwd+bwd"]["peak_mem_bytes"] == max(x["peak_mem_bytes"] for x in r["rounds"])
        for x in r["rounds"]:  # each child reports its own process's resident memory
            assert x["rss"]["peak_bytes"] >= x["rss"]["base_bytes"] > 0
            assert x["value"] == r["value"]
    assert {r["provider"] for r in doc["results"]} == {"logits+fused", "ntl-linear"}  # the rest deselected


def test_failing_child_is_an_error_record(tmp_path):
    import sys

    from ntl.bench.harness import _run_child

    rec = _run_child([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)",
                      "--worker-json", str(tmp_path / "x.json")])
    assert rec == {"status": "error", "reason": "child process exit 3: boom"}


def _rec(prov, t, mem, N=2048, dt="float32"):
    modes = {m: {"time_ms": {"median": t, "q25": t, "q75": t, "min": t, "max": t, "n": 1},
                 "peak_mem_bytes": mem} for m in ("fwd", "bwd", "fwd+bwd")}
    return {"case": "linear", "provider": prov, "label": prov, "N": N, "dtype": dt, "status": "ok", "modes": modes}


@pytest.mark.parametrize(("ours_t", "ours_m", "expect"), [
    (1000.0, 600, {"cpu-linear-time-vs-logits": "pass", "cpu-linear-time-vs-torch-chunked": "pass",
                   "cpu-linear-mem-vs-logits": "pass", "cpu-linear-mem-vs-torch-chunked": "pass"}),
    (1300.0, 700, {"cpu-linear-time-vs-logits": "fail", "cpu-linear-time-vs-torch-chunked": "fail",
                   "cpu-linear-mem-vs-logits": "pass", "cpu-linear-mem-vs-torch-chunked": "fail"}),
])
def test_linear_targets_arithmetic(ours_t, ours_m, expect):
    # logits path 1000 ms / 3000 B; chunked torch 1200 ms / 600 B: thresholds 1.2x, 1.0x, 0.3x, 1.1x
    recs = [_rec("logits+fused", 1000.0, 3000), _rec("torch-lce-chunked", 1200.0, 600),
            _rec("ntl-linear", ours_t, ours_m)]
    report.add_ratios(recs, CASES)
    tg = {t["id"]: t for t in report.evaluate_targets(recs, "cpu", {})}
    assert {k: tg[k]["status"] for k in expect} == expect
    assert tg["cpu-linear-time-vs-torch-chunked"]["measured"] == pytest.approx(ours_t / 1200.0)
    assert tg["cpu-linear-mem-vs-logits"]["measured"] == pytest.approx(ours_m / 3000)
    assert tg["cpu-linear-torch-lce-chunked-time"]["status"] == "info"
