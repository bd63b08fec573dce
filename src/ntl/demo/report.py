"""The demo's reporting: aggregation over seeds, the printed table, the plot."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("ntl")

__all__ = ["aggregate", "format_table", "paired_deltas", "plot_results"]

METRICS = ("exact_match", "digit_accuracy", "mae", "median_ae", "unparsable")
_HEAD = {
    "exact_match": "exact",
    "digit_accuracy": "digit acc",
    "mae": "MAE",
    "median_ae": "median AE",
    "unparsable": "unparsable",
}


def _mean_std(xs: Sequence[float | None]) -> dict[str, float | int | None]:
    vals = [float(x) for x in xs if x is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(vals)}


def aggregate(runs: Sequence[dict[str, Any]], arms: Sequence[str],
              groups: Sequence[str]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) over seeds of every
    metric, per arm and group (``all`` and each operation)."""
    out: dict[str, Any] = {}
    for arm in arms:
        out[arm] = {}
        for g in groups:
            out[arm][g] = {
                m: _mean_std([r["arms"][arm]["metrics"][g][m] for r in runs]) for m in METRICS
            }
    return out


def paired_deltas(runs: Sequence[dict[str, Any]], arms: Sequence[str], groups: Sequence[str],
                  baseline: str = "CE") -> dict[str, Any]:
    """Per seed ``metric(arm) - metric(baseline)`` (same seed, same data), mean ± std over
    seeds, for every non-baseline arm, group and metric."""
    out: dict[str, Any] = {}
    for arm in arms:
        if arm == baseline:
            continue
        out[arm] = {}
        for g in groups:
            out[arm][g] = {}
            for m in METRICS:
                ds = []
                for r in runs:
                    x, y = r["arms"][arm]["metrics"][g][m], r["arms"][baseline]["metrics"][g][m]
                    ds.append(None if x is None or y is None else x - y)
                out[arm][g][m] = _mean_std(ds)
    return out


def _fmt(stat: dict[str, Any], metric: str, with_std: bool) -> str:
    m, sd = stat["mean"], stat["std"]
    if m is None:
        return "n/a"
    if metric in ("mae", "median_ae"):
        s = f"{m:.1f}" if m < 1000 else f"{m:.0f}"
        return f"{s} ± {sd:.1f}" if with_std else s
    s = f"{m:.3f}"
    return f"{s} ± {sd:.3f}" if with_std else s


def format_table(agg: dict[str, Any], arms: Sequence[str], groups: Sequence[str],
                 n_seeds: int) -> str:
    """A plain-text (markdown-compatible) table: one row per (group, arm)."""
    with_std = n_seeds > 1
    cols = ["problems", "arm", *(_HEAD[m] for m in METRICS)]
    rows = []
    for g in groups:
        for arm in arms:
            rows.append([g, arm, *(_fmt(agg[arm][g][m], m, with_std) for m in METRICS)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    if k <= 1 or len(xs) < k:
        return list(xs)
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_results(runs: Sequence[dict[str, Any]], agg: dict[str, Any], arms: Sequence[str],
                 path: str) -> str | None:
    """Write ``results.png``: training CE part and total loss per arm (first seed,
    smoothed), exact/digit accuracy and unparsable bars, MAE bars (mean ± std over
    seeds). Returns the path, or ``None`` (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: results.png not written "
                    "(pip install 'ntl[demo]')")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    run = runs[0]
    ax = axes[0]
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    for a in arms:
        h = run["arms"][a]["train"]["history"]
        k = max(1, len(h["ce"]) // 40)
        ax.plot(_smooth(h["ce"], k), color=colors[a], label=f"{a}: CE part")
        if any(w != c for w, c in zip(h["loss"], h["ce"], strict=False)):
            ax.plot(_smooth(h["loss"], k), color=colors[a], ls="--", alpha=0.7,
                    label=f"{a}: total (CE + w·NTL)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(f"training loss (seed {run['seed']})")
    ax.legend(fontsize=7)

    x = list(range(len(arms)))
    n_seeds = len(runs)

    def err(vals: list[float]) -> list[float] | None:
        return vals if n_seeds > 1 else None

    ax = axes[1]
    bw = 0.27
    for j, m in enumerate(("exact_match", "digit_accuracy", "unparsable")):
        means = [agg[a]["all"][m]["mean"] or 0.0 for a in arms]
        stds = [agg[a]["all"][m]["std"] or 0.0 for a in arms]
        ax.bar([i + (j - 1) * bw for i in x], means, bw, yerr=err(stds), label=_HEAD[m],
               capsize=3)
    ax.set_xticks(x, list(arms))
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy (all problems)"
                 + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ""))
    ax.legend(fontsize=8)

    ax = axes[2]
    groups = [g for g in next(iter(agg.values())) if g != "all"] or ["all"]
    bw = 0.8 / max(1, len(groups))
    for j, g in enumerate(groups):
        means = [agg[a][g]["mae"]["mean"] or 0.0 for a in arms]
        stds = [agg[a][g]["mae"]["std"] or 0.0 for a in arms]
        ax.bar([i + (j - (len(groups) - 1) / 2) * bw for i in x], means, bw, yerr=err(stds),
               label=f"'{g}' problems", capsize=3)
    ax.set_xticks(x, list(arms))
    ax.set_yscale("log")
    ax.set_title("held-out mean absolute error (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
