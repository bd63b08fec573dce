"""``ntl bench`` / ``python -m benchmarks``: speed and memory of ntl against its peers.

Runs every selected (N, dtype, case, provider), checks each provider's loss
against a float64 reference, times fwd / bwd / fwd+bwd and measures peak memory
(see :mod:`benchmarks.measure`), then prints a table and writes
``<out>/<device>[-quick].{json,md,png}``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import logging
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import report
from .cases import CASES, Ctx, Inputs, Unavailable, expected_values, make_inputs, rel_err
from .measure import MODES, cpu_measure, cuda_empty_launch_ms, cuda_measure

__all__ = ["main", "parse_args", "run"]

log = logging.getLogger("ntl")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
QWEN_V = 151_936
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
#: Loss check tolerance (relative, with an absolute floor) per input dtype.
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (5e-3, 1e-3)}


def _n(text: str) -> int:
    t = text.strip().lower()
    mult = 1024 if t.endswith("k") else 1
    return int(float(t.rstrip("k")) * mult)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ntl bench",
        description="Speed and peak memory of ntl vs the eager PyTorch reference, torch.compile, ntloss "
                    "and Liger-Kernel at Qwen2.5 shapes (V=151936).",
    )
    p.add_argument("--quick", action="store_true",
                   help="small run: N=1024 (CPU: fp32, 3 repeats, core providers; < 2 min on 2 cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--n", nargs="+", type=_n, metavar="N",
                   help="token counts (e.g. 1k 2k 4k); default CPU 1k 2k 4k, GPU 1k..32k")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), metavar="DTYPE",
                   help="float32 / bfloat16 (default: fp32 on CPU, fp32+bf16 on GPU)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                   help=f"subset of {', '.join(CASES)} (default: all; --quick: a core subset)")
    p.add_argument("--providers", nargs="+", metavar="KEY", help="only these provider keys (see --list)")
    p.add_argument("--repeats", type=int, help="CPU timed runs per provider (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="CPU warm-up runs (the first one is profiled for memory); default 1")
    p.add_argument("--rep-ms", type=int, help="GPU do_bench rep time in ms (default 100; --quick 50)")
    p.add_argument("--hidden-size", type=int, help="H for the hidden case (default CPU 64, GPU 3584)")
    p.add_argument("--vocab-size", type=int, default=QWEN_V, help="V (default Qwen2.5's 151936)")
    p.add_argument("--digit-frac", type=float, default=0.2, help="share of digit labels (default 0.2)")
    p.add_argument("--ignore-frac", type=float, default=0.02, help="share of -100 labels (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--name", help="file stem (default: device slug, plus -quick for --quick)")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no files")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list cases and providers and exit")
    a = p.parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        p.error("--repeats must be >= 1")
    if not 0 <= a.digit_frac + a.ignore_frac <= 1:
        p.error("--digit-frac + --ignore-frac must lie in [0, 1]")
    return a


def _list() -> str:
    lines = []
    for c in CASES.values():
        lines.append(f"{c.name}: {c.title}")
        for pr in c.providers:
            tags = [t for t, on in (("GPU only", pr.gpu_only), ("in place", pr.inplace),
                                    ("full mode", not pr.quick), ("not on CPU", not pr.cpu)) if on]
            lines.append(f"  {pr.key:18s} {pr.label}" + (f"  [{', '.join(tags)}]" if tags else ""))
    return "\n".join(lines)


class _Progress:
    """tqdm on stderr when installed, else one line per step."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.n, self.total, self.t0 = enabled, 0, total, time.time()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc)
        elif self.enabled:
            print(f"[{self.n + 1}/{self.total} {time.time() - self.t0:5.0f}s] {desc} ...", file=sys.stderr,
                  flush=True)

    def done(self, msg: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
            self.bar.update(1)
        elif self.enabled:
            print(f"    {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e) or (
        "out of memory" in str(e).lower())


def _free(device: torch.device, full: bool = False) -> None:
    gc.collect() if full else gc.collect(1)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_one(pr: Any, ctx: Ctx, inp: Inputs, expected: dict[str, float], a: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    inp.restore()
    fwd = pr.build(ctx, inp)  # raises Unavailable
    leaves = inp.leaves()
    if device.type == "cuda":
        loss = fwd()  # first call: compile / autotune, and the value to check
        value = float(loss.detach().float())
        loss.backward()
        del loss
        for t in leaves:
            t.grad = None
        if pr.inplace:
            inp.dirty = True
        timings, mem = cuda_measure(fwd, leaves, rep_ms=a.rep_ms, warmup_ms=max(10, a.rep_ms // 4))
    else:
        loss, timings, mem = cpu_measure(fwd, leaves, repeats=a.repeats, warmup=a.warmup)
        value = float(loss.float())
        if pr.inplace:
            inp.dirty = True
    rec: dict[str, Any] = {"status": "ok",
                           "modes": {m: {"time_ms": timings[m].to_dict(), "peak_mem_bytes": int(mem[m])}
                                     for m in MODES}}
    if pr.expect is not None and pr.expect in expected:
        exp = expected[pr.expect]
        rtol, atol = TOL[inp.dtype]
        err = rel_err(value, exp)
        rec["check"] = {"value": value, "expected": exp, "rel_err": err,
                        "ok": bool(abs(value - exp) <= max(atol, rtol * abs(exp)))}
    return rec


def run(a: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """Run the selected benchmarks; return the result document (see README for the schema).

    ``tokenizer`` (default: Qwen2.5's, built offline) supplies the digit tokens; tests
    pass a tiny one together with a small ``--vocab-size``.
    """
    import ntl
    from ntl.tokenizers import qwen2_tokenizer

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    gpu = device.type == "cuda"
    Ns = a.n or ([1024] if a.quick and not gpu else [1024, 16384] if a.quick else
                 [1024, 2048, 4096, 8192, 16384, 32768] if gpu else [1024, 2048, 4096])
    dts = a.dtype or (["bfloat16"] if a.quick and gpu else ["float32", "bfloat16"] if gpu else ["float32"])
    dtypes = list(dict.fromkeys(str(DTYPES[d]).replace("torch.", "") for d in dts))
    if not gpu and "bfloat16" in dtypes and not a.dtype:
        dtypes.remove("bfloat16")
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.rep_ms = a.rep_ms or (50 if a.quick else 100)
    H = a.hidden_size or (3584 if gpu else 64)
    a.hidden_size = H
    case_names = a.cases or [c.name for c in CASES.values() if not a.quick or (c.quick and (gpu or c.quick_cpu))]

    tok = tokenizer if tokenizer is not None else qwen2_tokenizer()
    vocab = ntl.DigitVocab.from_tokenizer(tok, vocab_size=a.vocab_size)
    ctx = Ctx(tok, vocab, a.vocab_size)

    def selected(pr: Any) -> str | None:
        if a.providers and pr.key not in a.providers:
            return "deselected"
        if a.quick and not pr.quick and not a.providers:
            return "not in --quick"
        if not gpu and pr.gpu_only:
            return "GPU only"
        if not gpu and not pr.cpu:
            return "GPU runs only (slow on CPU)"
        return None

    plan = [(N, dt, c) for N in Ns for dt in dtypes for c in case_names]
    total = sum(1 for _, _, c in plan for pr in CASES[c].providers if selected(pr) is None)
    prog = _Progress(total, not a.no_progress)
    records: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {"empty_kernel_launch_ms": None}
    if gpu:
        try:
            baselines["empty_kernel_launch_ms"] = cuda_empty_launch_ms(a.rep_ms).to_dict()
        except Exception as e:
            log.warning("empty kernel launch timing failed: %s", e)
    t_start = time.time()
    for N in Ns:
        for dt in dtypes:
            dtype = DTYPES[dt]
            inputs: dict[str, Inputs] = {}
            exp: dict[str, dict[str, float]] = {}
            for cname in case_names:
                case = CASES[cname]
                if case.inputs not in inputs:
                    inputs.clear()
                    exp.clear()
                    _free(device, full=True)
                    prog.start(f"N={N} {dt}: making {case.inputs} inputs")
                    try:
                        inputs[case.inputs] = make_inputs(case.inputs, N, a.vocab_size, dtype, device, vocab,
                                                          digit_frac=a.digit_frac, ignore_frac=a.ignore_frac,
                                                          hidden_size=H, seed=a.seed)
                        exp[case.inputs] = expected_values(inputs[case.inputs])
                    except Exception as e:
                        if not _is_oom(e):
                            raise
                        inputs.pop(case.inputs, None)
                inp = inputs.get(case.inputs)
                for pr in case.providers:
                    base = {"case": cname, "provider": pr.key, "label": pr.label, "N": N, "dtype": dt}
                    why = selected(pr)
                    if why == "deselected":
                        continue
                    if why is not None:
                        records.append({**base, "status": "skipped", "reason": why})
                        continue
                    prog.start(f"N={N} {dt} {cname}: {pr.key}")
                    if inp is None:
                        rec = {"status": "oom", "reason": "inputs do not fit in memory"}
                    else:
                        try:
                            rec = _measure_one(pr, ctx, inp, exp[case.inputs], a, device)
                        except Unavailable as e:
                            rec = {"status": "skipped", "reason": str(e)}
                        except Exception as e:
                            oom = _is_oom(e)
                            rec = {"status": "oom" if oom else "error",
                                   "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                            if not oom:
                                log.debug("provider %s failed:\n%s", pr.key, traceback.format_exc())
                            if pr.inplace:
                                inp.dirty = True
                        for t in inp.leaves():
                            t.grad = None
                        _free(device)
                    records.append({**base, **rec})
                    prog.done(_one_line(records[-1]))
            inputs.clear()
            _free(device, full=True)
    prog.close()
    report.add_ratios(records, CASES)
    dev = report.device_info(device)
    ntl_backend = ("auto -> Triton kernels on CUDA" if gpu else "auto -> PyTorch path on CPU")
    doc: dict[str, Any] = {
        "schema": report.SCHEMA,
        "device": dev,
        "versions": report.versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": a.command,
        "mode": "quick" if a.quick else "full",
        "wall_s": round(time.time() - t_start, 1),
        "config": {
            "vocab_size": a.vocab_size, "Ns": Ns, "dtypes": dtypes, "digit_frac": a.digit_frac,
            "ignore_frac": a.ignore_frac, "hidden_size": H, "ntl_weight": 0.3, "seed": a.seed,
            "cases": case_names, "ntl_backend": ntl_backend,
            "timer": (f"triton.testing.do_bench (rep {a.rep_ms} ms), median and 25/75% quantiles" if gpu else
                      f"wall clock, {a.warmup} warm-up + {a.repeats} timed runs, median and IQR; fwd and bwd "
                      "timed within the same runs"),
            "memory": ("torch.cuda.max_memory_allocated minus memory_allocated before the call" if gpu else
                       "torch.profiler allocator events (profile_memory=True), peak of the running sum of "
                       "bytes allocated during the call"),
        },
        "cases": {c: CASES[c].title for c in case_names},
        "baselines": baselines,
        "results": records,
    }
    doc["targets"] = report.evaluate_targets(records, device.type, baselines)
    return doc


def _one_line(r: dict[str, Any]) -> str:
    head = f"{r['case']:8s} N={r['N']:<6d} {r['dtype']:9s} {r['provider']:18s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    fb = r["modes"]["fwd+bwd"]
    chk = r.get("check")
    c = "" if not chk else (" check ok" if chk["ok"] else f" CHECK MISMATCH (rel {chk['rel_err']:.1e})")
    return (f"{head} fwd+bwd {fb['time_ms']['median']:9.2f} ms  peak {fb['peak_mem_bytes'] / 2**20:8.1f} MiB"
            f"{c}")


def main(argv: list[str] | None = None, *, tokenizer: Any = None) -> int:
    """Entry point of ``ntl bench`` and ``python -m benchmarks``; returns the exit status
    (1 when a provider errored or its loss disagreed with the float64 reference)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.list:
        print(_list())
        return 0
    a.command = "ntl bench " + " ".join(shlex.quote(x) for x in argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    doc = run(a, tokenizer)
    title = (f"ntl bench: {doc['device']['name']} | torch {doc['versions']['torch']} | "
             f"{doc['mode']} | {doc['wall_s']} s")
    report.print_table(doc["results"], doc["targets"], title)
    if not a.no_save:
        stem = a.name or (doc["device"]["slug"] + ("-quick" if a.quick else ""))
        for path in report.write_outputs(doc, a.out, stem, make_plot=not a.no_plot):
            print(f"wrote {path}", file=sys.stderr)
    bad = [r for r in doc["results"] if r.get("check") and not r["check"]["ok"]]
    errors = [r for r in doc["results"] if r["status"] == "error"]
    for r in bad:
        print(f"warning: {r['case']} {r['provider']} N={r['N']} {r['dtype']}: loss {r['check']['value']:.6g} "
              f"!= reference {r['check']['expected']:.6g}", file=sys.stderr)
    return 1 if (bad or errors) else 0
