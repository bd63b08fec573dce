"""The demo's reporting: summaries over seeds, paired differences, tables, verdicts, plots."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from .stats import LEVEL, describe, paired_differences, position_in_range, verdict

log: logging.Logger = logging.getLogger("ntl")

__all__ = [
    "COMPARED",
    "METRICS",
    "RL_COMPARED",
    "RL_METRICS",
    "compare_to_reference",
    "format_ci",
    "format_paired",
    "format_table",
    "paired_table",
    "plot_rl",
    "plot_sft",
    "summarize",
    "verdicts",
]

METRICS = ("exact_match", "digit_accuracy", "mae", "median_ae", "unparsable", "digit_entropy")
#: The metrics compared between arms, and whether higher is better (``None``: neither, the
#: digit entropy is reported as higher or lower only).
COMPARED: dict[str, bool | None] = {"exact_match": True, "mae": False, "digit_accuracy": True,
                                    "digit_entropy": None}
#: The RL stage's metrics: the above plus ``sampled_exact_match``, the expected exact match of
#: one answer sampled at the GRPO temperature (:func:`ntl.demo.rl.answer_probability`).
RL_METRICS = (*METRICS[:1], "sampled_exact_match", *METRICS[1:])
RL_COMPARED: dict[str, bool | None] = {"exact_match": True, "sampled_exact_match": True,
                                       **{k: v for k, v in COMPARED.items() if k != "exact_match"}}
_HEAD = {
    "exact_match": "exact",
    "digit_accuracy": "digit acc",
    "mae": "MAE",
    "median_ae": "median AE",
    "unparsable": "unparsable",
    "digit_entropy": "digit H (nats)",
    "sampled_exact_match": "sampled exact",
}
Getter = Callable[[dict[str, Any], str, str, str], float | None]


def _metric(run: dict[str, Any], arm: str, group: str, metric: str) -> float | None:
    return run["arms"][arm]["metrics"][group].get(metric)


def summarize(runs: Sequence[dict[str, Any]], arms: Sequence[str], groups: Sequence[str],
              get: Getter = _metric, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """``{arm: {group: {metric: describe(values over seeds)}}}`` (mean, sample std, min, max,
    n); ``get(run, arm, group, metric)`` reads one value."""
    return {arm: {g: {m: describe([get(r, arm, g, m) for r in runs]) for m in metrics}
                  for g in groups} for arm in arms}


def paired_table(runs: Sequence[dict[str, Any]], arms: Sequence[str], groups: Sequence[str],
                 baseline: str, get: Getter = _metric,
                 compared: dict[str, bool | None] = COMPARED) -> dict[str, Any]:
    """``{arm: {group: {metric: t_interval of (arm - baseline) over seeds}}}`` for the
    ``compared`` metrics (:data:`COMPARED`) and every arm but ``baseline``."""
    out: dict[str, Any] = {a: {} for a in arms if a != baseline}
    for g in groups:
        for m in compared:
            diffs = paired_differences({a: [get(r, a, g, m) for r in runs] for a in arms}, baseline)
            for a, d in diffs.items():
                out[a].setdefault(g, {})[m] = d
    return out


def verdicts(paired: dict[str, Any], baseline: str, group: str = "all",
             compared: dict[str, bool | None] = COMPARED) -> list[str]:
    """One plain-words sentence per arm and compared metric (:func:`ntl.demo.stats.verdict`)."""
    lines = []
    for arm, by_group in paired.items():
        for m, hib in compared.items():
            d = by_group[group][m]
            lines.append(verdict(arm, baseline, _HEAD[m], d, higher_is_better=hib,
                                 decimals=1 if m == "mae" else _decimals(m)))
    return lines


def _decimals(metric: str) -> int:
    """Decimals of a metric's values and differences: 2 for the MAE, 4 for the sampled exact
    match (its paired differences between arms are a few 1e-4), 3 otherwise."""
    return 2 if metric in ("mae", "median_ae") else 4 if metric == "sampled_exact_match" else 3


def _fmt(stat: dict[str, Any], metric: str, with_std: bool) -> str:
    m, sd = stat["mean"], stat["std"]
    if m is None:
        return "n/a"
    if metric in ("mae", "median_ae"):
        s = f"{m:.2f}" if m < 100 else f"{m:.0f}"
        return f"{s} ± {sd:.2f}" if with_std else s
    p = _decimals(metric)
    s = f"{m:.{p}f}"
    return f"{s} ± {sd:.{p}f}" if with_std else s


def _render(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def format_table(summary: dict[str, Any], arms: Sequence[str], groups: Sequence[str],
                 n_seeds: int, label: str = "arm", metrics: Sequence[str] = METRICS) -> str:
    """A markdown table, one row per (group, arm): mean (± sample std over seeds)."""
    with_std = n_seeds > 1
    cols = ["problems", label, *(_HEAD[m] for m in metrics)]
    rows = [[g, a, *(_fmt(summary[a][g][m], m, with_std) for m in metrics)]
            for g in groups for a in arms]
    return _render(cols, rows)


def format_ci(d: dict[str, Any], metric: str, with_mdd: bool = False) -> str:
    """``mean [lo, hi]`` of a t-interval (just the mean without an interval); with
    ``with_mdd``, `` MDD m`` after it (the minimum detectable difference, when known)."""
    p = _decimals(metric)
    if d["mean"] is None:
        return "n/a"
    if d["lo"] is None:
        return f"{d['mean']:+.{p}f}"
    s = f"{d['mean']:+.{p}f} [{d['lo']:+.{p}f}, {d['hi']:+.{p}f}]"
    if with_mdd and d.get("mdd") is not None:
        s += f" MDD {d['mdd']:.{p}f}"
    return s


def format_paired(paired: dict[str, Any], baseline: str, groups: Sequence[str],
                  compared: dict[str, bool | None] = COMPARED) -> str:
    """A markdown table of the paired differences vs ``baseline``: mean [95 % t-interval]
    and the minimum detectable difference (MDD, 80 % power) at these seeds."""
    cols = ["problems", f"arm - {baseline}", *(f"Δ {_HEAD[m]}" for m in compared)]
    rows = [[g, a, *(format_ci(paired[a][g][m], m, with_mdd=True) for m in compared)]
            for g in groups for a in paired]
    return _render(cols, rows)


def compare_to_reference(summary: dict[str, Any], reference: dict[str, Any] | None,
                         arms: Sequence[str], group: str = "all",
                         compared: dict[str, bool | None] = COMPARED) -> list[str]:
    """Where this run's per-arm means sit against a committed multi-seed run: for each arm
    and compared metric, "inside"/"below"/"above" the committed seeds' ``[min, max]``."""
    if not reference:
        return []
    out = []
    for a in arms:
        parts = []
        for m in compared:
            ref = reference["summary"].get(a, {}).get(group, {}).get(m)
            v = summary[a][group].get(m, {}).get("mean")
            if ref is None or v is None:
                continue
            pos = position_in_range(v, ref["min"], ref["max"])
            p = _decimals(m)
            parts.append(f"{_HEAD[m]} {v:.{p}f} {pos} [{ref['min']:.{p}f}, {ref['max']:.{p}f}]")
        if parts:
            out.append(f"  {a:<12} " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install -e '.[demo]' from a clone)")
        return None
    return plt


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


def _err(summary_or_paired: dict[str, Any]) -> tuple[float, float] | None:
    d = summary_or_paired
    if d.get("lo") is None:
        return None
    return d["mean"] - d["lo"], d["hi"] - d["mean"]


def _bars_with_ci(ax: Any, arms: Sequence[str], stats: Sequence[dict[str, Any]],
                  offset: float, width: float, label: str, color: str) -> None:
    means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
    errs = [_err(s) for s in stats]
    yerr = None
    if all(e is not None for e in errs):
        yerr = [[e[0] for e in errs], [e[1] for e in errs]]  # type: ignore[index]
    ax.bar([i + offset for i in range(len(arms))], means, width, yerr=yerr, capsize=3,
           label=label, color=color)


def _interval_of_means(runs: Sequence[dict[str, Any]], arm: str, group: str, metric: str,
                       get: Getter) -> dict[str, Any]:
    from .stats import t_interval

    return t_interval([get(r, arm, group, metric) for r in runs], LEVEL)


def plot_sft(runs: Sequence[dict[str, Any]], arms: Sequence[str], groups: Sequence[str],
             paired: dict[str, Any], path: str) -> str | None:
    """``results.png``: training loss (CE part solid, total dashed; first seed), held-out
    exact match and digit accuracy per arm (mean, 95 % t-interval over seeds), and the
    paired MAE difference vs CE per group (mean and t-interval, as in the printed table)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    run = runs[0]
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    ax = axes[0]
    for a in arms:
        h = run["arms"][a]["train"]["history"]
        k = max(1, len(h["ce"]) // 60)
        ax.plot(_smooth(h["ce"], k), color=colors[a], label=f"{a}: CE part")
        if any(w != c for w, c in zip(h["loss"], h["ce"], strict=True)):
            ax.plot(_smooth(h["loss"], k), color=colors[a], ls="--", alpha=0.7,
                    label=f"{a}: total")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(f"training loss (seed {run['seed']})")
    ax.legend(fontsize=7)

    n = len(runs)
    ax = axes[1]
    for j, (m, c) in enumerate((("exact_match", "C0"), ("digit_accuracy", "C2"))):
        stats = [_interval_of_means(runs, a, "all", m, _metric) for a in arms]
        _bars_with_ci(ax, arms, stats, (j - 0.5) * 0.38, 0.38, _HEAD[m], c)
    ax.set_xticks(range(len(arms)), list(arms))
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy" + (f" (mean, 95% CI over {n} seeds)" if n > 1 else ""))
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[2]
    others = list(paired)
    bw = 0.8 / len(groups)
    for j, g in enumerate(groups):
        stats = [paired[a][g]["mae"] for a in others]
        _bars_with_ci(ax, others, stats, (j - (len(groups) - 1) / 2) * bw, bw, f"'{g}' problems",
                      f"C{j + 3}")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(others)), others)
    ax.set_ylabel(f"MAE − {arms[0]}'s MAE")
    ax.set_title(f"MAE difference vs {arms[0]}, paired by seed (below 0: NTL better)"
                 + (f"\nmean, 95% t-interval over {n} seeds" if n > 1 else "\none seed: no interval"),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(runs: Sequence[dict[str, Any]], arm: str, key: str) -> tuple[list[float], list[float]]:
    """Per GRPO step, the mean of ``key`` over the seeds that logged it."""
    acc: dict[float, list[float]] = {}
    for run in runs:
        h = run["arms"][arm]["history"]
        for x, v in zip(h["step"], h.get(key, []), strict=False):
            if v is not None:
                acc.setdefault(float(x), []).append(float(v))
    xs = sorted(acc)
    return xs, [sum(acc[x]) / len(acc[x]) for x in xs]


def plot_rl(runs: Sequence[dict[str, Any]], arms: Sequence[str], path: str,
            get_after: Getter, get_before: Callable[[dict[str, Any], str, str], float | None]) -> str | None:
    """``rl_results.png``: correctness reward, ``ntl/loss`` and ``ntl/digit_accuracy`` per GRPO
    step (mean over seeds, smoothed), and held-out exact match before / after per arm (mean,
    95 % t-interval over seeds)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    n = len(runs)
    panels = (("rewards/correctness_reward/mean", "correctness reward (mean per step)"),
              ("ntl/loss", "ntl/loss of the final-answer digits (W1; DEL in GRPO+DEL)"),
              ("ntl/digit_accuracy", "ntl/digit_accuracy (final-answer digits)"))
    for ax, (key, title) in zip(axes[:3], panels, strict=True):
        for a in arms:
            xs, ys = _curve(runs, a, key)
            if ys:
                k = max(1, len(ys) // 25)
                ax.plot(xs, _smooth(ys, k), color=colors[a], label=a)
            if key.startswith("rewards/") and any(
                    v is not None for r in runs for v in r["arms"][a]["history"].get("rewards/ntl_bonus/mean", [])):
                xs, ys = _curve(runs, a, "reward")
                ax.plot(xs, _smooth(ys, max(1, len(ys) // 25)), color=colors[a], ls="--",
                        label=f"{a}: total reward (with the bonus)")
        ax.set_xlabel("GRPO step")
        ax.set_title(title + (f", mean of {n} seeds" if n > 1 else f", seed {runs[0]['seed']}"),
                     fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[3]
    from .stats import t_interval

    before = [t_interval([get_before(r, "all", "exact_match") for r in runs])] * len(arms)
    after = [_interval_of_means(runs, a, "all", "exact_match", get_after) for a in arms]
    _bars_with_ci(ax, arms, before, -0.2, 0.38, "before (SFT CE model)", "0.6")
    _bars_with_ci(ax, arms, after, 0.2, 0.38, "after GRPO", "C0")
    lo = min((s["lo"] if s["lo"] is not None else s["mean"]) or 0.0 for s in before + after)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_xticks(range(len(arms)), list(arms))
    ax.set_title("held-out exact match" + (f" (mean, 95% CI over {n} seeds)" if n > 1 else ""),
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, plt, path)
