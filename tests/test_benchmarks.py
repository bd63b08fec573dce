"""Smoke test of the benchmark harness machinery on toy shapes (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from toy_tokenizers import bench_tokenizer

from ntl.bench.cases import expected_values, make_inputs, make_labels
from ntl.bench.harness import main
from ntl.bench.measure import cpu_measure, peak_from_events, summarize


@pytest.fixture(scope="module")
def toy_tok():
    """The bench tests' tokenizer (tests/support/toy_tokenizers.py): digits '0'..'9' at ids 20..29."""
    return bench_tokenizer()


def test_summarize_quartiles_by_hand():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median, t.q25, t.q75, t.min, t.max, t.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    t = summarize([10.0, 20.0, 30.0, 40.0])  # inclusive quartiles: 17.5 and 32.5
    assert (t.median, t.q25, t.q75) == (25.0, 17.5, 32.5)
    with pytest.raises(ValueError):
        summarize([])


def test_peak_from_events_replays_in_time_order():
    # running sum in time order: 100, 150, 50, 250, 0 -> peak 250 (given out of order)
    ev = [(3, 200), (0, 100), (4, -250), (1, 50), (2, -100)]
    assert peak_from_events(ev) == 250
    assert peak_from_events([(0, -64), (1, 32)]) == 0  # frees of older memory never go below 0


def test_cpu_memory_sees_a_known_allocation():
    x = torch.ones(1000, requires_grad=True)

    def fwd():  # forward allocates exactly one 1000 x 1000 fp32 temporary (4,000,000 bytes)
        return (x[None, :].expand(1000, 1000) * 2.0).sum()

    loss, timings, mem = cpu_measure(fwd, [x], repeats=2, warmup=1)
    assert float(loss) == 2_000_000.0
    assert 4_000_000 <= mem["fwd"] <= 4_000_000 + 65_536
    assert mem["fwd+bwd"] >= mem["fwd"]
    assert timings["fwd+bwd"].n == 2 and x.grad is None


def test_labels_and_expected_values(toy_tok):
    import ntl

    V = 64
    vocab = ntl.DigitVocab.from_tokenizer(toy_tok, vocab_size=V)
    ids = vocab.ids("cpu")
    lab = make_labels(200, V, ids, digit_frac=0.25, ignore_frac=0.05, seed=1)
    assert int(torch.isin(lab, ids).sum()) == 50 and int((lab == -100).sum()) == 10
    assert int(lab.max()) < V
    inp = make_inputs("logits", 200, V, torch.float32, torch.device("cpu"), vocab, digit_frac=0.25,
                      ignore_frac=0.05, hidden_size=8)
    exp = expected_values(inp)
    # independent values: torch's CE and ntl's own losses on the same logits
    ce = torch.nn.functional.cross_entropy(inp.logits.detach(), inp.labels)
    w1 = ntl.ntl_wasserstein_loss(inp.logits.detach(), inp.labels, vocab)
    mse = ntl.ntl_mse_loss(inp.logits.detach(), inp.labels, vocab)
    assert exp["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert exp["w1"] == pytest.approx(float(w1), rel=1e-5)
    assert exp["mse"] == pytest.approx(float(mse), rel=1e-5)
    assert exp["ce+w1"] == pytest.approx(float(ce) + 0.3 * float(w1), rel=1e-5)


def test_harness_end_to_end_toy(tmp_path, toy_tok, capsys):
    argv = ["--device", "cpu", "--n", "48", "--vocab-size", "64", "--hidden-size", "8",
            "--cases", "ntl-w1", "ce+ntl", "hidden",
            "--providers", "ntl", "torch-ref", "ntloss", "ce", "ntl-fused", "ce+ntloss-rw",
            "ntl-fused-inplace", "lm-head+ce", "ntl-from-hidden", "torch-compile",
            "--repeats", "2", "--out", str(tmp_path), "--name", "toy", "--no-plot", "--no-progress"]
    rc = main(argv, tokenizer=toy_tok)
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "toy.json").read_text())
    assert doc["schema"] == "ntl-bench/1" and doc["device"]["kind"] == "cpu"
    assert doc["device"]["name"] and {"torch", "ntl", "ntloss"} <= set(doc["versions"])
    assert doc["command"].startswith("ntl bench ") and doc["config"]["vocab_size"] == 64
    recs = {(r["case"], r["provider"]): r for r in doc["results"]}
    # torch.compile is GPU-only: reported as skipped with its reason, not silently dropped
    assert recs[("ntl-w1", "torch-compile")]["status"] == "skipped"
    assert "GPU" in recs[("ntl-w1", "torch-compile")]["reason"]
    ran = [r for r in doc["results"] if r["status"] == "ok"]
    assert {(r["case"], r["provider"]) for r in ran} >= {
        ("ntl-w1", "ntl"), ("ntl-w1", "ntloss"), ("ce+ntl", "ce"), ("ce+ntl", "ntl-fused"),
        ("ce+ntl", "ce+ntloss-rw"), ("ce+ntl", "ntl-fused-inplace"), ("hidden", "ntl-from-hidden")}
    for r in ran:
        if r.get("check"):  # every loss agrees with the float64 reference (ntloss included)
            assert r["check"]["ok"], r
        fb = r["modes"]["fwd+bwd"]
        assert fb["time_ms"]["median"] > 0 and fb["peak_mem_bytes"] >= 0
    ce = recs[("ce+ntl", "ce")]["modes"]["fwd+bwd"]
    assert ce["ratio_to_ce"] == pytest.approx(1.0)
    fused = recs[("ce+ntl", "ntl-fused")]["modes"]["fwd+bwd"]
    assert fused["ratio_to_ntl"] == pytest.approx(1.0)
    assert fused["ratio_to_ce"] == pytest.approx(fused["time_ms"]["median"] / ce["time_ms"]["median"])
    # the dense N x V fp32 gradient of the logits is allocated by every non-in-place provider
    assert ce["peak_mem_bytes"] >= 48 * 64 * 4
    tg = {t["id"]: t for t in doc["targets"]}
    assert tg["cpu-fused-time"]["status"] == "not measured (its providers did not all run at N=1024 float32)"
    assert tg["gpu-hidden-overhead"]["status"] == "not measured (needs a CUDA GPU)"
    md = (tmp_path / "toy.md").read_text()
    assert doc["device"]["name"] in md and "## Targets" in md and "ntl-fused" in md
    assert "| cpu-fused-time |" in md and "| gpu-hidden-overhead |" not in md  # GPU targets: one line
    assert "Not measured here, they need a CUDA GPU" in md and "`gpu-hidden-overhead`" in md
    assert "targets" in out and "ntl-fused" in out

    # --append: a second run on another N merges into the same file (a long GPU run in pieces)
    rc = main(["--device", "cpu", "--n", "32", "--vocab-size", "64", "--cases", "ce+ntl", "--providers", "ce",
               "ntl-fused", "--repeats", "1", "--out", str(tmp_path), "--name", "toy", "--append",
               "--no-plot", "--no-progress"], tokenizer=toy_tok)
    assert rc == 0
    merged = json.loads((tmp_path / "toy.json").read_text())
    keys = {(r["case"], r["provider"], r["N"]) for r in merged["results"] if r["status"] == "ok"}
    assert {("ce+ntl", "ntl-fused", 48), ("ce+ntl", "ntl-fused", 32), ("ntl-w1", "ntl", 48)} <= keys
    assert merged["mode"] == "merged" and len(merged["runs"]) == 2 and merged["config"]["Ns"] == [32, 48]
    r32 = next(r for r in merged["results"] if (r["provider"], r["N"]) == ("ntl-fused", 32))
    assert r32["modes"]["fwd+bwd"]["ratio_to_ce"] is not None


def test_cli_entry_points(capsys):
    from ntl.cli import main as cli_main

    assert cli_main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "ce+ntl" in out and "liger-ce" in out and "ntl-from-hidden" in out
