"""The ntloss-parity benchmark cases (``ntl.bench.parity``) on toy shapes: every provider runs,
every loss (ntl's and ntloss's) equals the float64 reference, the targets are evaluated from
the measured records; the reference itself is checked by hand. No timing assertions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from toy_tokenizers import bench_tokenizer

from ntl.bench import cases, harness, parity

PARITY = ["number-level", "predict", "dot-mae", "dot-huber", "w1-squash", "reweigh"]


@pytest.fixture(scope="module")
def toy_tok():
    """The bench tests' tokenizer (tests/support/toy_tokenizers.py): digits '0'..'9' at ids 20..29 and '.' at 40."""
    return bench_tokenizer((".",))


@pytest.fixture
def small_reweigh(monkeypatch):
    """The reweigh case at a toy shape (its real one is 16,384 x 10,000)."""
    monkeypatch.setitem(cases.CASES, "reweigh", dataclasses.replace(cases.CASES["reweigh"],
                                                                     fixed=(96, 300, 0.05, 0.0)))


def test_parity_cases_end_to_end(tmp_path, toy_tok, small_reweigh):
    N = parity.TARGET_SHAPES["cpu"][0]  # the CPU targets' N, at a toy V
    rc = harness.main(["--device", "cpu", "--n", str(N), "48", "--vocab-size", "64", "--cases", *PARITY,
                       "--dtype", "fp32", "bf16", "--repeats", "1", "--out", str(tmp_path), "--name", "toy",
                       "--no-plot", "--no-progress"], tokenizer=toy_tok)
    assert rc == 0
    doc = json.loads((tmp_path / "toy.json").read_text())
    everything = {(r["case"], r["provider"], r["N"], r["dtype"]): r for r in doc["results"]}
    for name in PARITY:
        case = cases.CASES[name]
        Ns = [96] if name == "reweigh" else [N, 48]
        for pr in case.providers:
            for n in Ns:
                for dt in ("float32", "bfloat16"):  # (ntloss's Huber needs its target cast in bf16)
                    r = everything[(name, pr.key, n, dt)]
                    assert r["status"] == "ok", r
                    assert r["check"] is not None and r["check"]["ok"], r  # ntl and ntloss alike
    # the fixed-shape case ran once per dtype (its own N), not once per --n
    assert {(n, dt) for (c, _, n, dt) in everything if c == "reweigh"} == {(96, "float32"), (96, "bfloat16")}
    recs = {(c, p, n): r for (c, p, n, dt), r in everything.items() if dt == "float32"}
    tg = {t["id"]: t for t in doc["targets"]}
    for case, mine, peer in parity.VERSUS:
        t = tg[f"cpu-{case}-{mine}-vs-{peer}"]
        want = (recs[(case, mine, N)]["modes"]["fwd+bwd"]["time_ms"]["median"]
                / recs[(case, peer, N)]["modes"]["fwd+bwd"]["time_ms"]["median"])
        assert t["status"] in ("pass", "fail") and t["measured"] == pytest.approx(want)
        assert tg[f"gpu-{case}-{mine}-vs-{peer}"]["status"].startswith("not measured")
    t = tg["cpu-reweigh-w1-fwdbwd-mem"]
    want = (recs[("reweigh", "w1-rw", 96)]["modes"]["fwd+bwd"]["peak_mem_bytes"]
            / recs[("reweigh", "w1", 96)]["modes"]["fwd+bwd"]["peak_mem_bytes"])
    assert t["status"] in ("pass", "fail") and t["measured"] == pytest.approx(want)
    assert t["threshold"] == 1.1 and tg["cpu-reweigh-mse-fwd"]["threshold"] == 3.0
    md = (tmp_path / "toy.md").read_text()
    assert "## number-level" in md and "cpu-predict-ntl-vs-ntloss" in md


def _inputs(logits, labels, tok, V):
    import ntl

    vocab = ntl.DigitVocab.from_tokenizer(tok, vocab_size=V)
    ids = vocab.ids("cpu")
    lut = torch.full((V,), -1, dtype=torch.long)
    lut[ids] = torch.arange(10)
    return cases.Inputs(labels.numel(), V, logits.dtype, torch.device("cpu"), 0, labels, ids,
                        vocab.values_on("cpu"), lut, logits=logits)


def test_number_level_reference_by_hand(toy_tok):
    """Labels 1 2 <w> 3 (numbers 12 and 3), logits putting all mass on the digits 1 3 / 3: the
    expected number is 13 vs 12 (L = 1/25) and 3 vs 3 (L = 0), mean 0.02; the mass is ~1 so the
    reweighed loss is the same; predict = mean(yhat) + mean(mass) over all four positions."""
    V = 48
    labels = torch.tensor([21, 22, 3, 23])
    x = torch.zeros(4, V)
    x[0, 21] = x[1, 23] = x[3, 23] = 100.0  # digits 1, 3, 3
    x[2, 5] = 100.0  # the text position: no mass on digits
    exp = parity.parity_expected(_inputs(x, labels, toy_tok, V))
    assert exp["nl"] == pytest.approx(0.02, abs=1e-9)
    assert exp["nl-rw"] == pytest.approx(0.02, abs=1e-9)
    # yhat: 1, 3, 4.5 (uniform over digits at the text position), 3; mass 1, 1, ~0, 1
    assert exp["predict"] == pytest.approx((1 + 3 + 4.5 + 3) / 4 + 3 / 4, abs=1e-6)
    # expected-value errors at the three digit labels (2 -> 3 is off by one): mae 1/3, huber 0.5/3
    assert exp["mae"] == pytest.approx(1 / 3, abs=1e-9)
    assert exp["huber"] == pytest.approx(0.5 / 3, abs=1e-9)
    # squash 5 on digits: distance 1 costs 1
    assert exp["sq"] == pytest.approx(1 / 3, abs=1e-9)


def test_reference_equals_ntloss_in_float64(toy_tok):
    """The hand-written float64 references equal ntloss run on float64 logits (random case)."""
    import ntloss

    V = 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, V, generator=g, dtype=torch.float64) * 2.0
    x[:, 20:30] += 2.0
    labels = torch.randint(0, 40, (60,), generator=g)
    labels[::7] = -100
    inp = _inputs(x, labels, toy_tok, V)
    exp = parity.parity_expected(inp)
    xb, yb = x[None], labels[None]
    nl = ntloss.NumberLevelLoss(toy_tok, vocab_size=V, reweigh=False)
    nl_rw = ntloss.NumberLevelLoss(toy_tok, vocab_size=V, reweigh=True)
    for obj in (nl, nl_rw):
        obj.powers_of_10 = obj.powers_of_10.double()
        # number_values: a buffer ntloss registers (register_buffer), unknown to the checker
        obj.number_values = obj.number_values.double()  # pyright: ignore[reportAttributeAccessIssue]
    # (1e-6: ntloss's eps is float64's here, the reference's fp32's, as in fp32 training)
    assert float(nl(xb, yb)) == pytest.approx(exp["nl"], rel=1e-6)
    assert float(nl_rw(xb, yb)) == pytest.approx(exp["nl-rw"], rel=1e-6)
    for key, fn in (("mae", torch.nn.functional.l1_loss), ("huber", torch.nn.functional.huber_loss)):
        for rw in (False, True):
            crit = ntloss.NTLossDotProduct(toy_tok, vocab_size=V, reweigh=rw, loss_function=fn)
            crit.number_values = crit.number_values.double()  # pyright: ignore[reportAttributeAccessIssue]
            assert float(crit(xb, yb)) == pytest.approx(exp[key + ("-rw" if rw else "")], rel=1e-9)
    for rw in (False, True):
        crit = ntloss.NTLoss(toy_tok, vocab_size=V, reweigh=rw, squash_factor=parity.SQUASH)
        crit.dist_lookup = crit.dist_lookup.double()
        assert float(crit(xb, yb)) == pytest.approx(exp["sq" + ("-rw" if rw else "")], rel=1e-9)
    dot = ntloss.NTLossDotProduct(toy_tok, vocab_size=V)
    dot.number_values = dot.number_values.double()  # pyright: ignore[reportAttributeAccessIssue]
    yhat, mass = dot.predict_numbers(xb)
    assert float(yhat.mean() + mass.mean()) == pytest.approx(exp["predict"], rel=1e-9)
