"""The ``rivals`` / ``ce+rivals`` benchmark cases (DEL and DIST² beside NTL-W1, issue 28.6) on toy
shapes: every provider runs and matches the bench's float64 reference, the reference agrees with
ntl's own losses (two independent implementations), DEL's place weights by hand, the targets are
the ratios of the measured medians. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from toy_tokenizers import bench_tokenizer

import ntl
from ntl.bench import cases, harness, rivals

DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def toy_tok():
    """The bench tests' tokenizer (tests/support/toy_tokenizers.py): digits '0'..'9' at ids 20..29."""
    return bench_tokenizer()


def test_place_weights_by_hand():
    # runs: [3 5] -> places 1, 0; [2] -> 0; [7 8 9] -> 2, 1, 0; w = 2 (p + 1), 1 off numbers
    k = [-1, 3, 5, -1, 2, -1, 7, 8, 9]
    assert rivals.place_weights_by_hand(k, [1] * 10) == [1, 4, 2, 1, 2, 1, 6, 4, 2]
    # multi-digit tokens: '123' '4' -> the '123' token's lowest digit sits at place 1
    assert rivals.place_weights_by_hand([0, 1], [3, 1]) == [4, 2]
    assert rivals.place_weights_by_hand([1, 0], [3, 1]) == [8, 2]


@pytest.mark.parametrize("multi", [False, True])
def test_expected_values_agree_with_ntl(toy_tok, multi):
    V, N = 64, 300
    if multi:  # 13 number tokens, '10'..'12' two digits wide (the place weights read the widths)
        ids = [*range(20, 30), 40, 41, 42]
        texts = [*DIGITS, "10", "11", "12"]
        vocab = ntl.NumberVocab(ids, [float(t) for t in texts], V, texts=texts)
    else:
        vocab = ntl.DigitVocab.from_tokenizer(toy_tok, vocab_size=V)
    inp = cases.make_inputs("logits", N, V, torch.float32, torch.device("cpu"), vocab, digit_frac=0.4,
                            ignore_frac=0.05, hidden_size=8, seed=3)
    assert inp.widths == vocab.widths
    exp = rivals.rivals_expected(inp)
    x = inp.logits.detach()
    num = torch.isin(inp.labels, vocab.ids("cpu"))
    runs = num[1:] & num[:-1]
    assert int(runs.sum()) > 10  # multi-token numbers occur, so place weights differ from 1
    for m in ("del", "dist2"):
        core = ntl.ntl_loss(x, inp.labels, vocab, method=m)
        assert exp[m] == pytest.approx(float(core), rel=1e-5)
        ce = F.cross_entropy(x, inp.labels)
        assert exp[f"ce+{m}"] == pytest.approx(float(ce) + 0.3 * float(core), rel=1e-5)
    # the place weights matter: DEL without them is another value
    flat = ntl.ntl_loss(x, inp.labels, vocab, method=ntl.methods.DEL(place_weights=False))
    assert abs(exp["del"] - float(flat)) > 0.05 * abs(exp["del"])


def test_rivals_cases_end_to_end(tmp_path, toy_tok):
    N, _ = rivals.TARGET_SHAPE
    rc = harness.main(["--device", "cpu", "--n", str(N), "--vocab-size", "64", "--cases", "rivals",
                       "ce+rivals", "--repeats", "2", "--out", str(tmp_path), "--name", "toy", "--no-plot",
                       "--no-progress"], tokenizer=toy_tok)
    assert rc == 0
    doc = json.loads((tmp_path / "toy.json").read_text())
    recs = {(r["case"], r["provider"]): r for r in doc["results"]}
    assert set(recs) == {("rivals", p) for p in ("w1", "del", "dist2")} | {
        ("ce+rivals", p) for p in ("w1", "del", "dist2", "ce")}
    for r in recs.values():
        assert r["status"] == "ok" and r["check"]["ok"], r
    med = {k: r["modes"]["fwd+bwd"]["time_ms"]["median"] for k, r in recs.items()}
    tg = {t["id"]: t for t in doc["targets"]}
    for case in ("rivals", "ce+rivals"):
        assert recs[(case, "w1")]["modes"]["fwd+bwd"]["ratio_to_ntl"] == pytest.approx(1.0)
        for key in ("del", "dist2"):
            t = tg[f"cpu-{case}-{key}-vs-w1"]
            assert t["status"] in ("pass", "fail") and t["threshold"] == 1.1
            assert t["measured"] == pytest.approx(med[(case, key)] / med[(case, "w1")])
            assert recs[(case, key)]["modes"]["fwd+bwd"]["ratio_to_ntl"] == pytest.approx(t["measured"])
    ce = med[("ce+rivals", "ce")]
    assert recs[("ce+rivals", "del")]["modes"]["fwd+bwd"]["ratio_to_ce"] == pytest.approx(
        med[("ce+rivals", "del")] / ce)
    md = (tmp_path / "toy.md").read_text()
    assert "## rivals" in md and "## ce+rivals" in md and "cpu-ce+rivals-dist2-vs-w1" in md


def test_rivals_targets_not_measured_without_the_records():
    out = rivals.rivals_targets([], "cpu")
    assert len(out) == 4 and all(t["status"].startswith("not measured") for t in out)
    assert all(t["status"] == "not measured (needs a CPU run)" for t in rivals.rivals_targets([], "cuda"))
