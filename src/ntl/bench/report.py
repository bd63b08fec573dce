"""Environment capture, ratios, targets, and the outputs: table, JSON, Markdown, PNG."""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .cases import GA_STEPS
from .measure import MODES

__all__ = [
    "SCHEMA",
    "add_ratios",
    "device_info",
    "evaluate_targets",
    "render_markdown",
    "table_rows",
    "versions",
    "vocab_comparison",
    "write_outputs",
]

SCHEMA = "ntl-bench/1"
MiB = 1 << 20


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "device"


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name, slug (used for result file names) and size."""
    cpu = _cpu_model()
    info: dict[str, Any] = {
        "kind": device.type,
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["cuda"] = torch.version.cuda
        info["slug"] = slug(info["name"])
    else:
        info["name"] = f"{cpu} ({os.cpu_count()} cores)"
        info["slug"] = "cpu-" + slug(cpu)
    return info


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _git_rev(path: Path) -> str | None:
    """Short commit of the checkout holding ``path`` (``+dirty`` if src/ntl has local changes)."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/ntl"], cwd=path,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+dirty" if dirty else rev or None


def versions() -> dict[str, str | None]:
    import ntl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "ntl": getattr(ntl, "__version__", None),
        "ntl_git": _git_rev(Path(ntl.__file__).resolve().parent),
        "ntloss": _version("ntloss"),
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
    }


# --------------------------------------------------------------------------- ratios


def _vocab(r: dict[str, Any]) -> str:
    """The record's number vocab (``--tokenizer``); results written before it existed are Qwen2.5's."""
    return r.get("vocab", "qwen2")


def _key(r: dict[str, Any]) -> tuple[str, str, int, str, str]:
    return (r["case"], r["provider"], r["N"], r["dtype"], _vocab(r))


def _primary_vocab(doc: dict[str, Any]) -> str:
    """The first vocab of a run (its targets are evaluated on it): ``qwen2`` unless told otherwise."""
    vs = doc.get("config", {}).get("vocabs") or [{"name": "qwen2"}]
    return vs[0]["name"]


def _t(r: dict[str, Any] | None, mode: str) -> float | None:
    if r is None or r.get("status") != "ok":
        return None
    return r["modes"][mode]["time_ms"]["median"]


def _m(r: dict[str, Any] | None, mode: str) -> int | None:
    if r is None or r.get("status") != "ok":
        return None
    return r["modes"][mode]["peak_mem_bytes"]


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def add_ratios(records: list[dict[str, Any]], cases: dict[str, Any]) -> None:
    """Add ``ratio_to_ntl``, ``ratio_to_ce``, ``mem_ratio_to_ntl``, ``mem_ratio_to_ce`` per mode.

    ``x ntl``: time over the case's ``ntl`` provider (same N, dtype, mode); ``x CE``: over
    ``F.cross_entropy`` alone on the same logits (the LM head + CE for the hidden case), both
    with the record's own vocab.
    """
    by = {_key(r): r for r in records}
    for r in records:
        if r["status"] != "ok":
            continue
        case = cases[r["case"]]
        ntl_r = by.get((r["case"], case.ntl_key, r["N"], r["dtype"], _vocab(r)))
        ce_r = by.get((case.ce_ref[0], case.ce_ref[1], r["N"], r["dtype"], _vocab(r)))
        for mode in MODES:
            d = r["modes"][mode]
            d["ratio_to_ntl"] = _div(_t(r, mode), _t(ntl_r, mode))
            d["ratio_to_ce"] = _div(_t(r, mode), _t(ce_r, mode))
            d["mem_ratio_to_ntl"] = _div(_m(r, mode), _m(ntl_r, mode))
            d["mem_ratio_to_ce"] = _div(_m(r, mode), _m(ce_r, mode))


def merge(old: dict[str, Any], new: dict[str, Any], cases: dict[str, Any]) -> dict[str, Any]:
    """Results of ``new`` on top of ``old`` (same device): same (case, provider, N, dtype, vocab)
    replaced, the rest kept; config lists united; ratios and targets recomputed.

    Lets a long GPU benchmark run in several shorter commands (``--append``).
    """
    if old.get("schema") != SCHEMA:
        raise ValueError(f"cannot append to results with schema {old.get('schema')!r} (want {SCHEMA})")
    if old["device"].get("slug") != new["device"].get("slug"):
        raise ValueError(f"cannot append results of {new['device']['name']!r} to those of {old['device']['name']!r}")
    fresh = {_key(r) for r in new["results"]}
    recs = [r for r in old["results"] if _key(r) not in fresh] + list(new["results"])
    case_order = {c: i for i, c in enumerate(cases)}
    prov_order = {(c, p.key): i for c, case in cases.items() for i, p in enumerate(case.providers)}
    vocab_order = {v: i for i, v in enumerate(dict.fromkeys(_vocab(r) for r in recs))}
    recs.sort(key=lambda r: (case_order.get(r["case"], 99), r["dtype"], r["N"], vocab_order[_vocab(r)],
                             prov_order.get((r["case"], r["provider"]), 99)))
    doc = dict(new)
    doc["results"] = recs
    cfg = dict(new["config"])
    for k in ("Ns", "dtypes", "cases"):
        cfg[k] = sorted(set(old["config"].get(k, [])) | set(new["config"].get(k, [])),
                        key=lambda x: (case_order.get(x, 0), x) if k == "cases" else x)
    if old["config"].get("vocabs") or new["config"].get("vocabs"):
        by_name = {v["name"]: v for v in (old["config"].get("vocabs") or [])}
        by_name.update({v["name"]: v for v in (new["config"].get("vocabs") or [])})
        cfg["vocabs"] = list(by_name.values())
    doc["config"] = cfg
    doc["cases"] = {**old.get("cases", {}), **new.get("cases", {})}
    base = dict(old.get("baselines") or {})
    base.update({k: v for k, v in (new.get("baselines") or {}).items() if v is not None})
    doc["baselines"] = base
    doc["runs"] = [*old.get("runs", [_run_entry(old)]), _run_entry(new)]
    doc["mode"] = "merged"
    add_ratios(recs, cases)
    primary = _primary_vocab(new)
    doc["targets"] = evaluate_targets([r for r in recs if _vocab(r) == primary], doc["device"]["kind"], base)
    return doc


def _run_entry(doc: dict[str, Any]) -> dict[str, Any]:
    return {"date": doc.get("date"), "command": doc.get("command"), "mode": doc.get("mode"),
            "ntl_git": (doc.get("versions") or {}).get("ntl_git"), "wall_s": doc.get("wall_s"),
            "load_avg_1min": doc.get("load_avg_1min")}


# --------------------------------------------------------------------------- targets


def _find(records: Sequence[dict[str, Any]], case: str, provider: str, N: int, dtype: str) -> dict | None:
    for r in records:
        if (r["case"], r["provider"], r["N"], r["dtype"]) == (case, provider, N, dtype):
            return r
    return None


def evaluate_targets(records: Sequence[dict[str, Any]], device_kind: str,
                     baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with the measured value and ``pass``/``fail``/``not measured``.

    ``info`` entries (no threshold) report the peers' ratios the targets were set against.
    """
    out: list[dict[str, Any]] = []

    def add(tid: str, dev: str, desc: str, N: int, dtype: str, measured: float | None, op: str,
            threshold: float | None, detail: str, missing: str = "") -> None:
        if dev != device_kind:
            status, measured = f"not measured (needs {'a CUDA GPU' if dev == 'cuda' else 'a CPU run'})", None
        elif measured is None:
            status = f"not measured ({missing or f'its providers did not all run at N={N} {dtype}'})"
        elif threshold is None:
            status = "info"
        else:
            ok = measured <= threshold if op == "<=" else measured >= threshold
            status = "pass" if ok else "fail"
        out.append({"id": tid, "device": dev, "N": N, "dtype": dtype, "description": desc,
                    "measured": measured, "op": op, "threshold": threshold, "status": status,
                    "detail": detail})

    def val(case: str, prov: str, N: int, dtype: str, mode: str, field: str) -> float | None:
        r = _find(records, case, prov, N, dtype)
        if r is None or r["status"] != "ok":
            return None
        return r["modes"][mode].get(field)

    def t(case: str, prov: str, N: int, dtype: str, mode: str) -> float | None:
        return _t(_find(records, case, prov, N, dtype), mode)

    def m(case: str, prov: str, N: int, dtype: str, mode: str) -> float | None:
        return _m(_find(records, case, prov, N, dtype), mode)

    # ---- CPU, N = 1024, fp32
    N, dt = 1024, "float32"
    add("cpu-fused-time", "cpu", "fused CE+NTL (cross_entropy_with_ntl) fwd+bwd time / F.cross_entropy alone",
        N, dt, val("ce+ntl", "ntl-fused", N, dt, "fwd+bwd", "ratio_to_ce"), "<=", 1.1,
        "time ratio, medians of the same run")
    add("cpu-fused-mem", "cpu", "fused CE+NTL fwd+bwd peak memory / F.cross_entropy alone", N, dt,
        val("ce+ntl", "ntl-fused", N, dt, "fwd+bwd", "mem_ratio_to_ce"), "<=", 1.0,
        "peak bytes allocated during the call (inputs excluded)")
    add("cpu-fused-inplace-time", "cpu", "cross_entropy_with_ntl(inplace=True) fwd+bwd time / F.cross_entropy",
        N, dt, val("ce+ntl", "ntl-fused-inplace", N, dt, "fwd+bwd", "ratio_to_ce"), "<=", None, "info")
    add("cpu-fused-inplace-mem", "cpu", "cross_entropy_with_ntl(inplace=True) fwd+bwd memory / F.cross_entropy",
        N, dt, val("ce+ntl", "ntl-fused-inplace", N, dt, "fwd+bwd", "mem_ratio_to_ce"), "<=", None, "info")
    add("cpu-ntloss-time", "cpu", "F.cross_entropy + ntloss(reweigh=False) fwd+bwd time / F.cross_entropy "
        "(issue: 1.45x)", N, dt, val("ce+ntl", "ce+ntloss", N, dt, "fwd+bwd", "ratio_to_ce"), "<=", None, "info")
    add("cpu-ntloss-rw-time", "cpu", "F.cross_entropy + ntloss(default reweigh) fwd+bwd time / F.cross_entropy "
        "(issue: 2.5x)", N, dt, val("ce+ntl", "ce+ntloss-rw", N, dt, "fwd+bwd", "ratio_to_ce"), "<=", None,
        "info")

    # ---- CPU, N = 2048, fp32: CE + NTL from hidden states (issue 13; H = 896, see config)
    N, dt = 2048, "float32"
    ours = ("linear", "ntl-linear", N, dt, "fwd+bwd")
    add("cpu-linear-time-vs-logits", "cpu", "linear_cross_entropy_with_ntl fwd+bwd time / logits path "
        "(hidden @ W.T + cross_entropy_with_ntl)", N, dt, val(*ours, "ratio_to_ce"), "<=", 1.2,
        "time ratio, medians of the same run")
    add("cpu-linear-time-vs-torch-chunked", "cpu", "linear_cross_entropy_with_ntl fwd+bwd time / chunked "
        "F.linear_cross_entropy (CE only)", N, dt,
        _div(t(*ours), t("linear", "torch-lce-chunked", N, dt, "fwd+bwd")), "<=", 1.0,
        "time ratio, medians of the same run")
    add("cpu-linear-mem-vs-logits", "cpu", "linear_cross_entropy_with_ntl fwd+bwd peak memory / logits path",
        N, dt, val(*ours, "mem_ratio_to_ce"), "<=", 0.3, "peak bytes allocated during the call (inputs excluded)")
    add("cpu-linear-mem-vs-torch-chunked", "cpu", "linear_cross_entropy_with_ntl fwd+bwd peak memory / "
        "chunked F.linear_cross_entropy (CE only)", N, dt,
        _div(m(*ours), m("linear", "torch-lce-chunked", N, dt, "fwd+bwd")), "<=", 1.1,
        "peak bytes allocated during the call (inputs excluded)")
    for prov, what in (("torch-lce-chunked", "chunked F.linear_cross_entropy"),
                       ("torch-lce", "unchunked F.linear_cross_entropy")):
        add(f"cpu-linear-{prov}-time", "cpu", f"{what} (CE only) fwd+bwd time / logits path", N, dt,
            val("linear", prov, N, dt, "fwd+bwd", "ratio_to_ce"), "<=", None, "info")
        add(f"cpu-linear-{prov}-mem", "cpu", f"{what} (CE only) fwd+bwd peak memory / logits path", N, dt,
            val("linear", prov, N, dt, "fwd+bwd", "mem_ratio_to_ce"), "<=", None, "info")

    # ---- GPU, N = 16384, bf16
    N, dt = 16384, "bfloat16"
    empty = (baselines.get("empty_kernel_launch_ms") or {}).get("median")
    fwd_times = [x for x in (t("ntl-w1", "ntl", N, dt, "fwd"), t("ntl-mse", "ntl", N, dt, "fwd"))
                 if x is not None]
    add("gpu-ntl-fwd-launch", "cuda", "standalone NTL forward (slower of MSE, W1) / empty Triton kernel launch",
        N, dt, _div(max(fwd_times), empty) if fwd_times else None, "<=", 3.0,
        "both do_bench medians")
    speedups = []
    for case in ("ntl-w1", "ntl-mse"):
        s = _div(t(case, "ntloss", N, dt, "fwd+bwd"), t(case, "ntl", N, dt, "fwd+bwd"))
        if s is not None:
            speedups.append(s)
    add("gpu-ntl-vs-ntloss", "cuda", "standalone NTL fwd+bwd speed-up over ntloss(reweigh=False) "
        "(smaller of MSE, W1)", N, dt, min(speedups) if speedups else None, ">=", 3.0, "ntloss time / ntl time")
    liger_t, liger_m = t("ce+ntl", "liger-ce", N, dt, "fwd+bwd"), m("ce+ntl", "liger-ce", N, dt, "fwd+bwd")
    missing_liger = "" if liger_t is not None else "needs liger_kernel installed and this shape"
    for prov, label in (("ntl-fused-inplace", "inplace=True"), ("ntl-fused", "default")):
        add(f"gpu-fused-vs-liger-time{'' if prov == 'ntl-fused-inplace' else '-default'}", "cuda",
            f"fused CE+NTL ({label}) fwd+bwd time / Liger cross-entropy alone, grad_out == 1", N, dt,
            _div(t("ce+ntl", prov, N, dt, "fwd+bwd"), liger_t), "<=",
            1.0 if prov == "ntl-fused-inplace" else None, "Liger computes its CE in place", missing_liger)
        add(f"gpu-fused-vs-liger-mem{'' if prov == 'ntl-fused-inplace' else '-default'}", "cuda",
            f"fused CE+NTL ({label}) fwd+bwd peak memory / Liger cross-entropy alone", N, dt,
            _div(m("ce+ntl", prov, N, dt, "fwd+bwd"), liger_m), "<=",
            1.05 if prov == "ntl-fused-inplace" else None, "peak bytes during the call", missing_liger)
    ga_liger = t("ce+ntl", "liger-ce-ga", N, dt, "fwd+bwd")
    add("gpu-fused-vs-liger-ga-time", "cuda", f"fused CE+NTL (inplace=True, grad_scale=1/{GA_STEPS}) fwd+bwd time "
        f"/ Liger cross-entropy alone, in a gradient-accumulation step (loss / {GA_STEPS})", N, dt,
        _div(t("ce+ntl", "ntl-fused-inplace-ga", N, dt, "fwd+bwd"), ga_liger), "<=", 0.75,
        "ntl's backward reads and writes nothing when grad_out == grad_scale; Liger's rescales the "
        "N x V gradient", "" if ga_liger is not None else "needs liger_kernel installed and this shape")
    flce_t = t("linear", "liger-flce", N, dt, "fwd+bwd")
    flce_m = m("linear", "liger-flce", N, dt, "fwd+bwd")
    missing_flce = "" if flce_t is not None else "needs liger_kernel installed and this shape"
    add("gpu-linear-vs-liger-time", "cuda", "linear_cross_entropy_with_ntl fwd+bwd time / Liger fused linear CE "
        "(CE only)", N, dt, _div(t("linear", "ntl-linear", N, dt, "fwd+bwd"), flce_t), "<=", 1.05,
        "same H, see config", missing_flce)
    add("gpu-linear-vs-liger-mem", "cuda", "linear_cross_entropy_with_ntl fwd+bwd peak memory / Liger fused "
        "linear CE (CE only)", N, dt, _div(m("linear", "ntl-linear", N, dt, "fwd+bwd"), flce_m), "<=", 1.05,
        "peak bytes during the call", missing_flce)
    add("gpu-linear-vs-liger-ntl-time", "cuda", "linear_cross_entropy_with_ntl fwd+bwd time / Liger fused linear "
        "CE + ntl_loss_from_hidden", N, dt, _div(t("linear", "ntl-linear", N, dt, "fwd+bwd"),
                                                t("linear", "liger-flce+ntl", N, dt, "fwd+bwd")), "<=", None,
        "info", missing_flce)
    add("gpu-linear-vs-cce-time", "cuda", "linear_cross_entropy_with_ntl fwd+bwd time / Cut Cross-Entropy "
        "(CE only)", N, dt, _div(t("linear", "ntl-linear", N, dt, "fwd+bwd"), t("linear", "cce", N, dt, "fwd+bwd")),
        "<=", None, "info", "needs cut-cross-entropy installed and this shape")
    add("gpu-hidden-overhead", "cuda", "ntl_loss_from_hidden fwd+bwd time / LM head (hidden @ W.T + CE) "
        "fwd+bwd", N, dt, val("hidden", "ntl-from-hidden", N, dt, "fwd+bwd", "ratio_to_ce"), "<=", 0.01,
        "same hidden size H, see config")
    from .parity import parity_targets  # the ntloss-parity cases (issue 12) and reweigh (18.6)
    from .rivals import rivals_targets  # DEL and DIST² beside NTL-W1 (issue 28.6)

    return out + parity_targets(records, device_kind) + rivals_targets(records, device_kind)


# --------------------------------------------------------------------------- rendering


def _fmt_ms(tm: dict[str, Any] | None) -> str:
    if not tm:
        return "-"
    med, half = tm["median"], (tm["q75"] - tm["q25"]) / 2
    return f"{_sig(med)} ±{_sig(half, 2)}"


def _sig(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / MiB:.0f}" if b >= 10 * MiB else f"{b / MiB:.2f}"


TABLE_HEADER = ("case", "N", "dtype", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "x ntl", "x CE",
                "peak MiB", "mem x CE", "check")


def table_rows(records: Iterable[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per record; times are ``median ±half-IQR`` ms, ratios and memory for fwd+bwd.
    With records of several vocabs, the case reads ``case [vocab]``."""
    rows = []
    records = list(records)
    multi = len({_vocab(r) for r in records}) > 1
    for r in records:
        base = (f"{r['case']} [{_vocab(r)}]" if multi else r["case"], str(r["N"]), r["dtype"].replace("float32", "fp32").replace("bfloat16", "bf16"),
                r["provider"])
        if r["status"] != "ok":
            rows.append((*base, f"{r['status']}: {r.get('reason', '')}", "", "", "", "", "", "", ""))
            continue
        mo = r["modes"]
        fb = mo["fwd+bwd"]
        chk = r.get("check")
        chk_s = "-" if not chk else ("ok" if chk["ok"] else f"MISMATCH rel {chk['rel_err']:.1e}")
        rows.append((*base, _fmt_ms(mo["fwd"]["time_ms"]), _fmt_ms(mo["bwd"]["time_ms"]),
                     _fmt_ms(fb["time_ms"]), _fmt_ratio(fb.get("ratio_to_ntl")),
                     _fmt_ratio(fb.get("ratio_to_ce")), _fmt_mib(fb["peak_mem_bytes"]),
                     _fmt_ratio(fb.get("mem_ratio_to_ce")), chk_s))
    return rows


def print_table(records: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]], title: str,
                file: Any = None) -> None:
    """Results and targets on stdout: a ``rich`` table when installed, plain text otherwise."""
    file = file or sys.stdout
    rows = table_rows(records)
    trows = [(t["id"], t["description"], _fmt_target(t), t["status"]) for t in targets]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[assignment]
    if Console is not None:
        con = Console(file=file, width=max(160, 0))
        tab = Table(title=title, show_lines=False)  # pyright: ignore[reportPossiblyUnboundVariable] (imported with Console)
        for h in TABLE_HEADER:
            tab.add_column(h, justify="left" if h in ("case", "dtype", "provider", "check") else "right")
        for row in rows:
            tab.add_row(*row)
        con.print(tab)
        tt = Table(title="targets (issue 5)")  # pyright: ignore[reportPossiblyUnboundVariable] (imported with Console)
        for h in ("id", "target", "measured", "status"):
            tt.add_column(h)
        for row in trows:
            tt.add_row(*row)
        con.print(tt)
        return
    print(title, file=file)
    print(_plain(TABLE_HEADER, rows), file=file)
    print("\ntargets (issue 5)", file=file)
    print(_plain(("id", "target", "measured", "status"), trows), file=file)


def _plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)) for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_target(t: dict[str, Any]) -> str:
    if t["measured"] is None:
        return "-"
    thr = "" if t["threshold"] is None else f" (target {t['op']} {t['threshold']:g})"
    return f"{t['measured']:.3g}{thr}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def _vocab_line(cfg: dict[str, Any]) -> str | None:
    vs = cfg.get("vocabs")
    if not vs:
        return None
    return "- number vocab: " + "; ".join(
        f"{v['name']}: {v['class']} K = {v['K']}"
        + (f" (token widths 1-{v['max_width']} digits)" if (v.get("max_width") or 1) > 1 else "")
        + f", V = {v['V']}" for v in vs)


def vocab_comparison(records: Sequence[dict[str, Any]], base: str, other: str) -> list[dict[str, Any]]:
    """Per (case, provider, N, dtype) measured with both vocabs: ``other`` over ``base`` fwd /
    bwd / fwd+bwd median time and fwd+bwd peak memory; ``range`` bounds the fwd+bwd ratio by the
    quartiles, ``(q25_other / q75_base, q75_other / q25_base)``."""
    by = {_key(r): r for r in records if r["status"] == "ok"}
    out = []
    for r in records:
        if r["status"] != "ok" or _vocab(r) != base:
            continue
        o = by.get((r["case"], r["provider"], r["N"], r["dtype"], other))
        if o is None:
            continue
        tb, to = r["modes"]["fwd+bwd"]["time_ms"], o["modes"]["fwd+bwd"]["time_ms"]
        out.append({
            "case": r["case"], "provider": r["provider"], "N": r["N"], "dtype": r["dtype"],
            "base": base, "other": other, "base_ms": tb, "other_ms": to,
            "ratio": {m: _div(_t(o, m), _t(r, m)) for m in MODES},
            "range": (_div(to["q25"], tb["q75"]), _div(to["q75"], tb["q25"])),
            "mem_ratio": _div(_m(o, "fwd+bwd"), _m(r, "fwd+bwd")),
            "base_mem": _m(r, "fwd+bwd"), "other_mem": _m(o, "fwd+bwd"),
        })
    return out


def render_markdown(doc: dict[str, Any], plot_name: str | None) -> str:
    dev, ver, cfg = doc["device"], doc["versions"], doc["config"]
    kind = dev.get("kind", "cpu")
    here = [t for t in doc["targets"] if t.get("device", kind) == kind]
    elsewhere = [t for t in doc["targets"] if t.get("device", kind) != kind]
    lines = [
        f"# ntl benchmark: {dev['name']}",
        "",
        f"- date: {doc['date']}",
        f"- command: `{doc['command']}` ({doc['mode']} mode)",
        *([f"- merged from {len(doc['runs'])} runs: " + "; ".join(f"`{r['command']}` ({r['date']})"
                                                              for r in doc["runs"])]
          if doc.get("runs") else []),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
        *([line] if (line := _vocab_line(cfg)) else []),
        "- shapes: V = "
        + (", ".join(f"{v['V']} ({v['name']})" for v in cfg["vocabs"]) if len(cfg.get("vocabs") or []) > 1
           else str(cfg["vocab_size"]))
        + f", N = {', '.join(map(str, cfg['Ns']))}, dtypes "
        f"{', '.join(cfg['dtypes'])}, number-token labels {cfg['digit_frac']:.0%}, ignored {cfg['ignore_frac']:.0%}, "
        f"hidden size H = {cfg['hidden_size']}"
        + "".join(f"; {c}: H = {h}" for c, h in (cfg.get("hidden_size_by_case") or {}).items()
                  if h != cfg["hidden_size"])
        + "".join(f"; {c}: N = {', '.join(map(str, n))}" for c, n in (cfg.get("Ns_by_case") or {}).items()
                  if n != cfg["Ns"]),
        *([f"- threads: {cfg['threads']}"] if cfg.get("threads") else []),
        *([f"- isolation: {cfg['isolated']['how']} ({cfg['isolated']['rounds']} rounds)"]
          if cfg.get("isolated") else []),
        f"- timing: {cfg['timer']}",
        f"- memory: {cfg['memory']}",
        f"- `ntl` backend: {cfg['ntl_backend']}",
        *([f"- host load (1-min average) at start / end: {doc['load_avg_1min']['start']} / "
           f"{doc['load_avg_1min']['end']} (CPU timings on a shared machine depend on it)"]
          if doc.get("load_avg_1min") and dev["kind"] == "cpu" else []),
        "",
        "Times are `median ±half-IQR` in ms; `x ntl` / `x CE` are fwd+bwd time ratios to the case's `ntl` "
        "provider and to `F.cross_entropy` alone on the same logits (LM head + CE for the hidden case, "
        "the logits path `hidden @ W.T` + `cross_entropy_with_ntl` for the linear case); "
        "`peak MiB` is the fwd+bwd peak allocated on top of the inputs; `check` compares the loss with a "
        "float64 reference.",
        "",
        "## Targets",
        "",
        _md_table(("id", "target", "measured", "status"),
                  [(t["id"], t["description"], _fmt_target(t), t["status"]) for t in here]),
        "",
    ]
    if elsewhere:  # the other device kind's targets: one line (the JSON keeps every entry)
        lines += [f"Not measured here, they need {'a CUDA GPU' if kind == 'cpu' else 'a CPU run'} "
                  f"({len(elsewhere)}): " + ", ".join(f"`{t['id']}`" for t in elsewhere) + ".", ""]
    if doc.get("baselines", {}).get("empty_kernel_launch_ms"):
        lines += [f"Empty Triton kernel launch: {_fmt_ms(doc['baselines']['empty_kernel_launch_ms'])} ms.", ""]
    vocabs = list(dict.fromkeys(_vocab(r) for r in doc["results"]))
    for other in vocabs[1:]:
        cmp = vocab_comparison(doc["results"], vocabs[0], other)
        if not cmp:
            continue
        lines += [f"## Vocab comparison: {other} / {vocabs[0]}", "",
                  f"Time and peak memory with the {other} vocab over those with the {vocabs[0]} vocab, same "
                  "case, provider, N and dtype (medians; `range`: the fwd+bwd ratio's bounds from the "
                  "quartiles).", "",
                  _md_table(("case", "N", "dtype", "provider", f"{vocabs[0]} fwd+bwd ms",
                             f"{other} fwd+bwd ms", "fwd+bwd ratio", "range", "fwd ratio", "bwd ratio",
                             "peak MiB ratio"),
                            [(c["case"], str(c["N"]), c["dtype"], c["provider"], _fmt_ms(c["base_ms"]),
                              _fmt_ms(c["other_ms"]), _fmt_ratio(c["ratio"]["fwd+bwd"]),
                              f"{_fmt_ratio(c['range'][0])}-{_fmt_ratio(c['range'][1])}",
                              _fmt_ratio(c["ratio"]["fwd"]), _fmt_ratio(c["ratio"]["bwd"]),
                              _fmt_ratio(c["mem_ratio"])) for c in cmp]), ""]
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in doc["results"]:
        by_case.setdefault((r["case"], _vocab(r)), []).append(r)
    for (case, voc), recs in by_case.items():
        head = f"{case} [{voc}]" if len(vocabs) > 1 else case
        lines += [f"## {head}: {doc['cases'].get(case, '')}", "",
                  _md_table(TABLE_HEADER[1:], [row[1:] for row in table_rows(recs)]), ""]
    if plot_name:
        lines += ["## Plot", "", f"![time and memory vs N]({plot_name})", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> bool:
    """PNG: per case, fwd+bwd time and peak memory vs N, one line per provider and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = [r for r in doc["results"] if r["status"] == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in recs))
    if not cases:
        return False
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 3.6 * len(cases)), squeeze=False)
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    vocabs = list(dict.fromkeys(_vocab(r) for r in recs))
    multi = len(vocabs) > 1

    def tag(r: dict[str, Any]) -> str:  # provider (dtype) [vocab], each part only when it varies
        return (r["provider"] + (f" ({r['dtype']})" if len(doc["config"]["dtypes"]) > 1 else "")
                + (f" [{_vocab(r)}]" if multi else ""))
    if len(doc["config"]["Ns"]) == 1:  # one N: bars per provider instead of lines
        for i, case in enumerate(cases):
            rs = [r for r in recs if r["case"] == case]
            names = [tag(r) for r in rs]
            for j, (xlabel, get) in enumerate((
                    ("fwd+bwd time (ms)", lambda r: r["modes"]["fwd+bwd"]["time_ms"]["median"]),
                    ("fwd+bwd peak memory (MiB)", lambda r: r["modes"]["fwd+bwd"]["peak_mem_bytes"] / MiB))):
                ax = axes[i][j]
                vals = [get(r) for r in rs]
                ax.barh(range(len(rs)), vals, color=[f"C{k}" for k in range(len(rs))])
                ax.set_yticks(range(len(rs)), names, fontsize=8)
                ax.invert_yaxis()
                ax.set_xlabel(xlabel)
                ax.set_title(f"{case}, N = {doc['config']['Ns'][0]}")
                ax.grid(True, axis="x", alpha=0.3)
                for k, v in enumerate(vals):
                    ax.text(v, k, f" {_sig(v)}", va="center", fontsize=7)
        fig.suptitle(f"ntl bench: {doc['device']['name']} ({doc['date'][:10]})")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return True
    for i, case in enumerate(cases):
        series: dict[tuple[str, str, int, str], list[tuple[int, float, float]]] = {}
        for r in recs:
            if r["case"] == case:
                fb = r["modes"]["fwd+bwd"]
                series.setdefault((r["provider"], r["dtype"], vocabs.index(_vocab(r)), tag(r)), []).append(
                    (r["N"], fb["time_ms"]["median"], fb["peak_mem_bytes"] / MiB))
        for (_, dt, vi, lbl), pts in sorted(series.items()):
            pts.sort()
            ns = [p[0] for p in pts]
            marker = "os^v"[vi % 4]  # one marker per vocab
            axes[i][0].plot(ns, [p[1] for p in pts], styles.get(dt, "-"), marker=marker, label=lbl)
            axes[i][1].plot(ns, [p[2] for p in pts], styles.get(dt, "-"), marker=marker, label=lbl)
        for j, ylabel in enumerate(("fwd+bwd time (ms)", "fwd+bwd peak memory (MiB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(case)
            ax.grid(True, which="both", alpha=0.3)
        axes[i][1].legend(fontsize=7, loc="best")
    fig.suptitle(f"ntl bench: {doc['device']['name']} ({doc['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_outputs(doc: dict[str, Any], out_dir: Path, stem: str, make_plot: bool = True) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (matplotlib permitting) ``<stem>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    png = out_dir / f"{stem}.png"
    plotted = make_plot and plot(doc, png)
    if plotted:
        written.append(png)
    doc["plot"] = png.name if plotted else None
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    written.append(js)
    mdp = out_dir / f"{stem}.md"
    mdp.write_text(render_markdown(doc, png.name if plotted else None))
    written.append(mdp)
    return written


def _finite(o: Any) -> Any:
    """Copy of ``o`` with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o
