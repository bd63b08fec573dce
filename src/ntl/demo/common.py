"""Pieces both stages share: timing, machine and version info, the committed reference."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import time
from importlib import resources
from typing import Any

__all__ = ["finish_timing", "load_reference", "machine_info", "print_footer", "start_timing",
           "strip_volatile"]

#: Keys of results.json that change from run to run (everything else is deterministic).
VOLATILE = ("date", "timing", "seconds", "cpu_seconds", "train_seconds", "train_cpu_seconds",
            "eval_seconds", "step_time", "train_runtime", "train_samples_per_second",
            "train_steps_per_second", "jobs")


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def machine_info(s: Any) -> dict[str, Any]:
    """``date``, ``versions`` and ``machine`` entries of results.json."""
    import torch

    import ntl

    device = torch.device(s.device)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"ntl": ntl.__version__, "torch": torch.__version__,
                     "transformers": _version("transformers"), "trl": _version("trl"),
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def start_timing() -> dict[str, float]:
    return {"t": time.perf_counter(), "cpu": time.process_time(), "children": _children_cpu(),
            "load": os.getloadavg()[0]}


def finish_timing(t: dict[str, float], jobs: list[dict[str, Any]], n_jobs: int) -> dict[str, Any]:
    """Wall seconds, CPU seconds (this process and its finished workers; and the jobs' own
    sum), the 1-minute load average before and after, and the worker count."""
    return {
        "total_seconds": time.perf_counter() - t["t"],
        "cpu_seconds": (time.process_time() - t["cpu"]) + (_children_cpu() - t["children"]),
        "jobs_cpu_seconds": sum(j.get("cpu_seconds", 0.0) for j in jobs),
        "per_job_seconds": [j.get("seconds") for j in jobs],
        "load_before": t["load"], "load_after": os.getloadavg()[0],
        "jobs": n_jobs, "cpu_count": os.cpu_count(),
    }


def load_reference(stage: str, s: Any) -> dict[str, Any] | None:
    """The committed multi-seed summary of ``stage`` ("sft" or "rl") from
    ``ntl/demo/reference.json``, or ``None`` when none is committed or its configuration
    differs from ``s`` (seeds aside)."""
    try:
        text = resources.files("ntl.demo").joinpath("reference.json").read_text()
    except (FileNotFoundError, OSError):
        return None
    ref = json.loads(text).get(stage)
    if not ref:
        return None
    want = s.sft_dict() if stage == "sft" else {**s.sft_dict(), "rl": s.rl.to_dict()}
    if stage == "sft":
        want = {**want, "ntl_weight": s.ntl_weight}
    return ref if ref.get("config") == json.loads(json.dumps(want)) else None


def strip_volatile(obj: Any) -> Any:
    """``obj`` without the keys in :data:`VOLATILE` (at any depth): what must be identical
    between two runs with the same arguments on one machine."""
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def print_footer(res: dict[str, Any], baseline: str, out: str, name: str) -> None:
    """The paired differences, verdicts, the place against the committed run, timing."""
    n = len(res["config"]["seeds"])
    print(f"\npaired differences vs {baseline} (arm - {baseline}, per seed; mean"
          + (f" [95% t-interval, {n} seeds, t with {n - 1} df]):" if n > 1 else "; one seed, no interval):"))
    print(res["paired_table"])
    if res["verdicts"]:
        print("\nverdict (all problems):")
        for v in res["verdicts"]:
            print(f"  {v}")
    else:
        print("\none seed: no confidence interval and no verdict. Use --seeds 0 1 2 3 4.")
    ref = res.get("reference")
    if ref:
        print(f"\nthis run against the committed {len(ref['seeds'])}-seed run ({ref['machine']}, "
              f"{ref['date']}; `{ref['command']}`): mean over this run's seeds vs the committed "
              "seeds' [min, max]")
        for line in res["against_reference"]:
            print(line)
        print("  (a run on another machine differs from the committed numbers even with the same "
              "seed: CPU rounding differs and training amplifies it; compare ranges, not digits)")
    else:
        print("\n(no committed reference for this configuration; the README's summary uses the defaults)")
    t = res["timing"]
    print(f"\n{t['total_seconds']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU in {t['jobs']} worker(s) "
          f"on {t['cpu_count']} cores (load {t['load_before']:.1f} -> {t['load_after']:.1f}); wrote "
          f"{os.path.join(out, name)}" + (f" and {os.path.join(out, res['plot'])}" if res.get("plot") else ""))
