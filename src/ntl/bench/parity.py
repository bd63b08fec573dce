"""Benchmark cases for what an ``ntloss`` user moves over with, each against ``ntloss`` itself.

Cases (``--cases``; registered into :data:`ntl.bench.cases.CASES` on import, which the
harness does):

* ``number-level``: ``ntl.number_level_loss`` vs ``ntloss.NumberLevelLoss`` (reweigh off
  and on: ntloss's default is on).
* ``predict``: ``ntl.predict_numbers`` vs ``NTLossDotProduct.predict_numbers`` (the scalar
  timed is ``mean(yhat) + mean(mass)``).
* ``dot-mae`` / ``dot-huber``: ``ntl.ntl_dot_loss(error=...)`` vs
  ``NTLossDotProduct(loss_function=F.l1_loss | F.huber_loss)``.
* ``w1-squash``: ``ntl_wasserstein_loss(squash_factor=5)`` vs ``NTLoss(squash_factor=5)``, and
  the fused ``cross_entropy_with_ntl(squash_factor=5)`` vs ``F.cross_entropy + NTLoss``.
* ``reweigh``: issue 18.6's case at its own fixed shape (16,384 rows x V = 10,000, 1%
  number labels, fp32): the standalone losses with ``reweigh`` against without.

Every loss is checked against a float64 value computed here from the logits, independently
of both libraries (:func:`parity_expected`). Targets (:func:`parity_targets`): ntl at
least as fast as ntloss, fwd+bwd, on CPU at N = 512 fp32 and GPU at N = 16,384 bf16 (Qwen2.5
width); ``reweigh``: forward <= 3x and fwd+bwd <= 1.5x ``reweigh=False``, peak <= 1.1x.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .cases import (
    CASES,
    NTL_WEIGHT,
    Builder,
    Case,
    Ctx,
    Inputs,
    Provider,
    Unavailable,
    _ntl_attr,
    _req,
)

__all__ = ["PARITY_CASES", "SQUASH", "parity_expected", "parity_targets"]

#: squash_factor of the ``w1-squash`` case.
SQUASH = 5.0
#: (N, dtype) of the ntloss-comparison targets per device kind.
TARGET_SHAPES = {"cpu": (512, "float32"), "cuda": (16384, "bfloat16")}
_EPS32 = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------- float64 reference


def _stats(inp: Inputs) -> dict[str, Any]:
    """Per-row float64 quantities shared by the parity references (cached on ``inp``)."""
    cache = inp.__dict__.setdefault("_parity", {})
    if cache:
        return cache
    labels, values = inp.labels, inp.values.double()
    with torch.no_grad():
        x = inp.logits.detach()  # type: ignore[union-attr]
        z = x.index_select(-1, inp.ids).double()
        q = torch.softmax(z, -1)
        lse = torch.empty(inp.N, dtype=torch.float64, device=inp.device)
        for s in range(0, inp.N, 256):
            lse[s:s + 256] = torch.logsumexp(x[s:s + 256].double(), -1)
        mass = torch.exp(torch.logsumexp(z, -1) - lse)
    k = torch.where(labels >= 0, inp.lut[labels.clamp_min(0)], -1)
    cache.update(k=k, active=k >= 0, q=q, yhat=q @ values, y=values[k.clamp_min(0)], mass=mass,
                 values=values)
    return cache


def _mean_active(rows: torch.Tensor, active: torch.Tensor) -> float:
    return float(torch.where(active, rows, 0.0).sum() / max(int(active.sum()), 1))


def _number_level_ref(st: dict[str, Any], max_number_length: int = 20) -> tuple[float, float]:
    """``(loss, reweighed loss)`` of ``ntloss.NumberLevelLoss`` (float_level=False) by hand:
    numbers are maximal runs of digit labels, ``y = sum_t 10^p_t y_t`` (``p_t`` = digits after
    ``t``, clamped), the same for ``yhat`` from the expected digits, per number
    ``|yhat - y| / (|yhat| + |y| + eps)``; reweighed with the mass ``m`` at the first digit:
    ``m L + 1.01 (1 - m)``; means over numbers."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for i, kk in enumerate(st["k"].tolist()):
        if kk >= 0:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    if not runs:
        return 0.0, 0.0
    yhat, y, mass = st["yhat"].tolist(), st["y"].tolist(), st["mass"].tolist()
    plain = rw = 0.0
    for run in runs:
        n = len(run)
        p = [10.0 ** min(n - 1 - j, max_number_length - 1) for j in range(n)]
        Y = sum(pj * y[i] for pj, i in zip(p, run, strict=True))
        Yh = sum(pj * yhat[i] for pj, i in zip(p, run, strict=True))
        L = abs(Yh - Y) / (abs(Yh) + abs(Y) + _EPS32)
        m = mass[run[0]]
        plain += L
        rw += m * L + 1.01 * (1.0 - m)
    return plain / len(runs), rw / len(runs)


def parity_expected(inp: Inputs) -> dict[str, float]:
    """float64 values of the parity cases' losses (keys: ``nl``, ``nl-rw``, ``predict``,
    ``mae``, ``mae-rw``, ``huber``, ``huber-rw``, ``sq``, ``sq-rw``, ``ce+sq``; the last
    uses the harness's ``ce``). ``-rw``: ``m L + 1.01 D (1 - m)`` with ``D`` the loss's largest
    value (9, Huber(9) = 8.5, ``SQUASH``)."""
    if inp.logits is None:
        return {}
    st = _stats(inp)
    active, values, q, y, yhat, mass = (st[k] for k in ("active", "values", "q", "y", "yhat", "mass"))
    out: dict[str, float] = {}
    out["nl"], out["nl-rw"] = _number_level_ref(st)
    out["predict"] = float(yhat.mean() + mass.mean())
    r = yhat - y
    d = float(values.max() - values.min())
    dist = (values[None, :] - y[:, None]).abs()
    gaps = values[1:] - values[:-1]
    d_min = float(gaps[gaps > 0].min())
    sq = torch.where(dist > 0, 1.0 + (dist - d_min) * (SQUASH - 1.0) / (d - d_min), 0.0)
    rows = {"mae": (r.abs(), d), "huber": (torch.where(r.abs() < 1.0, 0.5 * r * r, r.abs() - 0.5),
                                           d - 0.5),
            "sq": ((q * sq).sum(-1), SQUASH)}
    for key, (loss, D) in rows.items():
        out[key] = _mean_active(loss, active)
        out[f"{key}-rw"] = _mean_active(mass * loss + 1.01 * D * (1.0 - mass), active)
    return out


# --------------------------------------------------------------------------- providers


def _ntloss_obj(ctx: Ctx, key: tuple, build: Callable[[Any], Any]) -> Any:
    key = ("parity", *key)
    if key not in ctx.cache:
        try:
            import ntloss
        except ImportError as e:
            raise Unavailable("ntloss is not installed (pip install ntloss)") from e
        ctx.cache[key] = build(ntloss)
    return ctx.cache[key]


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, *x.shape)


def _number_level() -> tuple[Provider, ...]:
    def b_ntl(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            from ntl.number_level import number_level_vocab

            f = _ntl_attr("number_level_loss")
            # resolved for the logits' V, as ntloss is given vocab_size=V (a toy V below the
            # tokenizer's length, as in gpu_check.sh --dry-run, would otherwise be refused)
            spec = number_level_vocab(ctx.tokenizer, ctx.V)
            return lambda: f(_batch(_req(inp.logits)), _batch(inp.labels), spec, reweigh=reweigh)
        return b

    def b_ntloss(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            crit = _ntloss_obj(ctx, ("nl", reweigh), lambda m: m.NumberLevelLoss(
                ctx.tokenizer, vocab_size=ctx.V, reweigh=reweigh))
            return lambda: crit(_batch(_req(inp.logits)), _batch(inp.labels))
        return b

    return (
        Provider("ntl", "ntl.number_level_loss", b_ntl(False), "nl"),
        Provider("ntloss", "ntloss.NumberLevelLoss(reweigh=False)", b_ntloss(False), "nl"),
        Provider("ntl-rw", "ntl.number_level_loss(reweigh=True)", b_ntl(True), "nl-rw"),
        Provider("ntloss-rw", "ntloss.NumberLevelLoss (default reweigh=True)", b_ntloss(True), "nl-rw"),
    )


def _predict() -> tuple[Provider, ...]:
    def b_ntl(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("predict_numbers")

        def run():
            yhat, mass = f(inp.logits, ctx.vocab)
            return yhat.mean() + mass.mean()
        return run

    def b_ntloss(ctx: Ctx, inp: Inputs):
        crit = _ntloss_obj(ctx, ("dot", "mse", False), lambda m: m.NTLossDotProduct(
            ctx.tokenizer, vocab_size=ctx.V, reweigh=False))

        def run():
            yhat, mass = crit.predict_numbers(_batch(_req(inp.logits)))
            return yhat.float().mean() + mass.float().mean()
        return run

    return (
        Provider("ntl", "ntl.predict_numbers", b_ntl, "predict"),
        Provider("ntloss", "ntloss NTLossDotProduct.predict_numbers", b_ntloss, "predict"),
    )


def _huber_same_dtype(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``F.huber_loss`` with the target cast to the input's dtype: ntloss 0.3.2 passes fp32
    targets with bf16/fp16 predictions, and ``huber_loss``'s backward then fails ("Found dtype
    Float but expected BFloat16"); fp32 is unchanged."""
    return F.huber_loss(input, target.to(input.dtype), reduction=reduction)


_huber_same_dtype.__name__ = "huber_loss"


def _dot(error: str) -> tuple[Provider, ...]:
    fn = {"mae": F.l1_loss, "huber": _huber_same_dtype}[error]

    def b_ntl(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("ntl_dot_loss")
            return lambda: f(inp.logits, inp.labels, ctx.vocab, error=error, reweigh=reweigh)
        return b

    def b_ntloss(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            crit = _ntloss_obj(ctx, ("dot", error, reweigh), lambda m: m.NTLossDotProduct(
                ctx.tokenizer, vocab_size=ctx.V, reweigh=reweigh, loss_function=fn))
            return lambda: crit(_batch(_req(inp.logits)), _batch(inp.labels))
        return b

    return (
        Provider("ntl", f'ntl.ntl_dot_loss(error="{error}")', b_ntl(False), error),
        Provider("ntloss", f"ntloss NTLossDotProduct(loss_function=F.{fn.__name__}, reweigh=False)",
                 b_ntloss(False), error),
        Provider("ntl-rw", f'ntl.ntl_dot_loss(error="{error}", reweigh=True)', b_ntl(True), f"{error}-rw"),
        Provider("ntloss-rw", f"ntloss NTLossDotProduct(loss_function=F.{fn.__name__}) (default reweigh)",
                 b_ntloss(True), f"{error}-rw"),
    )


def _squash() -> tuple[Provider, ...]:
    def b_ntl(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("ntl_wasserstein_loss")
            return lambda: f(inp.logits, inp.labels, ctx.vocab, squash_factor=SQUASH, reweigh=reweigh)
        return b

    def crit(ctx: Ctx, reweigh: bool) -> Any:
        return _ntloss_obj(ctx, ("w1", SQUASH, reweigh), lambda m: m.NTLoss(
            ctx.tokenizer, vocab_size=ctx.V, reweigh=reweigh, squash_factor=SQUASH))

    def b_ntloss(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            c = crit(ctx, reweigh)
            return lambda: c(_batch(_req(inp.logits)), _batch(inp.labels))
        return b

    def b_fused(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("cross_entropy_with_ntl")
        return lambda: f(inp.logits, inp.labels, ctx.vocab, ntl_weight=NTL_WEIGHT, squash_factor=SQUASH)

    def b_ce_ntloss(ctx: Ctx, inp: Inputs):
        c = crit(ctx, False)
        return lambda: (F.cross_entropy(_req(inp.logits), inp.labels)
                        + NTL_WEIGHT * c(_batch(_req(inp.logits)), _batch(inp.labels)))

    return (
        Provider("ntl", f"ntl.ntl_wasserstein_loss(squash_factor={SQUASH:g})", b_ntl(False), "sq"),
        Provider("ntloss", f"ntloss.NTLoss(squash_factor={SQUASH:g}, reweigh=False)", b_ntloss(False), "sq"),
        Provider("ntl-rw", f"ntl.ntl_wasserstein_loss(squash_factor={SQUASH:g}, reweigh=True)",
                 b_ntl(True), "sq-rw"),
        Provider("ntloss-rw", f"ntloss.NTLoss(squash_factor={SQUASH:g}) (default reweigh)", b_ntloss(True),
                 "sq-rw"),
        Provider("ntl-fused", f"ntl.cross_entropy_with_ntl(squash_factor={SQUASH:g})", b_fused, "ce+sq",
                 quick=False),
        Provider("ce+ntloss", f"F.cross_entropy + ntloss.NTLoss(squash_factor={SQUASH:g}, reweigh=False)",
                 b_ce_ntloss, "ce+sq", quick=False),
    )


def _reweigh() -> tuple[Provider, ...]:
    def b(method: str, reweigh: bool) -> Builder:
        def build(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("ntl_loss")
            return lambda: f(inp.logits, inp.labels, ctx.vocab, method=method, reweigh=reweigh)
        return build

    return (
        Provider("w1", "ntl.ntl_wasserstein_loss(reweigh=False)", b("wasserstein", False), "w1"),
        Provider("w1-rw", "ntl.ntl_wasserstein_loss(reweigh=True)", b("wasserstein", True), "w1-rw"),
        Provider("mse", "ntl.ntl_mse_loss(reweigh=False)", b("mse", False), "mse"),
        Provider("mse-rw", "ntl.ntl_mse_loss(reweigh=True)", b("mse", True), "mse-rw"),
    )


def _with_ce_sq(inp: Inputs) -> dict[str, float]:
    out = parity_expected(inp)
    ce = inp.__dict__.get("_parity_ce")
    if ce is None and inp.logits is not None:
        with torch.no_grad():
            valid = inp.labels != -100
            x = inp.logits.detach()
            nll = torch.empty(inp.N, dtype=torch.float64, device=inp.device)
            for s in range(0, inp.N, 256):
                xs = x[s:s + 256].double()
                nll[s:s + 256] = torch.logsumexp(xs, -1) - xs.gather(1, inp.labels[s:s + 256].clamp_min(0)[:, None])[:, 0]
            ce = inp.__dict__["_parity_ce"] = float(torch.where(valid, nll, 0.0).sum() / max(int(valid.sum()), 1))
    if ce is not None:
        out["ce+sq"] = ce + NTL_WEIGHT * out["sq"]
    return out


#: (N, V, digit_frac, ignore_frac) of the ``reweigh`` case (issue 18.6).
REWEIGH_SHAPE = (16_384, 10_000, 0.01, 0.0)

PARITY_CASES: tuple[Case, ...] = (
    Case("number-level", "number-level loss (ntloss.NumberLevelLoss) on logits [N, V]", "logits",
         _number_level(), "ntl", ("ce+ntl", "ce"), quick=False, expected=parity_expected),
    Case("predict", "predict_numbers (NTLossDotProduct.predict_numbers) on logits [N, V]", "logits",
         _predict(), "ntl", ("ce+ntl", "ce"), quick=False, expected=parity_expected),
    Case("dot-mae", "expected-value MAE (NTLossDotProduct(loss_function=F.l1_loss))", "logits",
         _dot("mae"), "ntl", ("ce+ntl", "ce"), quick=False, expected=parity_expected),
    Case("dot-huber", "expected-value Huber (NTLossDotProduct(loss_function=F.huber_loss))", "logits",
         _dot("huber"), "ntl", ("ce+ntl", "ce"), quick=False, expected=parity_expected),
    Case("w1-squash", f"W1 with squash_factor={SQUASH:g} (ntloss.NTLoss(squash_factor=...))", "logits",
         _squash(), "ntl", ("ce+ntl", "ce"), quick=False, expected=_with_ce_sq),
    Case("reweigh", "reweigh=True vs False, standalone losses, 16,384 x V=10,000, 1% number labels "
         "(issue 18.6)", "logits", _reweigh(), "w1", ("ce+ntl", "ce"), quick=False, fixed=REWEIGH_SHAPE),
)
CASES.update({c.name: c for c in PARITY_CASES})


# --------------------------------------------------------------------------- targets


def _rec(records: Sequence[dict[str, Any]], case: str, prov: str, N: int, dtype: str) -> dict | None:
    for r in records:
        if (r["case"], r["provider"], r["N"], r["dtype"]) == (case, prov, N, dtype) and r["status"] == "ok":
            return r
    return None


def _ratio(a: dict | None, b: dict | None, mode: str, field: str) -> float | None:
    if a is None or b is None:
        return None
    x, y = (r["modes"][mode][field] for r in (a, b))
    x, y = (v["median"] if isinstance(v, dict) else v for v in (x, y))
    return x / y if y and y > 0 else None


#: (case, ntl provider, ntloss provider) of the "at least as fast as ntloss" targets.
VERSUS = (("number-level", "ntl", "ntloss"), ("number-level", "ntl-rw", "ntloss-rw"),
          ("predict", "ntl", "ntloss"), ("dot-mae", "ntl", "ntloss"), ("dot-mae", "ntl-rw", "ntloss-rw"),
          ("dot-huber", "ntl", "ntloss"), ("dot-huber", "ntl-rw", "ntloss-rw"),
          ("w1-squash", "ntl", "ntloss"), ("w1-squash", "ntl-rw", "ntloss-rw"),
          ("w1-squash", "ntl-fused", "ce+ntloss"))


def parity_targets(records: Sequence[dict[str, Any]], device_kind: str) -> list[dict[str, Any]]:
    """The parity cases' targets in :func:`ntl.bench.report.evaluate_targets`' format."""
    out: list[dict[str, Any]] = []

    def add(tid: str, dev: str, desc: str, N: int, dtype: str, measured: float | None, op: str,
            threshold: float, detail: str) -> None:
        if dev != device_kind:
            status, measured = f"not measured (needs {'a CUDA GPU' if dev == 'cuda' else 'a CPU run'})", None
        elif measured is None or not math.isfinite(measured):
            status, measured = f"not measured (its providers did not all run at N={N} {dtype})", None
        else:
            status = "pass" if (measured <= threshold if op == "<=" else measured >= threshold) else "fail"
        out.append({"id": tid, "device": dev, "N": N, "dtype": dtype, "description": desc,
                    "measured": measured, "op": op, "threshold": threshold, "status": status,
                    "detail": detail})

    for dev, (N, dt) in TARGET_SHAPES.items():
        for case, mine, peer in VERSUS:
            ratio = _ratio(_rec(records, case, mine, N, dt), _rec(records, case, peer, N, dt), "fwd+bwd",
                           "time_ms")
            add(f"{'gpu' if dev == 'cuda' else dev}-{case}-{mine}-vs-{peer}", dev,
                f"{case}: {mine} fwd+bwd time / {peer} (ntl at least as fast as ntloss)", N, dt, ratio,
                "<=", 1.0, "medians of the same run")
    N = CASES["reweigh"].fixed[0] if CASES["reweigh"].fixed else REWEIGH_SHAPE[0]
    for method in ("w1", "mse"):
        on, off = (_rec(records, "reweigh", p, N, "float32") for p in (f"{method}-rw", method))
        for mode, field, thr, what in (("fwd", "time_ms", 3.0, "forward time"),
                                       ("fwd+bwd", "time_ms", 1.5, "fwd+bwd time"),
                                       ("fwd+bwd", "peak_mem_bytes", 1.1, "fwd+bwd peak memory")):
            tag = {"fwd": "fwd", "fwd+bwd": "fwdbwd"}[mode] + ("-mem" if field == "peak_mem_bytes" else "")
            add(f"cpu-reweigh-{method}-{tag}", "cpu",
                f"{method}: reweigh=True {what} / reweigh=False (16,384 x 10,000, 1% numbers; issue 18.6)",
                N, "float32", _ratio(on, off, mode, field), "<=", thr, "same run, interleaved")
    return out
