"""reweigh=True vs reweigh=False on the standalone losses, side by side in one process (issue 18.6).

The issue's case: 16,384 rows x V = 10,000 fp32 logits, 1% of the labels number tokens, CPU,
one thread, the PyTorch path. Targets: forward <= 3x and forward+backward <= 1.5x the
reweigh=False time, peak memory <= 1.1x. Timings alternate the two settings repetition by
repetition (so machine load hits both alike); medians and IQRs in ms. Peak memory: the
largest live total of the CPU allocations made during forward + backward (torch profiler).

    python benchmarks/reweigh_cpu.py [--reps 9] [--rows 16384] [--vocab 10000] [--frac 0.01]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ntl


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rows", type=int, default=16_384)
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--frac", type=float, default=0.01)
    args = ap.parse_args()
    torch.set_num_threads(1)
    N, V = args.rows, args.vocab
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g)
    ids = list(range(100, 110))
    y = torch.randint(200, V, (N,), generator=g)
    pick = torch.rand(N, generator=g) < args.frac
    y[pick] = torch.tensor(ids)[torch.randint(0, 10, (int(pick.sum()),), generator=g)]
    vocab = ntl.DigitVocab(ids, V)
    leaf = x.clone().requires_grad_(True)
    print(f"N={N} V={V} number rows={int(pick.sum())} ({args.frac:.0%}), torch {torch.__version__}, "
          f"1 thread, load {os.getloadavg()}")
    for method in ("wasserstein", "mse"):
        def fwd(rw, method=method):
            ntl.ntl_loss(x, y, vocab, method=method, reweigh=rw)

        def fwd_bwd(rw, method=method):
            leaf.grad = None
            ntl.ntl_loss(leaf, y, vocab, method=method, reweigh=rw).backward()

        for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fn(False), fn(True)
            ts: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.reps):
                for rw in (False, True):
                    t = time.perf_counter()
                    fn(rw)
                    ts[rw].append((time.perf_counter() - t) * 1e3)
            med = {rw: statistics.median(v) for rw, v in ts.items()}
            iqr = {rw: statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0] for rw, v in ts.items()}
            print(f"{method:11s} {name:8s} reweigh=False {med[False]:9.2f} ms (IQR {iqr[False]:.2f})  "
                  f"reweigh=True {med[True]:9.2f} ms (IQR {iqr[True]:.2f})  ratio {med[True] / med[False]:.2f}")
        mem = {}
        for rw in (False, True, False, True):  # the first two warm up
            leaf.grad = None
            mem[rw] = peak_bytes(lambda rw=rw, method=method: fwd_bwd(rw, method))
        print(f"{method:11s} peak fwd+bwd  reweigh=False {mem[False] / 2**20:.1f} MiB  "
              f"reweigh=True {mem[True] / 2**20:.1f} MiB  ratio {mem[True] / mem[False]:.3f}")
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
