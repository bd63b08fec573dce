"""``python -m ntl.bench.sweep``: launch configurations of the fused CE+NTL kernel (issue 29.8).

Times ``ntl.cross_entropy_with_ntl`` (Triton backend) at Qwen2.5's shape (``N = 16384``,
``V = 151,936``, bf16 and fp16) once per ``BLOCK_V / num_warps`` configuration of its
forward kernel ``_ce_ntl_fwd``, so that the first GPU run chooses the launcher's table
(:func:`ntl.kernels.fused_ce.fwd_config`) from measurement. Modes: ``eval`` (no grad: one
read-only pass), ``fwd`` (the forward writes the gradient: two passes over the row) and
``fwd+bwd`` (plus ``loss.backward()`` with ``grad_out == 1``: nothing for bf16, the
``_scale_rows`` pass for fp16's row scales). GPU timings are ``triton.testing.do_bench``
medians (25/75% quantiles kept); each configuration's loss and a sample of gradient rows
are first checked against the launcher's own configuration ("default", measured first).

The override: the launcher asks ``fused_ce.fwd_config(V, K, row_scale)`` for its launch
constants on every call; :func:`forced_fwd_config` replaces that function for the duration
(the module attribute), returning the launcher's choice with ``BLOCK_V``, ``num_warps``
(and ``maxnreg``: dropped unless the configuration names one) replaced. The sweep asserts
the replacement was called on every measured launch path, so a launcher that stops asking
``fwd_config`` fails here instead of silently measuring its default. (A public override,
e.g. a ``config=`` argument of ``ce_ntl_fwd_triton``, would make the patch unnecessary.)

Outputs ``<out>/<stem>.json`` and ``<out>/<stem>.md`` (stem ``sweep-<device slug>``): per
dtype the launcher's default, per configuration the check and the time per mode, and the
best configuration per (dtype, mode). Exit status 1 when a configuration's loss or
gradient disagrees with the default's, or when a configuration the issue names
(:data:`REQUIRED`) or the default failed to run.

``--smoke``: a tiny shape on the CPU under ``TRITON_INTERPRET=1`` (wall-clock timings of
the interpreter, meaningless as numbers): runs every code path of the sweep without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_CONFIGS", "REQUIRED", "forced_fwd_config", "main", "parse_config", "run"]

#: The configurations the issue asks for (``BLOCK_V/num_warps``).
REQUIRED: tuple[str, ...] = ("8192/8", "16384/16", "32768/32")
#: Measured by default: the issue's three and their neighbours in warps.
DEFAULT_CONFIGS: tuple[str, ...] = ("8192/8", "8192/16", "16384/8", "16384/16", "16384/32", "32768/16",
                                    "32768/32")
SMOKE_CONFIGS: tuple[str, ...] = ("128/4", "256/8", "512/16")
MODES: tuple[str, ...] = ("eval", "fwd", "fwd+bwd")
QWEN_V = 151_936
QWEN_DIGIT_IDS = tuple(range(15, 25))  # Qwen2.5's '0'..'9'
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
LOSS_RTOL = 1e-4  # the online softmax sums in another order per BLOCK_V
GRAD_RTOL = 1e-2  # of the row sample's largest entry: a few units in the last place of bf16/fp16


class _NotForced(RuntimeError):
    """The launcher did not take its constants from the override: the sweep measured nothing."""


def parse_config(text: str) -> dict[str, int]:
    """``"BLOCK_V/num_warps[/maxnreg]"`` -> ``{"BLOCK_V", "num_warps"[, "maxnreg"]}``."""
    parts = text.split("/")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or any(n <= 0 for n in nums):
        raise ValueError(f"a configuration is BLOCK_V/num_warps[/maxnreg] of positive ints, got {text!r}")
    block, warps = nums[:2]
    if block & (block - 1) or warps & (warps - 1) or warps > 32:
        raise ValueError(f"BLOCK_V and num_warps must be powers of two (num_warps <= 32), got {text!r}")
    cfg = {"BLOCK_V": block, "num_warps": warps}
    if len(nums) == 3:
        cfg["maxnreg"] = nums[2]
    return cfg


@contextlib.contextmanager
def forced_fwd_config(block_v: int, num_warps: int, maxnreg: int | None = None) -> Iterator[list[dict[str, int]]]:
    """Make the fused launcher use ``BLOCK_V`` / ``num_warps`` (/ ``maxnreg``) while active.

    Yields the list of configurations handed out (one per launch): empty afterwards means
    the launcher did not ask :func:`fused_ce.fwd_config` and nothing was forced.
    """
    from ntl.kernels import ce_ntl as fused_ce

    orig = getattr(fused_ce, "fwd_config", None)
    if orig is None:
        raise RuntimeError("ntl.kernels.fused_ce has no fwd_config: the sweep's override needs the "
                           "launcher to take its constants from it (see ntl.bench.sweep)")
    used: list[dict[str, int]] = []

    def forced(*args: Any, **kw: Any) -> dict[str, int]:
        cfg = dict(orig(*args, **kw))
        cfg.pop("maxnreg", None)
        cfg.update(BLOCK_V=block_v, num_warps=num_warps)
        if maxnreg is not None:
            cfg["maxnreg"] = maxnreg
        used.append(cfg)
        return cfg

    fused_ce.fwd_config = forced
    try:
        yield used
    finally:
        fused_ce.fwd_config = orig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ntl.bench.sweep", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape on the CPU under TRITON_INTERPRET=1 (checks the sweep, measures nothing)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda (--smoke: cpu)")
    p.add_argument("--n", type=int, help="rows N (default 16384; --smoke 32)")
    p.add_argument("--vocab-size", type=int, help=f"V (default {QWEN_V}; --smoke 1000)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    p.add_argument("--configs", nargs="+", metavar="BLOCK_V/WARPS[/MAXNREG]",
                   help=f"default {' '.join(DEFAULT_CONFIGS)} (--smoke: {' '.join(SMOKE_CONFIGS)}); "
                        "the launcher's own choice is always measured first as 'default'")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench rep time in ms (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per mode (default 3; --smoke 1)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new configuration after this many seconds (the rest: skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("ntl-bench"), help="results folder (default ./ntl-bench)")
    p.add_argument("--name", help="file stem (default sweep-<device slug>)")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.n = a.n or (32 if a.smoke else 16384)
    a.vocab_size = a.vocab_size or (1000 if a.smoke else QWEN_V)
    if a.smoke:
        a.repeats = 1
    configs = a.configs or list(SMOKE_CONFIGS if a.smoke else DEFAULT_CONFIGS)
    try:
        a.parsed = [(c, parse_config(c)) for c in dict.fromkeys(configs)]
    except ValueError as e:
        p.error(str(e))
    if a.n < 1 or a.vocab_size <= max(QWEN_DIGIT_IDS):
        p.error(f"--n must be >= 1 and --vocab-size > {max(QWEN_DIGIT_IDS)}")
    if a.repeats < 1 or a.rep_ms < 1:
        p.error("--repeats and --rep-ms must be >= 1")
    if a.time_budget is not None and a.time_budget <= 0:
        p.error("--time-budget must be > 0")
    return a


Timer = Callable[[Callable[[], Any], list[torch.Tensor]], dict[str, float | int]]


def _timer(device: torch.device, rep_ms: int, repeats: int) -> Timer:
    from .measure import _do_bench, summarize

    def cuda(fn: Callable[[], Any], leaves: list[torch.Tensor]) -> dict[str, float | int]:
        return _do_bench(fn, leaves, rep_ms, max(10, rep_ms // 4)).to_dict()

    def cpu(fn: Callable[[], Any], leaves: list[torch.Tensor]) -> dict[str, float | int]:
        xs = []
        for _ in range(repeats):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter_ns()
            fn()
            xs.append((time.perf_counter_ns() - t0) / 1e6)
        return summarize(xs).to_dict()

    return cuda if device.type == "cuda" else cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _check(loss: float, grad_rows: torch.Tensor, ref: tuple[float, torch.Tensor]) -> dict[str, Any]:
    ref_loss, ref_rows = ref
    loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-6)
    scale = max(float(ref_rows.abs().max()), 1e-30)
    grad_err = float((grad_rows - ref_rows).abs().max()) / scale
    return {"loss": loss, "loss_rel_err": loss_err, "grad_rel_err": grad_err,
            "ok": bool(loss_err <= LOSS_RTOL and grad_err <= GRAD_RTOL)}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Measure every (dtype, configuration, mode); return the result document."""
    import ntl
    from ntl.kernels import ce_ntl as fused_ce
    from ntl.kernels import interpreting

    from . import report
    from .cases import make_inputs

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sweep: --device cuda but torch sees no CUDA GPU (use --smoke on a CPU)")
    if device.type == "cpu" and not interpreting():
        raise SystemExit("sweep: on the CPU the Triton kernels need TRITON_INTERPRET=1 (use --smoke)")
    if device.type == "cuda" and interpreting():
        raise SystemExit("sweep: TRITON_INTERPRET=1 on a GPU would time the interpreter; unset it")
    vocab = ntl.DigitVocab(list(QWEN_DIGIT_IDS), vocab_size=a.vocab_size)
    K = len(QWEN_DIGIT_IDS)
    time_fn = _timer(device, a.rep_ms, a.repeats)
    t_start = time.time()
    results: list[dict[str, Any]] = []
    defaults: dict[str, Any] = {}
    g = torch.Generator().manual_seed(a.seed + 7)
    sample = torch.unique(torch.cat([torch.tensor([0, a.n - 1]), torch.randint(0, a.n, (62,), generator=g)]))

    for dt in dict.fromkeys(str(DTYPES[d]).replace("torch.", "") for d in a.dtype):
        dtype = getattr(torch, dt)
        row_scale = dtype == torch.float16
        defaults[dt] = dict(fused_ce.fwd_config(a.vocab_size, K, row_scale))
        inp = make_inputs("logits", a.n, a.vocab_size, dtype, device, vocab, digit_frac=0.2, ignore_frac=0.02,
                          hidden_size=0, seed=a.seed)
        x, labels = inp.logits, inp.labels
        assert x is not None

        def loss_fn(x: torch.Tensor = x, labels: torch.Tensor = labels) -> torch.Tensor:
            out = ntl.cross_entropy_with_ntl(x, labels, vocab, backend="triton")
            assert isinstance(out, torch.Tensor)
            return out

        def eval_fn(loss_fn: Callable[[], torch.Tensor] = loss_fn) -> None:
            with torch.no_grad():
                loss_fn()

        fns: dict[str, Callable[[], Any]] = {"eval": eval_fn, "fwd": loss_fn,
                                              "fwd+bwd": lambda f=loss_fn: f().backward()}
        ref: tuple[float, torch.Tensor] | None = None
        plan: list[tuple[str, dict[str, int] | None]] = [("default", None), *a.parsed]
        for name, cfg in plan:
            rec: dict[str, Any] = {"dtype": dt, "config": name, "is_default": cfg is None,
                                   "required": name in REQUIRED}
            launch = dict(defaults[dt]) if cfg is None else {**{k: v for k, v in defaults[dt].items()
                                                                 if k != "maxnreg"}, **cfg}
            rec.update(BLOCK_V=launch["BLOCK_V"], num_warps=launch["num_warps"], maxnreg=launch.get("maxnreg"))
            if a.time_budget is not None and time.time() - t_start > a.time_budget:
                rec.update(status="skipped", reason=f"time budget: --time-budget {a.time_budget:g} s spent")
                results.append(rec)
                continue
            ctx = contextlib.nullcontext([]) if cfg is None else forced_fwd_config(
                cfg["BLOCK_V"], cfg["num_warps"], cfg.get("maxnreg"))
            try:
                with ctx as used:
                    x.grad = None
                    loss = loss_fn()
                    loss.backward()
                    _sync(device)
                    assert x.grad is not None
                    value, rows = float(loss.detach()), x.grad[sample.to(device)].float().cpu()
                    x.grad = None
                    del loss
                    if ref is None:
                        ref = (value, rows)
                    rec["check"] = _check(value, rows, ref)
                    modes = {}
                    for m in a.modes:
                        n_before = len(used)
                        modes[m] = time_fn(fns[m], [x])
                        if cfg is not None and len(used) == n_before:
                            raise _NotForced("the launcher did not ask fused_ce.fwd_config: nothing was "
                                               "forced (wire the override, see ntl.bench.sweep)")
                    x.grad = None
                rec.update(status="ok" if rec["check"]["ok"] else "mismatch", modes=modes)
            except _NotForced as e:
                x.grad = None
                rec.update(status="not-forced", reason=str(e))
            except Exception as e:  # an out-of-resources config is a result, not a crash
                x.grad = None
                first = str(e).splitlines()[0] if str(e) else ""
                rec.update(status="error", reason=f"{type(e).__name__}: {first}"[:300])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append(rec)
        del x, inp, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()

    best: dict[str, dict[str, str]] = {}
    for r in results:
        if r["status"] != "ok":
            continue
        for m, t in r["modes"].items():
            cur = best.setdefault(r["dtype"], {}).get(m)
            if cur is None or t["median"] < _median(results, r["dtype"], cur, m):
                best[r["dtype"]][m] = r["config"]
    return {
        "schema": "ntl-sweep/1",
        "kernel": "ntl.kernels.fused_ce._ce_ntl_fwd (via ntl.cross_entropy_with_ntl, backend='triton')",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": bool(a.smoke),
        "device": report.device_info(device),
        "versions": report.versions(),
        "config": {"N": a.n, "V": a.vocab_size, "K": K, "dtypes": list(defaults), "modes": list(a.modes),
                   "configs": [c for c, _ in a.parsed], "rep_ms": a.rep_ms, "repeats": a.repeats,
                   "timer": "triton.testing.do_bench" if device.type == "cuda" else "perf_counter (interpreter)",
                   "digit_frac": 0.2, "ignore_frac": 0.02, "seed": a.seed, "time_budget_s": a.time_budget},
        "defaults": defaults,
        "results": results,
        "best": best,
        "elapsed_s": round(time.time() - t_start, 1),
    }


def _median(results: list[dict[str, Any]], dt: str, config: str, mode: str) -> float:
    for r in results:
        if r["dtype"] == dt and r["config"] == config and r["status"] == "ok":
            return r["modes"][mode]["median"]
    raise KeyError((dt, config, mode))


def problems(doc: dict[str, Any]) -> list[str]:
    """What makes the sweep fail: mismatches, an unused override, and errors of a required or
    the default configuration (another one that cannot run, e.g. out of resources, is a result)."""
    out = []
    for r in doc["results"]:
        where = f"{r['dtype']} {r['config']}"
        if r["status"] == "not-forced":
            out.append(f"{where}: {r['reason']}")
        elif r["status"] == "mismatch":
            out.append(f"{where}: loss/gradient differ from the default's: {r['check']}")
        elif r["status"] == "error" and (r["required"] or r["is_default"]):
            out.append(f"{where}: {r['reason']}")
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    lines = [f"# Fused CE+NTL launch sweep: {doc['device']['name']}", "",
             f"{doc['date']}, N = {c['N']}, V = {c['V']}, K = {c['K']}; {c['timer']}, median ms "
             f"(in brackets: / the launcher's default). Kernel: {doc['kernel']}."]
    if doc["smoke"]:
        lines += ["", "**Smoke run** (CPU, Triton interpreter, tiny shape): checks the sweep, the "
                      "times measure nothing."]
    for dt in c["dtypes"]:
        d = doc["defaults"][dt]
        lines += ["", f"## {dt}", "",
                  f"Launcher default: BLOCK_V {d['BLOCK_V']}, num_warps {d['num_warps']}"
                  + (f", maxnreg {d['maxnreg']}" if d.get("maxnreg") else "") + ".", "",
                  "| config | BLOCK_V | warps | maxnreg | " + " | ".join(c["modes"]) + " | check |",
                  "|---|---:|---:|---:|" + "---:|" * len(c["modes"]) + "---|"]
        base = next((r for r in doc["results"] if r["dtype"] == dt and r["is_default"] and r["status"] == "ok"),
                    None)
        for r in (r for r in doc["results"] if r["dtype"] == dt):
            cells = []
            for m in c["modes"]:
                if r["status"] not in ("ok", "mismatch"):
                    cells.append("-")
                    continue
                t = r["modes"][m]["median"]
                rel = f" ({t / base['modes'][m]['median']:.2f}x)" if base else ""
                star = " **best**" if doc["best"].get(dt, {}).get(m) == r["config"] else ""
                cells.append(f"{t:.3f}{rel}{star}")
            if r["status"] in ("ok", "mismatch"):
                chk = r["check"]
                check = f"{'ok' if chk['ok'] else 'MISMATCH'} (loss {chk['loss_rel_err']:.1e}, grad " \
                        f"{chk['grad_rel_err']:.1e})"
            else:
                check = f"{r['status']}: {r.get('reason', '')}"
            lines.append(f"| {r['config']}{' (required)' if r['required'] else ''} | {r['BLOCK_V']} | "
                         f"{r['num_warps']} | {r['maxnreg'] or '-'} | " + " | ".join(cells) + f" | {check} |")
    bad = problems(doc)
    lines += ["", "Problems: " + ("; ".join(bad) if bad else "none"), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    doc = run(a)
    from . import report

    stem = a.name or f"sweep-{report.slug(doc['device']['slug'])}"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(render_markdown(doc))
    print(render_markdown(doc))
    print(f"sweep: wrote {a.out / stem}.json and .md")
    bad = problems(doc)
    if bad:
        print("sweep: FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
