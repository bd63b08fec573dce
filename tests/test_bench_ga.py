"""The benchmark's GPU targets against Liger (issue 29): fused CE+NTL <= 1.0x Liger's CE with
``grad_out == 1`` and <= 0.75x in a gradient-accumulation step (``loss / k``; ntl with
``grad_scale=1/k``). On CPU the ``-ga`` providers are "GPU only" and the targets "not
measured"; their arithmetic and the GA provider's value and gradient are checked here."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import ntl
from ntl.bench import report
from ntl.bench.cases import CASES, GA_STEPS, NTL_WEIGHT, Ctx, expected_values, make_inputs

N, DT = 16384, "bfloat16"
HAS_GRAD_SCALE = "grad_scale" in inspect.signature(ntl.cross_entropy_with_ntl).parameters


def _rec(prov: str, ms: float | None) -> dict:
    if ms is None:
        return {"case": "ce+ntl", "provider": prov, "N": N, "dtype": DT, "status": "skipped", "reason": "x"}
    return {"case": "ce+ntl", "provider": prov, "N": N, "dtype": DT, "status": "ok",
            "modes": {"fwd+bwd": {"time_ms": {"median": ms}, "peak_mem_bytes": 100}}}


def _targets(records, kind="cuda") -> dict:
    return {t["id"]: t for t in report.evaluate_targets(records, kind, {})}


@pytest.mark.parametrize(("ntl_ms", "ntl_ga_ms", "unit", "ga"), [
    (9.9, 7.4, "pass", "pass"), (10.0, 7.5, "pass", "pass"), (10.1, 7.6, "fail", "fail"),
    (9.0, 9.0, "pass", "fail")])
def test_liger_targets_thresholds(ntl_ms, ntl_ga_ms, unit, ga):
    """Liger CE 10 ms with grad_out == 1 and in a GA step: thresholds 1.0x and 0.75x."""
    recs = [_rec("liger-ce", 10.0), _rec("ntl-fused-inplace", ntl_ms), _rec("liger-ce-ga", 10.0),
            _rec("ntl-fused-inplace-ga", ntl_ga_ms)]
    tg = _targets(recs)
    assert tg["gpu-fused-vs-liger-time"]["threshold"] == 1.0
    assert tg["gpu-fused-vs-liger-time"]["status"] == unit
    assert "grad_out == 1" in tg["gpu-fused-vs-liger-time"]["description"]
    t = tg["gpu-fused-vs-liger-ga-time"]
    assert t["threshold"] == 0.75 and t["op"] == "<=" and t["status"] == ga
    assert t["measured"] == pytest.approx(ntl_ga_ms / 10.0)
    assert f"grad_scale=1/{GA_STEPS}" in t["description"]


def test_ga_target_not_measured_without_its_providers():
    tg = _targets([_rec("liger-ce", 10.0), _rec("ntl-fused-inplace", 9.0), _rec("liger-ce-ga", None)])
    assert tg["gpu-fused-vs-liger-ga-time"]["status"].startswith("not measured (needs liger_kernel")
    assert _targets([], "cpu")["gpu-fused-vs-liger-ga-time"]["status"] == "not measured (needs a CUDA GPU)"


def test_ga_providers_are_gpu_only_in_place_and_checked_against_k():
    provs = {p.key: p for p in CASES["ce+ntl"].providers}
    for key, expect in (("ntl-fused-inplace-ga", "ce+w1/ga"), ("liger-ce-ga", "ce/ga")):
        p = provs[key]
        assert p.gpu_only and p.inplace and p.expect == expect, p
    assert GA_STEPS > 1 and (GA_STEPS & (GA_STEPS - 1)) == 0  # 1/k exact: grad_out == grad_scale bitwise


def _toy_inputs(V=64, N=40):
    vocab = ntl.DigitVocab(list(range(20, 30)), vocab_size=V)
    inp = make_inputs("logits", N, V, torch.float32, torch.device("cpu"), vocab, digit_frac=0.3,
                      ignore_frac=0.1, hidden_size=8, seed=3)
    return vocab, inp


def test_expected_values_of_a_ga_step():
    _, inp = _toy_inputs()
    exp = expected_values(inp)
    ce = F.cross_entropy(inp.logits.detach().double(), inp.labels)
    assert exp["ce/ga"] == pytest.approx(float(ce) / GA_STEPS, rel=1e-12)
    assert exp["ce+w1/ga"] == pytest.approx(exp["ce+w1"] / GA_STEPS, rel=1e-12)
    assert exp["ce+w1"] == pytest.approx(float(ce) + NTL_WEIGHT * exp["w1"], rel=1e-12)


@pytest.mark.skipif(not HAS_GRAD_SCALE, reason="cross_entropy_with_ntl has no grad_scale= yet (issue 29.3, "
                                               "the kernels branch): runs once both are merged")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ga_provider_value_and_gradient(backend, monkeypatch):
    """The GA provider's step (CPU, both backends): loss == (CE + 0.3 W1) / k and the gradient
    equals the plain fused path's divided by k."""
    vocab, inp = _toy_inputs()
    orig = ntl.cross_entropy_with_ntl
    monkeypatch.setattr(ntl, "cross_entropy_with_ntl", lambda *a, **k: orig(*a, backend=backend, **k))
    prov = next(p for p in CASES["ce+ntl"].providers if p.key == "ntl-fused-inplace-ga")
    fwd = prov.build(Ctx(None, vocab, inp.V), inp)
    x0 = inp.logits.detach().clone()
    loss = fwd()
    loss.backward()
    exp = expected_values(_toy_inputs()[1])  # the same seed: the logits before the in-place call
    assert float(loss.detach()) == pytest.approx(exp["ce+w1/ga"], rel=1e-5)
    ref = x0.clone().requires_grad_(True)
    (orig(ref, inp.labels, vocab, backend="torch") / GA_STEPS).backward()
    torch.testing.assert_close(inp.logits.grad, ref.grad, rtol=1e-5, atol=1e-7)
