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

__all__ = ["finish_timing", "load_reference", "machine_info", "print_footer", "reference_config",
           "start_timing", "strip_volatile", "write_reference"]

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
                    "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                    # the vector kernels torch picked: training amplifies their rounding, so
                    # per-seed numbers agree only between machines with the same (docs/demo.md)
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }


def _cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``None``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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


_REF_KEYS = {"sft": ("task", "model", "train", "device", "backend", "ntl_weight"),
             "rl": ("task", "model", "train", "device", "backend", "rl")}


def reference_config(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """The part of a results.json ``config`` (or of ``Settings.to_dict()``) that a committed
    reference must share with a run to be compared with it: everything but the seeds."""
    return json.loads(json.dumps({k: config[k] for k in _REF_KEYS[stage]}))


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
    return ref if ref.get("config") == reference_config(stage, s.to_dict()) else None


def _arms_option(config: dict[str, Any]) -> str:
    """`` --arms ...`` that reproduces a supervised run's arms ('' for the default three)."""
    from .config import DEFAULT_ARMS, parse_arms

    arms = config.get("arms")
    if not arms or "bonus" in arms[0]:  # the RL stage has no --arms
        return ""
    default = [a.name for a in parse_arms(DEFAULT_ARMS, config.get("ntl_weight", 0.3))]
    if [a["name"] for a in arms] == default:
        return ""
    short = {"wasserstein": "w1"}
    names = []
    for a in arms:
        if a["name"] == "CE":
            names.append("ce")
            continue
        n = short.get(a["method"], a["method"])
        names.append(f"{n}={a['ntl_weight']:g}" if "(w=" in a["name"] else n)
    return " --arms " + " ".join(names)


def write_reference(out: str, path: str, machine: str) -> dict[str, Any]:
    """Write the committed summary ``path`` (``src/ntl/demo/reference.json``) from the
    ``results.json`` and ``rl_results.json`` in ``out``: per stage the command, machine
    (``machine``: a human description), date, seeds, configuration, per-arm summary (mean,
    std, min, max) and the paired differences with their intervals."""
    ref: dict[str, Any] = {}
    for stage, name, paired in (("sft", "results.json", "paired_vs_CE"),
                                ("rl", "rl_results.json", "paired_vs_GRPO")):
        fn = os.path.join(out, name)
        if not os.path.exists(fn):
            continue
        with open(fn) as f:
            res = json.load(f)
        seeds = res["config"]["seeds"]
        cmd = "ntl demo" + (" --rl" if stage == "rl" else "") + _arms_option(res["config"]) \
            + " --seeds " + " ".join(map(str, seeds))
        ref[stage] = {
            "command": cmd, "machine": machine, "date": res["date"][:10], "seeds": seeds,
            "versions": res["versions"], "config": reference_config(stage, res["config"]),
            "summary": strip_volatile(res["summary"]), paired: res[paired],
            "verdicts": res["verdicts"], "timing": res["timing"],
        }
        if stage == "rl":
            ref[stage]["summary_before"] = res["summary_before"]
            ref[stage]["change"] = res["change"]
    with open(path, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return ref


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
    if t.get("reused_jobs"):
        print(f"\nreused from {os.path.join(out, 'jobs')} (same settings, code and loss numerics; "
              f"--no-reuse retrains): {', '.join(t['reused_jobs'])}; the timing below is this "
              "run's own")
    print(f"\n{t['total_seconds']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU in {t['jobs']} worker(s) "
          f"on {t['cpu_count']} cores (load {t['load_before']:.1f} -> {t['load_after']:.1f}); wrote "
          f"{os.path.join(out, name)}" + (f" and {os.path.join(out, res['plot'])}" if res.get("plot") else ""))
