"""``ntl bench`` / ``python -m ntl.bench``: speed and memory of ntl against its peers.

Runs every selected (N, dtype, case, provider), checks each provider's loss
against a float64 reference, times fwd / bwd / fwd+bwd and measures peak memory
(see :mod:`ntl.bench.measure`), then prints a table and writes
``<out>/<device>[-quick].{json,md,png}``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import parity, report, rivals  # noqa: F401  (parity, rivals register their cases in CASES)
from .cases import CASES, Ctx, Inputs, Unavailable, expected_values, make_inputs, rel_err
from .measure import (
    MODES,
    cpu_first_run,
    cpu_timed_run,
    cuda_empty_launch_ms,
    cuda_measure,
    summarize,
)

__all__ = ["main", "parse_args", "run"]

log: logging.Logger = logging.getLogger("ntl")

DEFAULT_OUT = Path("ntl-bench")  # relative to the current directory; commit with --out benchmarks/results
QWEN_V = 151_936
#: ``--tokenizer`` choices: the real tokenizers whose whole number vocabulary a run can measure.
TOKENIZERS = ("qwen2", "llama3")
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
                    "and Liger-Kernel at Qwen2.5's shape (V=151936, 10 digit tokens) and/or Llama-3's "
                    "(V=128256, 1,110 number tokens; --tokenizer llama3).",
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
    p.add_argument("--skip-providers", nargs="+", metavar="KEY", default=[],
                   help="leave these provider keys out (e.g. torch-compile, whose compile takes ~20 s a shape)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new (N, dtype, case) after this many seconds; what is left is "
                        "reported as skipped ('time budget'), so a GPU check ends in time (order --n "
                        "by priority)")
    p.add_argument("--repeats", type=int, help="CPU timed runs per provider (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="CPU warm-up runs per provider; the first is the profiled check/memory run, "
                        "which always happens (default 1)")
    p.add_argument("--rep-ms", type=int, help="GPU do_bench rep time in ms (default 100; --quick 50)")
    p.add_argument("--hidden-size", type=int,
                   help="H for the hidden-state cases (default: hidden CPU 64, GPU 3584; linear CPU 896, GPU 3584)")
    p.add_argument("--tokenizer", nargs="+", choices=TOKENIZERS, default=["qwen2"], metavar="TOKENIZER",
                   help="the real tokenizer(s) whose whole number vocabulary (ntl.vocab_for_tokenizer) and V "
                        "the run measures, side by side when several are given: qwen2 (Qwen2.5: DigitVocab, "
                        "K=10, V=151936; the default) and/or llama3 (Llama-3: NumberVocab of its 1,110 number "
                        "tokens '0'..'999', K=1110, V=128256). The ntloss-parity cases and the ntloss "
                        "providers are digit-level: skipped, with the reason, for llama3")
    p.add_argument("--vocab-size", type=int,
                   help="V (default: the tokenizer's model vocabulary, Qwen2.5's 151936 or Llama-3's 128256)")
    p.add_argument("--digit-frac", type=float, default=0.2,
                   help="share of labels that are number tokens of the vocab (digits for qwen2; default 0.2)")
    p.add_argument("--ignore-frac", type=float, default=0.02, help="share of -100 labels (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results directory (default ./ntl-bench in the current directory; "
                        "the repo commits its results with --out benchmarks/results)")
    p.add_argument("--name", help="file stem (default: device slug, plus -quick for --quick)")
    p.add_argument("--append", action="store_true",
                   help="merge into the existing <out>/<stem>.json of the same device (new results replace "
                        "the same case/provider/N/dtype): run a long GPU benchmark in several commands")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no files")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list cases and providers and exit")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(T) in every measuring process")
    p.add_argument("--isolate", action="store_true",
                   help="run every provider in a fresh Python process (honest peak memory, no state "
                        "shared between providers); the loss check runs once in this process")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --isolate: rounds of one process per provider, providers alternating; "
                        "timed samples are pooled over the rounds (default 1)")
    # internal: a child of --isolate writes its records to this file
    p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--digit-ids", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.rounds > 1 and not a.isolate:
        p.error("--rounds needs --isolate (in one process the providers' runs are interleaved already)")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    if a.repeats is not None and a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.time_budget is not None and a.time_budget <= 0:
        p.error("--time-budget must be > 0")
    unknown = sorted(set(a.skip_providers) - {pr.key for c in CASES.values() for pr in c.providers})
    if unknown:
        p.error(f"--skip-providers: unknown provider keys {unknown} (see --list)")
    if not 0 <= a.digit_frac + a.ignore_frac <= 1:
        p.error("--digit-frac + --ignore-frac must lie in [0, 1]")
    if len(set(a.tokenizer)) != len(a.tokenizer):
        p.error(f"--tokenizer: each tokenizer once, got {a.tokenizer}")
    if a.vocab_size is not None and a.vocab_size < 1:
        p.error("--vocab-size must be >= 1")
    return a


@dataclass
class _VocabRun:
    """One number vocab a run measures: the tokenizer's name (``--tokenizer``), its label in the
    results (``custom`` for a tokenizer passed to :func:`main`), tokenizer, vocab, ``V`` and the
    providers' context."""

    tokenizer: str
    name: str
    tok: Any
    vocab: Any
    V: int
    ctx: Ctx

    def info(self) -> dict[str, Any]:
        w = self.vocab.widths
        return {"name": self.name, "tokenizer": self.tokenizer, "class": type(self.vocab).__name__,
                "K": self.vocab.K, "V": self.V, "max_width": None if w is None else max(w)}


def _vocab_runs(a: argparse.Namespace, tokenizer: Any) -> list[_VocabRun]:
    """The vocabs of ``--tokenizer``: ``ntl.vocab_for_tokenizer`` of the real tokenizer (Qwen2.5:
    its DigitVocab, K = 10; Llama-3: the NumberVocab of all 1,110 number tokens), V the model's
    vocabulary (``--vocab-size`` overrides it). ``tokenizer`` (tests) stands in for qwen2; an
    ``--isolate`` child of such a run gets the digit ids only (``--digit-ids``)."""
    import ntl
    from ntl.tokenizers import llama3_tokenizer, qwen2_tokenizer

    runs = []
    for name in a.tokenizer:
        label = "custom" if name == "qwen2" and (tokenizer is not None or a.digit_ids) else name
        if a.digit_ids:  # an --isolate child of a run with a custom tokenizer: only the digit ids travel
            V = a.vocab_size or QWEN_V
            tok, vocab = None, ntl.DigitVocab([int(x) for x in a.digit_ids.split(",")], vocab_size=V)
        elif name == "qwen2":
            tok = tokenizer if tokenizer is not None else qwen2_tokenizer()
            V = a.vocab_size or QWEN_V
            vocab = ntl.vocab_for_tokenizer(tok, vocab_size=V)
        else:
            tok = llama3_tokenizer()
            V = a.vocab_size or len(tok)
            vocab = ntl.vocab_for_tokenizer(tok, vocab_size=V)
        runs.append(_VocabRun(name, label, tok, vocab, V, Ctx(tok, vocab, V)))
    return runs


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
    """tqdm on stderr when installed, else a line per provider; ``--no-progress`` silences it."""

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
            print(f"[{self.n}/{self.total} {time.time() - self.t0:5.0f}s] {desc}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        elif self.enabled:
            print(f"    {msg}", file=sys.stderr, flush=True)

    def update(self, n: int, msg: str | None = None) -> None:
        self.n += n
        if msg:
            self.write(msg)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _loadavg() -> float | None:
    """1-minute load average of the host (CPU timings on a shared machine depend on it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e) or (
        "out of memory" in str(e).lower())


def _free(device: torch.device, full: bool = False) -> None:
    gc.collect() if full else gc.collect(1)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check(pr: Any, value: float, expected: dict[str, float], dtype: torch.dtype) -> dict[str, Any] | None:
    """Compare a provider's loss with the float64 reference value it should equal."""
    if pr.expect is None or pr.expect not in expected:
        return None
    exp = expected[pr.expect]
    rtol, atol = TOL[dtype]
    return {"value": value, "expected": exp, "rel_err": rel_err(value, exp),
            "ok": bool(abs(value - exp) <= max(atol, rtol * abs(exp)))}


def _failure(e: BaseException, pr: Any) -> dict[str, Any]:
    if isinstance(e, Unavailable):
        return {"status": "skipped", "reason": str(e)}
    oom = _is_oom(e)
    first = str(e).splitlines()[0] if str(e) else ""
    if not oom:
        log.debug("provider %s failed:\n%s", pr.key, traceback.format_exc())
    return {"status": "oom" if oom else "error", "reason": f"{type(e).__name__}: {first}"[:300]}


def _modes(timings: dict[str, Any], mem: dict[str, int]) -> dict[str, Any]:
    return {m: {"time_ms": timings[m].to_dict(), "peak_mem_bytes": int(mem[m])} for m in MODES}


def _run_case(case: Any, inp: Inputs | None, expected: dict[str, float], ctx: Ctx, a: argparse.Namespace,
              device: torch.device, selected: Any, prog: _Progress, N: int, dt: str) -> list[dict[str, Any]]:
    """Measure the selected providers of one case on one shape.

    GPU: one provider after the other (check call, ``do_bench`` per mode, memory run).
    CPU: a profiled check/memory run per provider, then ``repeats`` rounds in which
    every provider runs once (in-place ones last), so that load changes on a shared
    machine hit all providers of the comparison alike.
    """
    gpu = device.type == "cuda"
    order: list[Any] = []
    recs: dict[str, dict[str, Any]] = {}
    built: list[tuple[Any, Any]] = []
    for pr in case.providers:
        why = selected(pr)
        if why == "deselected":
            continue
        order.append(pr)
        if why is not None:
            recs[pr.key] = {"status": "skipped", "reason": why}
            continue
        if inp is None:
            recs[pr.key] = {"status": "oom", "reason": "inputs do not fit in memory"}
            prog.update(1 if gpu else 1 + a.repeats, _one_line(_rec(case, pr, N, dt, recs[pr.key])))
            continue
        prog.start(f"N={N} {dt} {case.name}: {pr.key}" + ("" if gpu else " (check + memory)"))
        leaves = inp.leaves()
        try:
            inp.restore()
            fwd = pr.build(ctx, inp)
            if gpu:
                loss = fwd()  # first call: compile / autotune, and the value to check
                value = float(loss.detach().float())
                loss.backward()
                del loss
                for t in leaves:
                    t.grad = None
                if pr.inplace:
                    inp.dirty = True
                timings, mem = cuda_measure(fwd, leaves, rep_ms=a.rep_ms, warmup_ms=max(10, a.rep_ms // 4))
                recs[pr.key] = {"status": "ok", "modes": _modes(timings, mem), "value": value,
                                "check": _check(pr, value, expected, inp.dtype)}
            else:
                loss, mem = cpu_first_run(fwd, leaves)
                if pr.inplace:
                    inp.dirty = True
                for _ in range(max(0, a.warmup - 1)):
                    cpu_timed_run(fwd, leaves)
                recs[pr.key] = {"status": "ok", "mem": mem, "value": float(loss.float()),
                                "check": _check(pr, float(loss.float()), expected, inp.dtype)}
                built.append((pr, fwd))
        except Exception as e:
            recs[pr.key] = _failure(e, pr)
            if pr.inplace:
                inp.dirty = True
        for t in leaves:
            t.grad = None
        _free(device)
        if gpu or recs[pr.key]["status"] != "ok":
            prog.update(1 if gpu else 1 + a.repeats, _one_line(_rec(case, pr, N, dt, recs[pr.key])))
        else:
            prog.update(1)
    if built:  # CPU: interleaved timed rounds
        built.sort(key=lambda b: b[0].inplace)
        samples: dict[str, dict[str, list[float]]] = {pr.key: {m: [] for m in MODES} for pr, _ in built}
        for r in range(a.repeats):
            for pr, fwd in list(built):
                prog.start(f"N={N} {dt} {case.name}: {pr.key} (run {r + 1}/{a.repeats})")
                try:
                    if not pr.inplace:
                        inp.restore()  # type: ignore[union-attr]
                    for m, v in cpu_timed_run(fwd, inp.leaves()).items():  # type: ignore[union-attr]
                        samples[pr.key][m].append(v)
                except Exception as e:
                    recs[pr.key] = _failure(e, pr)
                    built.remove((pr, fwd))
                    prog.update(a.repeats - r, _one_line(_rec(case, pr, N, dt, recs[pr.key])))
                    continue
                finally:
                    if pr.inplace:
                        inp.dirty = True  # type: ignore[union-attr]
                prog.update(1)
        for pr, _ in built:
            rec = recs[pr.key]
            mem = rec.pop("mem")
            rec["modes"] = _modes({m: summarize(samples[pr.key][m]) for m in MODES}, mem)
            if a.worker_json is not None:  # an --isolate child: the parent pools the raw samples
                rec["samples_ms"] = samples[pr.key]
            prog.write(_one_line(_rec(case, pr, N, dt, rec)))
    return [_rec(case, pr, N, dt, recs[pr.key]) for pr in order]


def _run_fixed(case: Any, tok: Any, a: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               dt: str, selected: Any, prog: _Progress) -> list[dict[str, Any]]:
    """A case with its own ``(N, V, digit_frac, ignore_frac)`` (``Case.fixed``): own inputs and
    vocab width, the same measurement as every other case."""
    import ntl

    N, V, digit_frac, ignore_frac = case.fixed
    _free(device, full=True)
    vocab = ntl.DigitVocab.from_tokenizer(tok, vocab_size=V)
    ctx = Ctx(tok, vocab, V)
    prog.start(f"N={N} V={V} {dt}: making {case.inputs} inputs")
    try:
        inp = make_inputs(case.inputs, N, V, dtype, device, vocab, digit_frac=digit_frac,
                          ignore_frac=ignore_frac, hidden_size=a.hidden_size, seed=a.seed)
        exp = expected_values(inp)
        if case.expected is not None:
            exp.update(case.expected(inp))
    except Exception as e:
        if not _is_oom(e):
            raise
        inp, exp = None, {}
    recs = _run_case(case, inp, exp, ctx, a, device, selected, prog, N, dt)
    del inp
    _free(device, full=True)
    return recs


def _runs_with(case: Any, vr: _VocabRun) -> str | None:
    """None when ``case`` runs with ``vr``'s vocab, else the reason it is skipped."""
    if case.any_vocab or vr.vocab.is_digit_vocab:
        return None
    return (f"digit-level case (ntloss parity): not run with the {vr.name} vocab "
            f"({type(vr.vocab).__name__}, K={vr.vocab.K})")


def _run_vocab_case(vr: _VocabRun, cname: str, N: int, dt: str, dtype: torch.dtype, a: argparse.Namespace,
                    device: torch.device, gpu: bool, case_Ns: dict[str, list[int]], selected: Any,
                    prog: _Progress, t_start: float, inputs: dict[Any, Inputs],
                    exp: dict[Any, dict[str, float]]) -> list[dict[str, Any]]:
    """One selected case at (N, dtype) with one vocab (its V, number tokens, labels).
    ``inputs`` / ``exp``: this vocab's inputs and float64 check values at (N, dtype), kept
    across its cases (made when a case needs another kind)."""
    records: list[dict[str, Any]] = []
    if N not in case_Ns[cname]:
        return records
    case = CASES[cname]
    why_not = _runs_with(case, vr)
    if why_not is not None:
        records += [_rec(case, pr, N, dt, {"status": "skipped", "reason": why_not})
                    for pr in case.providers if selected(pr) != "deselected"]
        return records
    if a.time_budget is not None and time.time() - t_start > a.time_budget:
        why = f"time budget: --time-budget {a.time_budget:g} s was spent before this case"
        log.warning("N=%d %s %s: %s", N, dt, cname, why)
        records += [_rec(case, pr, N, dt, {"status": "skipped", "reason": why})
                    for pr in case.providers if selected(pr) != "deselected"]
        return records
    if case.fixed is not None:  # its own shape, once per dtype
        if case_Ns[cname][0] == N:
            records += _run_fixed(case, vr.tok, a, device, dtype, dt, selected, prog)
        return records
    Hc = _case_H(case, a, gpu)
    key = (case.inputs, Hc)
    if key not in inputs:
        inputs.clear()
        exp.clear()
        _free(device, full=True)
        prog.start(f"N={N} {dt} {vr.name} (V={vr.V}, K={vr.vocab.K}): making {case.inputs} inputs")
        try:
            inputs[key] = make_inputs(case.inputs, N, vr.V, dtype, device, vr.vocab,
                                      digit_frac=a.digit_frac, ignore_frac=a.ignore_frac,
                                      hidden_size=Hc, seed=a.seed)
            # an --isolate child leaves the check to its parent
            exp[key] = expected_values(inputs[key]) if a.worker_json is None else {}
        except Exception as e:
            if not _is_oom(e):
                raise
            inputs.pop(key, None)
    inp, e = inputs.get(key), exp.get(key, {})
    if case.expected is not None and inp is not None:
        e = {**e, **case.expected(inp)}
    if a.isolate:
        inputs.clear()  # the children make their own; this process keeps only the check values
        _free(device, full=True)
        records += _run_case_isolated(case, e, a, device, selected, prog, N, dt, Hc, vr,
                                      vr.name == "custom")
        exp.clear()
        return records
    rss_base = _max_rss_bytes()
    recs = _run_case(case, inp, e, vr.ctx, a, device, selected, prog, N, dt)
    if a.worker_json is not None:
        for r in recs:
            r["rss"] = {"base_bytes": rss_base, "peak_bytes": _max_rss_bytes()}
    records += recs
    return records


def _rec(case: Any, pr: Any, N: int, dt: str, rec: dict[str, Any]) -> dict[str, Any]:
    return {"case": case.name, "provider": pr.key, "label": pr.label, "N": N, "dtype": dt, **rec}


def _case_H(case: Any, a: argparse.Namespace, gpu: bool) -> int:
    """Hidden size of a case's inputs: ``--hidden-size``, else the case's default, else 3584 / 64."""
    if a.hidden_size_arg:
        return a.hidden_size_arg
    if case.hidden_size:
        return case.hidden_size[1 if gpu else 0]
    return 3584 if gpu else 64


def _case_Ns(case: Any, a: argparse.Namespace, gpu: bool, Ns: list[int]) -> list[int]:
    """The token counts a case runs at: ``--n``, else the case's CPU default, else the run's."""
    if a.n or gpu or not case.cpu_ns:
        return Ns
    return list(case.cpu_ns)


def _selector(a: argparse.Namespace, gpu: bool) -> Any:
    def selected(pr: Any) -> str | None:
        if (a.providers and pr.key not in a.providers) or pr.key in a.skip_providers:
            return "deselected"
        if a.quick and not pr.quick and not a.providers:
            return "not in --quick"
        if not gpu and pr.gpu_only:
            return "GPU only"
        if not gpu and not pr.cpu:
            return "GPU runs only (slow on CPU)"
        return None
    return selected


def _max_rss_bytes() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not on every platform
        return None


def run(a: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """Run the selected benchmarks; return the result document (see README for the schema).

    ``tokenizer`` (default: Qwen2.5's, built offline) supplies the digit tokens of
    ``--tokenizer qwen2``; tests pass a tiny one together with a small ``--vocab-size``.
    With several ``--tokenizer``, every (N, dtype) runs each vocab's cases in turn; each
    record names its vocab (``vocab``).
    """
    if a.threads:
        torch.set_num_threads(a.threads)
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
    a.hidden_size_arg = getattr(a, "hidden_size_arg", a.hidden_size)
    H = a.hidden_size_arg or (3584 if gpu else 64)
    a.hidden_size = H
    case_names = a.cases or [c.name for c in CASES.values() if not a.quick or (c.quick and (gpu or c.quick_cpu))]
    case_Ns = {c: _case_Ns(CASES[c], a, gpu, Ns) for c in case_names}
    all_Ns = sorted(set().union(*case_Ns.values())) if case_Ns else Ns

    vruns = _vocab_runs(a, tokenizer)
    selected = _selector(a, gpu)

    plan = [(N, dt, c) for N in all_Ns for dt in dtypes for c in case_names
            if N in case_Ns[c] and (CASES[c].fixed is None or case_Ns[c][0] == N)]  # fixed shape: once per dtype
    per = 1 if gpu else 1 + a.repeats  # progress units per provider
    if a.isolate:
        per = a.rounds
    total = per * sum(1 for vr in vruns for _, _, c in plan for pr in CASES[c].providers
                      if selected(pr) is None and _runs_with(CASES[c], vr) is None)
    prog = _Progress(total, not a.no_progress)
    records: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {"empty_kernel_launch_ms": None}
    if gpu and a.worker_json is None:
        try:
            baselines["empty_kernel_launch_ms"] = cuda_empty_launch_ms(a.rep_ms).to_dict()
        except Exception as e:
            log.warning("empty kernel launch timing failed: %s", e)
    t_start = time.time()
    vers = report.versions()  # at the start: the code measured, even if the checkout moves meanwhile
    load_start = _loadavg()
    for N in all_Ns:
        for dt in dtypes:
            dtype = DTYPES[dt]
            # each case with every vocab in turn (its inputs kept), so that a load change on a
            # shared machine hits the vocabs' measurements of a case alike
            cache: dict[str, tuple[dict[Any, Inputs], dict[Any, dict[str, float]]]] = {
                vr.name: ({}, {}) for vr in vruns}
            for cname in case_names:
                for vr in vruns:
                    start = len(records)
                    records += _run_vocab_case(vr, cname, N, dt, dtype, a, device, gpu, case_Ns, selected, prog,
                                               t_start, *cache[vr.name])
                    for r in records[start:]:
                        r["vocab"] = vr.name
            cache.clear()
            _free(device, full=True)
    prog.close()
    if a.worker_json is not None:
        a.worker_json.write_text(json.dumps({"results": records}, allow_nan=True))
    report.add_ratios(records, CASES)
    dev = report.device_info(device)
    ntl_backend = ("auto -> Triton kernels on CUDA" if gpu else "auto -> PyTorch path on CPU")
    doc: dict[str, Any] = {
        "schema": report.SCHEMA,
        "device": dev,
        "versions": vers,
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": a.command,
        "mode": "quick" if a.quick else "full",
        "wall_s": round(time.time() - t_start, 1),
        "load_avg_1min": {"start": load_start, "end": _loadavg()},
        "config": {
            "vocab_size": vruns[0].V, "vocabs": [vr.info() for vr in vruns], "Ns": all_Ns, "dtypes": dtypes, "digit_frac": a.digit_frac,
            "ignore_frac": a.ignore_frac, "hidden_size": H, "ntl_weight": 0.3, "seed": a.seed,
            "cases": case_names, "ntl_backend": ntl_backend, "skip_providers": a.skip_providers,
            "time_budget_s": a.time_budget,
            "hidden_size_by_case": {c: _case_H(CASES[c], a, gpu) for c in case_names
                                    if CASES[c].inputs != "logits"},
            "Ns_by_case": case_Ns,
            "threads": torch.get_num_threads(),
            "isolated": ({"rounds": a.rounds, "how": "one fresh Python process per provider and round; "
                          "timed samples pooled over the rounds; peak memory the largest of the rounds"}
                         if a.isolate else None),
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
    # the targets are set at the first vocab's shape (Qwen2.5's by default)
    doc["targets"] = report.evaluate_targets([r for r in records if r["vocab"] == vruns[0].name], device.type,
                                             baselines)
    return doc


# --------------------------------------------------------------------------- --isolate


def _child_argv(a: argparse.Namespace, device: torch.device, N: int, dt: str, case: str, key: str, H: int,
                out: Path, vr: _VocabRun, ids_only: bool) -> list[str]:
    argv = [sys.executable, "-m", "ntl.bench", "--device", device.type, "--n", str(N), "--dtype", dt,
            "--cases", case, "--providers", key, "--repeats", str(a.repeats), "--warmup", str(a.warmup),
            "--rep-ms", str(a.rep_ms), "--hidden-size", str(H), "--vocab-size", str(vr.V),
            "--tokenizer", vr.tokenizer,
            "--digit-frac", repr(a.digit_frac), "--ignore-frac", repr(a.ignore_frac), "--seed", str(a.seed),
            "--no-save", "--no-progress", "--worker-json", str(out)]
    if a.threads:
        argv += ["--threads", str(a.threads)]
    if ids_only:
        argv += ["--digit-ids", ",".join(str(i) for i in vr.vocab.token_ids)]
    return argv


def _run_child(argv: list[str]) -> dict[str, Any]:
    """One provider in a fresh process; its record, or an error/oom record."""
    import subprocess
    import tempfile

    import ntl

    env = dict(os.environ)
    src = str(Path(ntl.__file__).resolve().parent.parent)  # this ntl, not another installed one
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = Path(argv[argv.index("--worker-json") + 1])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                          cwd=tempfile.gettempdir())
    if proc.returncode == 0 and out.exists():
        recs = json.loads(out.read_text())["results"]
        out.unlink()
        if len(recs) == 1:
            return recs[0]
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
    status = "oom" if proc.returncode in (-9, 137) or "memory" in tail[0].lower() else "error"
    return {"status": status, "reason": f"child process exit {proc.returncode}: {tail[0]}"[:300]}


def _pool(pr: Any, rounds: list[dict[str, Any]], expected: dict[str, float], dtype: torch.dtype
          ) -> dict[str, Any]:
    """One record from a provider's rounds: samples pooled, memory the largest round's."""
    bad = [r for r in rounds if r["status"] != "ok"]
    if bad:
        keep = {k: bad[0][k] for k in ("status", "reason") if k in bad[0]}
        return {**keep, "reason": f"round {rounds.index(bad[0]) + 1}/{len(rounds)}: {keep.get('reason', '')}"}
    samples = {m: [x for r in rounds for x in (r.get("samples_ms", {}).get(m)
                                               or [r["modes"][m]["time_ms"]["median"]])] for m in MODES}
    mem = {m: max(r["modes"][m]["peak_mem_bytes"] for r in rounds) for m in MODES}
    value = rounds[0]["value"]
    return {
        "status": "ok", "modes": _modes({m: summarize(samples[m]) for m in MODES}, mem), "value": value,
        "check": _check(pr, value, expected, dtype),
        "rounds": [{"fwd+bwd_median_ms": r["modes"]["fwd+bwd"]["time_ms"]["median"],
                    "peak_mem_bytes": r["modes"]["fwd+bwd"]["peak_mem_bytes"], "rss": r.get("rss"),
                    "value": r["value"]} for r in rounds],
    }


def _run_case_isolated(case: Any, expected: dict[str, float], a: argparse.Namespace, device: torch.device,
                       selected: Any, prog: _Progress, N: int, dt: str, H: int, vr: _VocabRun,
                       ids_only: bool) -> list[dict[str, Any]]:
    """``--isolate``: each selected provider of ``case`` in its own process, ``a.rounds`` rounds in
    which every provider runs once (so load changes on a shared machine hit all of them alike).
    ``vr``: the vocab (the children build it from ``--tokenizer``); ``ids_only``: pass them its
    digit ids instead (a run with a custom tokenizer)."""
    import tempfile

    order = [pr for pr in case.providers if selected(pr) != "deselected"]
    runnable = [pr for pr in order if selected(pr) is None]
    rounds: dict[str, list[dict[str, Any]]] = {pr.key: [] for pr in runnable}
    with tempfile.TemporaryDirectory(prefix="ntl-bench-") as tmp:
        for r in range(a.rounds):
            for pr in runnable:
                prog.start(f"N={N} {dt} {case.name}: {pr.key} (own process, round {r + 1}/{a.rounds})")
                out = Path(tmp) / f"{pr.key}-{r}.json"
                rec = _run_child(_child_argv(a, device, N, dt, case.name, pr.key, H, out, vr, ids_only))
                rounds[pr.key].append(rec)
                prog.update(1, None if rec["status"] == "ok" else f"{pr.key}: {rec['status']}: {rec.get('reason')}")
    recs = []
    for pr in order:
        why = selected(pr)
        rec = {"status": "skipped", "reason": why} if why is not None else _pool(pr, rounds[pr.key], expected,
                                                                                DTYPES[dt])
        recs.append(_rec(case, pr, N, dt, rec))
        if why is None:
            prog.write(_one_line(recs[-1]))
    return recs


def _one_line(r: dict[str, Any]) -> str:
    head = f"{r['case']:8s} N={r['N']:<6d} {r['dtype']:9s} {r['provider']:18s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    fb = r["modes"]["fwd+bwd"]
    chk = r.get("check")
    c = "" if not chk else (" check ok" if chk["ok"] else f" CHECK MISMATCH (rel {chk['rel_err']:.1e})")
    return (f"{head} fwd+bwd {fb['time_ms']['median']:9.2f} ms  peak {fb['peak_mem_bytes'] / 2**20:8.1f} MiB"
            f"{c}")


def main(argv: list[str] | None = None, *, tokenizer: Any = None, prog: str = "ntl bench") -> int:
    """Entry point of ``ntl bench`` and ``python -m ntl.bench``; returns the exit status
    (1 when a provider errored or its loss disagreed with the float64 reference)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.list:
        print(_list())
        return 0
    a.command = " ".join([prog, *(shlex.quote(x) for x in argv)])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    doc = run(a, tokenizer)
    if a.worker_json is not None:  # an --isolate child: its parent reports
        return 0
    title = (f"ntl bench: {doc['device']['name']} | torch {doc['versions']['torch']} | "
             f"{doc['mode']} | {doc['wall_s']} s")
    report.print_table(doc["results"], doc["targets"], title)
    measured = doc["results"]
    if not a.no_save:
        stem = a.name or (doc["device"]["slug"] + ("-quick" if a.quick else ""))
        prev = Path(a.out) / f"{stem}.json"
        if a.append and prev.exists():
            doc = report.merge(json.loads(prev.read_text()), doc, CASES)
        for path in report.write_outputs(doc, a.out, stem, make_plot=not a.no_plot):
            print(f"wrote {path}", file=sys.stderr)
    bad = [r for r in measured if r.get("check") and not r["check"]["ok"]]
    errors = [r for r in measured if r["status"] == "error"]
    for r in bad:
        print(f"warning: {r['case']} {r['provider']} N={r['N']} {r['dtype']}: loss {r['check']['value']:.6g} "
              f"!= reference {r['check']['expected']:.6g}", file=sys.stderr)
    return 1 if (bad or errors) else 0
