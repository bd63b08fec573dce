"""Independent jobs (one seed x arm each) in worker processes, one torch thread per job.

Why processes: the demo's matrices are tiny, so torch's intra-op threads scale poorly
(two threads gave ~1.6x on 2 cores), while independent arms in separate processes use
every core fully. And one thread per job makes each job's floating-point arithmetic
independent of the core count and of how jobs are scheduled: ``--jobs 1`` and
``--jobs 3`` write identical metrics (the tests check it).

``run_jobs(fn, payloads, ...)`` calls ``fn(payload, progress)`` for every payload, either
in this process (``jobs=1``) or in a pool of ``spawn``ed workers; ``progress(n)`` advances
the job's tqdm bar, drawn by the parent (workers send their counts through a queue).
Results come back in payload order. A job that raises stops the run with its error (jobs
not started are dropped, running ones finish first).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["default_jobs", "run_jobs"]

Job = Callable[[Any, Callable[[int], None]], Any]


def default_jobs(n_jobs: int, per_round: int) -> int:
    """Workers for ``n_jobs`` jobs: at least ``per_round`` (the arms of one seed run side by
    side even on fewer cores: the OS shares the cores, and the arms finish together), at
    least the core count, never more than the jobs."""
    return max(1, min(n_jobs, max(per_round, os.cpu_count() or 1)))


def _bars(labels: Sequence[str], totals: Sequence[int], disable: bool) -> list[Any]:
    from tqdm.auto import tqdm

    return [tqdm(total=t, desc=lab, position=i, leave=False, disable=disable, dynamic_ncols=True)
            for i, (lab, t) in enumerate(zip(labels, totals, strict=True))]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _call(fn: Job, payload: Any, index: int, queue: Any) -> Any:
    def progress(n: int) -> None:
        queue.put((index, n))

    return fn(payload, progress)


def run_jobs(fn: Job, payloads: Sequence[Any], *, jobs: int, labels: Sequence[str],
             totals: Sequence[int], progress: bool = True) -> list[Any]:
    """Run ``fn(payload, progress)`` for each payload; return the results in order.

    ``fn`` must be a module-level function (workers are spawned, so it is pickled by
    name); payloads and results must be picklable. ``labels``/``totals``: one progress
    bar per job (description, total steps).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if not (len(payloads) == len(labels) == len(totals)):
        raise ValueError("payloads, labels and totals must have the same length")
    bars = _bars(labels, totals, disable=not progress)
    try:
        if jobs == 1 or len(payloads) == 1:
            import torch

            old = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return [fn(p, bars[i].update) for i, p in enumerate(payloads)]
            finally:
                torch.set_num_threads(old)
        return _run_pool(fn, payloads, jobs, bars)
    finally:
        for b in bars:
            b.close()


def _run_pool(fn: Job, payloads: Sequence[Any], jobs: int, bars: list[Any]) -> list[Any]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    i, n = queue.get(timeout=0.2)
                    bars[i].update(n)

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        try:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(1,)) as pool:
                futures = [pool.submit(_call, fn, p, i, queue) for i, p in enumerate(payloads)]
                try:
                    return [f.result() for f in futures]
                except BaseException:
                    for f in futures:  # jobs not started yet are dropped; running ones finish
                        f.cancel()
                    raise
        finally:
            stop.set()
            t.join()
