"""Timing and peak-memory measurement on CPU and CUDA.

A *call* is a zero-argument ``fwd()`` returning a scalar loss tensor; the
backward pass is ``loss.backward()``. Gradients of the leaves listed in
``leaves`` are reset to ``None`` between runs (outside the timed region).

CPU:
    time: wall clock (``time.perf_counter_ns``) of the forward and the backward of
    the same run, after warm-up runs; median and quartiles over ``repeats`` runs
    (the harness interleaves the runs of the providers of one case).
    memory: one run under ``torch.profiler.profile(profile_memory=True)``; the
    allocator's ``[memory]`` events (``+nbytes`` alloc, ``-nbytes`` free) are
    replayed in time order and the peak of the running sum is the peak number of
    bytes that the call allocated on top of what was live before it (inputs are
    allocated before the call and not counted).
CUDA:
    time: ``triton.testing.do_bench`` per mode (median and 25/75% quantiles);
    ``bwd`` re-runs ``loss.backward(retain_graph=True)`` on one forward graph.
    memory: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the
    call (``reset_peak_memory_stats`` first): the same quantity as on CPU.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch

__all__ = [
    "MODES",
    "Timing",
    "cpu_first_run",
    "cpu_measure",
    "cpu_timed_run",
    "cuda_empty_launch_ms",
    "cuda_measure",
    "peak_from_events",
    "summarize",
]

#: Measured modes, in table order.
MODES: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")

Fwd = Callable[[], torch.Tensor]


@dataclass
class Timing:
    """Summary of repeated timings in milliseconds: median and quartiles."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, quartiles (inclusive method, i.e. linear interpolation), min, max of samples."""
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        raise ValueError("summarize needs at least one sample")
    if len(xs) == 1:
        q25 = q75 = xs[0]
    else:
        q25, _, q75 = statistics.quantiles(xs, n=4, method="inclusive")
    return Timing(statistics.median(xs), q25, q75, xs[0], xs[-1], len(xs))


def _clear(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def peak_from_events(events: Sequence[tuple[int, int]]) -> int:
    """Peak of the running sum of ``(timestamp, delta_bytes)`` allocator events (>= 0).

    Events are replayed in timestamp order (ties keep their given order); frees of
    memory allocated before the window make the running sum negative, which is
    fine: the peak is relative to the start of the window and never below 0.
    """
    live = peak = 0
    for _, delta in sorted(events, key=lambda e: e[0]):
        live += int(delta)
        peak = max(peak, live)
    return peak


def _profiled_memory(fwd: Fwd, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """Run fwd+bwd once under the profiler; return the loss and peak bytes per mode."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    _clear(leaves)
    gc.collect(1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("ntl_bench::fwd"):
            loss = fwd()
        with record_function("ntl_bench::bwd"):
            loss.backward()
    loss = loss.detach()
    _clear(leaves)
    evs = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    bwd_start = None
    mem: list[tuple[int, int]] = []
    for e in evs:
        name = e.name()
        if name == "[memory]":
            if str(e.device_type()).endswith("CPU"):
                # torch's stub of _KinetoEvent lacks nbytes(), which memory events have
                mem.append((int(e.start_ns()), int(e.nbytes())))  # pyright: ignore[reportAttributeAccessIssue]
        elif name == "ntl_bench::bwd":
            bwd_start = int(e.start_ns())
    if bwd_start is None:  # pragma: no cover - profiler always records user annotations
        raise RuntimeError("profiler did not record the backward marker")
    fwd_ev = [m for m in mem if m[0] < bwd_start]
    fwd_peak = peak_from_events(fwd_ev)
    # bwd: peak while backward runs, on top of the same pre-call baseline (saved tensors count).
    after_fwd = sum(d for _, d in fwd_ev)
    bwd_peak = max(0, after_fwd + peak_from_events([m for m in mem if m[0] >= bwd_start]))
    return loss, {"fwd": fwd_peak, "bwd": bwd_peak, "fwd+bwd": max(fwd_peak, bwd_peak)}


def cpu_first_run(fwd: Fwd, leaves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """CPU: one profiled fwd+bwd run; returns ``(detached loss, {mode: peak bytes})``."""
    return _profiled_memory(fwd, leaves)


def cpu_timed_run(fwd: Fwd, leaves: Sequence[torch.Tensor]) -> dict[str, float]:
    """CPU: one run, forward and backward timed separately (ms); ``fwd+bwd`` is their sum."""
    _clear(leaves)
    t0 = time.perf_counter_ns()
    out = fwd()
    t1 = time.perf_counter_ns()
    out.backward()
    t2 = time.perf_counter_ns()
    del out
    _clear(leaves)
    return {"fwd": (t1 - t0) / 1e6, "bwd": (t2 - t1) / 1e6, "fwd+bwd": (t2 - t0) / 1e6}


def cpu_measure(
    fwd: Fwd, leaves: Sequence[torch.Tensor], *, repeats: int, warmup: int
) -> tuple[torch.Tensor, dict[str, Timing], dict[str, int]]:
    """CPU, one provider: first run profiled for memory (it is also the first warm-up),
    ``warmup - 1`` more warm-up runs, then ``repeats`` timed runs.

    Returns ``(loss of the first run, {mode: Timing}, {mode: peak bytes})``. (The
    harness interleaves the timed runs of all providers of a case instead, so that
    load changes on a shared machine hit every provider alike.)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    loss, mem = cpu_first_run(fwd, leaves)
    for _ in range(max(0, warmup - 1)):
        cpu_timed_run(fwd, leaves)
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for m, v in cpu_timed_run(fwd, leaves).items():
            samples[m].append(v)
    return loss, {m: summarize(v) for m, v in samples.items()}, mem


def _do_bench(fn: Callable[[], object], leaves: Sequence[torch.Tensor], rep_ms: int, warmup_ms: int) -> Timing:
    """``triton.testing.do_bench`` summarised like the CPU timings (all samples when available)."""
    from triton.testing import do_bench

    grads = list(leaves) or None
    try:
        # do_bench returns a list with return_mode="all" or quantiles (its annotation: Optional)
        samples = cast(list[float], do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                                             return_mode="all"))
    except (AssertionError, TypeError):  # older Triton: no return_mode="all"
        q = cast(list[float], do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                                       quantiles=[0.5, 0.25, 0.75, 0.0, 1.0]))
        med, q25, q75, lo, hi = (float(x) for x in q)
        return Timing(med, q25, q75, lo, hi, -1)  # sample count unknown
    return summarize([float(x) for x in samples])


def cuda_measure(
    fwd: Fwd, leaves: Sequence[torch.Tensor], *, rep_ms: int = 100, warmup_ms: int = 25,
) -> tuple[dict[str, Timing], dict[str, int]]:
    """CUDA: ``do_bench`` per mode, then one run measuring peak memory per mode."""
    timings: dict[str, Timing] = {}
    timings["fwd"] = _do_bench(fwd, leaves, rep_ms, warmup_ms)
    timings["fwd+bwd"] = _do_bench(lambda: fwd().backward(), leaves, rep_ms, warmup_ms)
    _clear(leaves)
    graph = [fwd()]
    try:
        timings["bwd"] = _do_bench(lambda: graph[0].backward(retain_graph=True), leaves, rep_ms, warmup_ms)
    except RuntimeError:  # a custom backward that cannot run twice: time one forward per backward
        graph.clear()
        timings["bwd"] = _cuda_event_bwd(fwd, leaves, n=20)
    graph.clear()
    _clear(leaves)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fwd()
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    del loss
    _clear(leaves)
    return timings, {"fwd": fwd_peak, "bwd": bwd_peak, "fwd+bwd": max(fwd_peak, bwd_peak)}


def _cuda_event_bwd(fwd: Fwd, leaves: Sequence[torch.Tensor], n: int) -> Timing:
    xs = []
    for i in range(n + 3):
        _clear(leaves)
        loss = fwd()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss.backward()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            xs.append(a.elapsed_time(b))
    return summarize(xs)


def cuda_empty_launch_ms(rep_ms: int = 100, warmup_ms: int = 25) -> Timing:
    """Time of launching an empty Triton kernel (one program): the floor of any kernel."""
    import triton

    @triton.jit
    def _empty(x_ptr):
        pass

    x = torch.empty(1, device="cuda")
    _empty[(1,)](x)
    torch.cuda.synchronize()
    return _do_bench(lambda: _empty[(1,)](x), [], rep_ms, warmup_ms)
