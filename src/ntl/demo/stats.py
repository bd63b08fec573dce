"""Statistics over training seeds: paired differences, t-intervals, plain-words verdicts.

Each seed is one experimental unit: every arm of a seed starts from the same weights and
sees the same data, so the natural comparison is the *paired* difference
``d_s = metric(arm, s) - metric(baseline, s)`` over the ``n`` seeds ``s``. Its 95 %
confidence interval is the Student-t interval::

    mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n),   sd with ddof = 1,

which assumes the per-seed differences are roughly normal; with ``n = 1`` there is no
interval. The verdict says "no detectable difference" whenever the interval covers 0.

Next to each interval goes the **minimum detectable difference** at these seeds (paired,
two-sided 95 %, 80 % power, from the observed ``sd`` of the differences)::

    MDD = (t_{0.975, n-1} + t_{0.80, n-1}) · sd(d) / sqrt(n)

the true mean difference that a repeat of the experiment with ``n`` seeds would find
"detectable" four times in five (the usual normal-approximation power formula with t
quantiles). An effect smaller than the MDD can hide inside "no detectable difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LEVEL",
    "POWER",
    "describe",
    "mdd",
    "paired_differences",
    "position_in_range",
    "t_critical",
    "t_interval",
    "t_quantile",
    "verdict",
]

LEVEL = 0.95
POWER = 0.80


def _t_central_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4):
    with ``θ = atan(t / √df)``, odd ``df``: ``(2/π)(θ + sin θ Σ_j c_j cos^{2j+1} θ)``,
    ``c_0 = 1``, ``c_j = c_{j-1}·2j/(2j+1)``, ``j < (df-1)/2``; even ``df``:
    ``sin θ Σ_j c_j cos^{2j} θ``, ``c_0 = 1``, ``c_j = c_{j-1}(2j-1)/(2j)``, ``j < df/2``."""
    th = math.atan(t / math.sqrt(df))
    s, c = math.sin(th), math.cos(th)
    if df % 2:
        term, total = c, 0.0
        for j in range((df - 1) // 2):
            total += term
            term *= c * c * (2 * j + 2) / (2 * j + 3)
        return 2.0 / math.pi * (th + s * total) if df > 1 else 2.0 * th / math.pi
    term, total = 1.0, 0.0
    for j in range(df // 2):
        total += term
        term *= c * c * (2 * j + 1) / (2 * j + 2)
    return s * total


def t_critical(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t critical value ``t_{(1+level)/2, df}`` (what ``scipy.stats.t.ppf``
    gives), without scipy: bisection on the exact integer-``df`` central mass
    :func:`_t_central_mass` to ~1e-12."""
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    lo, hi = 0.0, 1.0
    while _t_central_mass(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_central_mass(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` (``scipy.stats.t.ppf(p, df)``),
    without scipy: for ``p > 1/2`` the two-sided critical value at level ``2p - 1``
    (:func:`t_critical`), by symmetry for ``p < 1/2``, 0 at ``p = 1/2``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    if p == 0.5:
        t_critical(df)  # the df check
        return 0.0
    t = t_critical(df, 2.0 * abs(p - 0.5))
    return t if p > 0.5 else -t


def mdd(sd: float, n: int, level: float = LEVEL, power: float = POWER) -> float | None:
    """Minimum detectable difference of a paired, two-sided t-test over ``n`` seeds:
    ``(t_{(1+level)/2, n-1} + t_{power, n-1}) · sd / sqrt(n)`` (``None`` for ``n < 2``)."""
    if n < 2:
        return None
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power!r}")
    return (t_critical(n - 1, level) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def describe(xs: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std (ddof = 1; 0.0 for one value), min, max and n of the non-None values."""
    vals = [float(x) for x in xs if x is not None]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    m = sum(vals) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(vals), "max": max(vals), "n": n}


def t_interval(xs: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """:func:`describe` plus the t-interval of the mean: ``lo``, ``hi`` (``None`` for n < 2)
    and ``level``, and the minimum detectable difference ``mdd`` at 80 % power (:func:`mdd`;
    ``None`` for n < 2); the per-seed ``values`` are kept."""
    d = describe(xs)
    d["values"] = [None if x is None else float(x) for x in xs]
    d["level"] = level
    n = d["n"]
    if n < 2:
        d["lo"] = d["hi"] = d["mdd"] = None
        return d
    d["mdd"] = mdd(d["std"], n, level)
    half = t_critical(n - 1, level) * d["std"] / math.sqrt(n)
    d["lo"], d["hi"] = d["mean"] - half, d["mean"] + half
    return d


def paired_differences(values: dict[str, Sequence[float | None]], baseline: str,
                       level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """``{arm: t_interval(arm_s - baseline_s over seeds s)}`` for every arm but ``baseline``.

    ``values[arm]`` lists one metric value per seed, in the same seed order for every arm;
    a seed where either value is None is left out of that arm's differences.
    """
    if baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not among the arms {sorted(values)}")
    base = list(values[baseline])
    out = {}
    for arm, xs in values.items():
        if arm == baseline:
            continue
        xs = list(xs)
        if len(xs) != len(base):
            raise ValueError(f"arm {arm!r} has {len(xs)} seeds, baseline {baseline!r} {len(base)}")
        ds = [None if x is None or b is None else x - b for x, b in zip(xs, base, strict=True)]
        out[arm] = t_interval(ds, level)
    return out


def _num(x: float, decimals: int) -> str:
    return f"{x:+.{decimals}f}"


def verdict(arm: str, baseline: str, metric: str, diff: dict[str, Any], *,
            higher_is_better: bool | None, decimals: int = 3) -> str:
    """One sentence on ``diff`` (a :func:`t_interval` of paired differences).

    * n < 2: "one seed: ... (no interval; run more seeds)";
    * the interval covers 0: "no detectable difference" (with the MDD when known);
    * otherwise "higher"/"lower", and whether that is better or worse (neither when
      ``higher_is_better`` is ``None``, e.g. the digit entropy).
    """
    n = diff["n"]
    if n == 0:
        return f"{arm} vs {baseline}, {metric}: no data"
    m = diff["mean"]
    if n < 2:
        return (f"{arm} vs {baseline}, {metric}: {_num(m, decimals)} with one seed "
                "(no interval; use --seeds 0 1 2 3 4 for one)")
    lo, hi = diff["lo"], diff["hi"]
    ci = (f"{_num(m, decimals)}, {100 * diff['level']:.0f}% CI [{_num(lo, decimals)}, "
          f"{_num(hi, decimals)}], {n} seeds")
    if diff.get("mdd") is not None:
        ci += f", MDD {diff['mdd']:.{decimals}f}"
    if lo <= 0.0 <= hi:
        return f"{arm} vs {baseline}, {metric}: no detectable difference ({ci})"
    up = lo > 0.0
    word = "higher" if up else "lower"
    if higher_is_better is None:
        return f"{arm} vs {baseline}, {metric}: {word} ({ci})"
    better = up == higher_is_better
    return f"{arm} vs {baseline}, {metric}: {word}, {'better' if better else 'worse'} ({ci})"


def position_in_range(value: float | None, lo: float | None, hi: float | None) -> str:
    """Where ``value`` sits against a committed range ``[lo, hi]``: "inside", "below", "above"
    (or "n/a" when any of them is missing)."""
    if value is None or lo is None or hi is None:
        return "n/a"
    if value < lo:
        return "below"
    if value > hi:
        return "above"
    return "inside"
