"""Benchmark cases for NTL's rivals, DEL and DIST², side by side with NTL-W1 (issue 28.6).

Cases (``--cases``; registered into :data:`ntl.bench.cases.CASES` on import, which the
harness does):

* ``rivals``: standalone ``ntl.ntl_loss(method=...)`` on ``logits [N, V]``: ``w1``
  (``"wasserstein"``, the baseline the "x ntl" ratios refer to), ``del`` (``ntl.methods.DEL()``,
  place weights from the labels: one sequence of ``N`` labels), ``dist2`` (``DIST2(tau=1)``).
* ``ce+rivals``: ``ntl.cross_entropy_with_ntl(ntl_weight=0.3, method=...)``, the fused CE +
  NTL, for the same three methods (``w1`` the baseline), and ``ce`` (``F.cross_entropy``
  alone, the "x CE" baseline).

The providers of a case run interleaved (round-robin), so load changes on a shared machine hit
W1 and its rivals alike. Every loss is checked against a float64 value computed here from the
logits (:func:`rivals_expected`), with DEL's place weights found by walking the labels (a run
of number-token labels is a number; a token's integer place is the digits written after it in
its run; ``w = 2 (p + 1)``; no decimal point: the bench passes a vocab, not a tokenizer).
Targets (:func:`rivals_targets`): CPU, N = 1024, fp32: each rival's fwd+bwd time within 1.1x
of NTL-W1's, fused and standalone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .cases import CASES, NTL_WEIGHT, Builder, Case, Ctx, Inputs, Provider, _first, _ntl_attr, _req

__all__ = ["METHODS", "RIVALS_CASES", "TARGET_SHAPE", "place_weights_by_hand", "rivals_expected",
           "rivals_targets"]

#: provider key -> ``ntl`` method name; ``w1`` first (the baseline).
METHODS = {"w1": "wasserstein", "del": "del", "dist2": "dist2"}
#: (N, dtype) of the CPU targets: each rival <= 1.1x NTL-W1's fwd+bwd time.
TARGET_SHAPE = (1024, "float32")
TARGET_RATIO = 1.1


# --------------------------------------------------------------------------- float64 reference


def place_weights_by_hand(k: list[int], widths: list[int]) -> list[float]:
    """DEL's place weights of one sequence, by a walk over it: ``k[i]`` the number index of
    label ``i`` (``-1``: not a number token), ``widths[k]`` the digits token ``k`` writes.
    Runs of number tokens are numbers; a token's place is the digits written after it in its
    run; ``w = 2 (place + 1)`` (1 off the numbers)."""
    out = [1.0] * len(k)
    after = 0
    for i in range(len(k) - 1, -1, -1):  # right to left: digits written after i in its run
        if k[i] < 0:
            after = 0
            continue
        out[i] = 2.0 * (after + 1)
        after += widths[k[i]]
    return out


def _widths(inp: Inputs) -> list[int]:
    if inp.widths is not None:
        return list(inp.widths)
    if any(v != int(v) or not 0 <= v <= 9 for v in inp.values.tolist()):
        raise ValueError("DEL's place weights need the number tokens' widths (a vocab with texts)")
    return [1] * len(inp.ids)  # digits: every number token writes one digit


def rivals_expected(inp: Inputs) -> dict[str, float]:
    """Float64 ``del``, ``dist2`` and ``ce+del``, ``ce+dist2`` (``ce`` in float64, a chunk of rows
    at a time), means over the number-token labels (DEL's place weights multiply the terms,
    not the count)."""
    cache = inp.__dict__.setdefault("_rivals", {})
    if cache:
        return cache
    labels, lut, values = inp.labels, inp.lut, inp.values.double()
    k = torch.where(labels >= 0, lut[labels.clamp_min(0)], -1)
    active = k >= 0
    n = max(int(active.sum()), 1)
    kc = k.clamp_min(0)
    with torch.no_grad():
        z = _req(inp.logits).detach().index_select(-1, inp.ids).double()
        K = z.shape[-1]
        q = torch.softmax(z, -1)
        onehot = F.one_hot(kc, K).double()
        bce = F.softplus(z) - onehot * z  # BCE(sigmoid(z_k), [k = y])
        pw = torch.tensor(place_weights_by_hand(k.tolist(), _widths(inp)), dtype=torch.float64,
                          device=z.device)
        dl = pw * (q * bce).sum(-1) / K
        y = values[kc]
        logt = torch.log_softmax(-(values[None] - y[:, None]).square(), -1)  # tau = 1
        d2 = (logt.exp() * (logt - torch.log_softmax(z, -1))).sum(-1)
        cache["del"] = float(torch.where(active, dl, 0.0).sum() / n)
        cache["dist2"] = float(torch.where(active, d2, 0.0).sum() / n)
        x = _req(inp.logits).detach()
        valid = labels != -100
        nll = torch.empty(inp.N, dtype=torch.float64, device=inp.device)
        for s in range(0, inp.N, 256):
            xs = x[s:s + 256].double()
            nll[s:s + 256] = torch.logsumexp(xs, -1) - xs.gather(1, labels[s:s + 256].clamp_min(0)[:, None])[:, 0]
        ce = float(torch.where(valid, nll, 0.0).sum() / max(int(valid.sum()), 1))
    for m in ("del", "dist2"):
        cache[f"ce+{m}"] = ce + NTL_WEIGHT * cache[m]
    return cache


# --------------------------------------------------------------------------- providers


def _standalone() -> tuple[Provider, ...]:
    def b(method: str) -> Builder:
        def build(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("ntl_loss")
            return lambda: f(inp.logits, inp.labels, ctx.vocab, method=method)
        return build

    return tuple(Provider(key, f"ntl.ntl_loss(method={m!r})", b(m), key) for key, m in METHODS.items())


def _fused() -> tuple[Provider, ...]:
    def b(method: str) -> Builder:
        def build(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("cross_entropy_with_ntl")
            return lambda: _first(f(inp.logits, inp.labels, ctx.vocab, ntl_weight=NTL_WEIGHT, method=method))
        return build

    def b_ce(ctx: Ctx, inp: Inputs):
        return lambda: F.cross_entropy(_req(inp.logits), inp.labels)

    return (*(Provider(key, f"ntl.cross_entropy_with_ntl(method={m!r})", b(m), f"ce+{key}")
              for key, m in METHODS.items()),
            Provider("ce", "F.cross_entropy alone", b_ce, "ce"))


RIVALS_CASES: tuple[Case, ...] = (
    Case("rivals", "Standalone NTL-W1, DEL and DIST² (ntl.ntl_loss) on logits [N, V]", "logits",
         _standalone(), "w1", ("ce+rivals", "ce"), quick=False, expected=rivals_expected, any_vocab=True),
    Case("ce+rivals", f"Cross-entropy + {NTL_WEIGHT} x NTL-W1, DEL, DIST² (cross_entropy_with_ntl) on "
         "logits [N, V]", "logits", _fused(), "w1", ("ce+rivals", "ce"), quick=False,
         expected=rivals_expected, any_vocab=True),
)
CASES.update({c.name: c for c in RIVALS_CASES})


# --------------------------------------------------------------------------- targets


def _time(records: Sequence[dict[str, Any]], case: str, prov: str, N: int, dtype: str) -> float | None:
    for r in records:
        if (r["case"], r["provider"], r["N"], r["dtype"]) == (case, prov, N, dtype) and r["status"] == "ok":
            return r["modes"]["fwd+bwd"]["time_ms"]["median"]
    return None


def rivals_targets(records: Sequence[dict[str, Any]], device_kind: str) -> list[dict[str, Any]]:
    """Each rival's fwd+bwd time / NTL-W1's, fused and standalone, CPU at :data:`TARGET_SHAPE`
    (in :func:`ntl.bench.report.evaluate_targets`' format)."""
    out: list[dict[str, Any]] = []
    N, dt = TARGET_SHAPE
    for case, what in (("ce+rivals", "fused CE+NTL (cross_entropy_with_ntl)"), ("rivals", "standalone ntl_loss")):
        base = _time(records, case, "w1", N, dt)
        for key in ("del", "dist2"):
            mine = _time(records, case, key, N, dt)
            measured = mine / base if mine is not None and base else None
            if device_kind != "cpu":
                status, measured = "not measured (needs a CPU run)", None
            elif measured is None or not math.isfinite(measured):
                status, measured = f"not measured (its providers did not all run at N={N} {dt})", None
            else:
                status = "pass" if measured <= TARGET_RATIO else "fail"
            out.append({"id": f"cpu-{case}-{key}-vs-w1", "device": "cpu", "N": N, "dtype": dt,
                        "description": f"{what}: {METHODS[key]} fwd+bwd time / wasserstein (issue 28.6)",
                        "measured": measured, "op": "<=", "threshold": TARGET_RATIO, "status": status,
                        "detail": "medians of the same run, interleaved"})
    return out
