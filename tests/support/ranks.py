"""Multi-process tests that cannot hang: one helper for the core, TRL and verl test trees.

Lives in ``tests/support/`` (its own directory, so putting it on ``sys.path`` exposes this
module and nothing else; the adapter test trees run in other venvs and import it by path,
see their ``conftest.py``). It imports nothing heavy: rank processes load it before torch.

**Test side.** :func:`start` launches each rank (a command line) in its own session, so one
``killpg`` ends the rank and every process it started (Ray, compile workers); stdout and
stderr go to ``rank<r>.log``. :meth:`Ranks.wait` returns when every rank exited 0, and
otherwise kills all ranks and raises :class:`RanksFailed` with the tail of *every* rank's log:

* at its deadline (a timeout sized to the test's work, not pytest's 600 s net);
* soon after one rank fails (:data:`GRACE` s): a peer blocked in a collective would
  otherwise wait for gloo's 30-minute timeout;
* when the waiting test itself is interrupted (pytest-timeout, Ctrl-C).

Before the kill each rank still running gets ``SIGUSR1``, on which :func:`run_rank` has
``faulthandler`` dump every thread's stack into the log (where a hang is stuck).

**Rank side.** :func:`run_rank` runs the rank's ``main`` and always ends the process with
``os._exit`` after flushing stdout/stderr, so no interpreter-exit destructor runs: the hang
this prevents is ``~ProcessGroupGloo`` joining gloo's worker thread at exit while that thread
waits for the GIL (held by the exiting main thread) to free a finished work object. Results
are written with :func:`atomic_write` (a temp file, then ``os.replace``) before the final
barrier, so the test never reads a partial file.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, NoReturn

HERE = os.path.dirname(os.path.abspath(__file__))
GRACE = 10.0  # s the other ranks get to exit by themselves after one failed (their tracebacks)
TAIL_LINES = 60
TAIL_CHARS = 6000


class RanksFailed(AssertionError):
    """A rank exited non-zero, or the ranks ran past their timeout (message: every rank's log tail)."""


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world: int, port: int) -> dict[str, str]:
    """``env://`` rendezvous variables of one rank on 127.0.0.1 (torchrun's names)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def tail(path: str | Path, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])[-chars:]


class Ranks:
    """Rank processes started by :func:`start`; :meth:`wait` them (or :meth:`kill`)."""

    def __init__(self, name: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float):
        self.name, self.procs, self.logs, self.timeout = name, procs, logs, timeout
        self.started = time.monotonic()
        self.killed: set[int] = set()  # ranks that were still running when killed

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self) -> None:
        """Stack dump (SIGUSR1), then SIGKILL to each live rank's whole process group; reaps them."""
        live = self.alive()
        self.killed.update(i for i, p in enumerate(self.procs) if p in live)
        for p in live:
            _signal(p.pid, signal.SIGUSR1, group=False)
        if live:
            _wait_all(live, 2.0)  # the dump is written synchronously by the signal handler
        for p in live:  # only groups whose leader we have not reaped: no pid reuse to hit
            _signal(p.pid, signal.SIGKILL, group=True)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable: report, not hang
                p.wait(timeout=10)

    def report(self, why: str) -> str:
        parts = [f"{self.name}: {why}"]
        for r, (p, log) in enumerate(zip(self.procs, self.logs, strict=True)):
            code = p.poll()
            if r in self.killed or code is None:
                state = "still running (killed)"
            else:
                state = f"exit code {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
            parts.append(f"---- rank {r}: {state}; last lines of {log} ----\n{tail(log)}")
        return "\n".join(parts)

    def wait(self) -> float:
        """Wait until every rank exits 0 (returns the seconds they took); else kill all of them
        and raise :class:`RanksFailed` with every rank's log tail."""
        deadline = self.started + self.timeout
        failed_at = None
        why = ""
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                now = time.monotonic()
                if all(c == 0 for c in codes):
                    return now - self.started
                if failed_at is None and any(c not in (None, 0) for c in codes):
                    failed_at = now
                if failed_at is not None and (None not in codes or now > failed_at + GRACE):
                    why = f"rank exit codes {codes} after {now - self.started:.0f} s"
                    break
                if now > deadline:
                    why = f"timed out: still running after {self.timeout:.0f} s (exit codes {codes})"
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.kill()
            raise
        except BaseException as e:  # pytest-timeout's Failed: kill the ranks, show their logs
            self.kill()
            raise RanksFailed(self.report(f"interrupted: {type(e).__name__}: {str(e)[:300]}")) from e
        self.kill()
        raise RanksFailed(self.report(why))


def start(name: str, argvs: Sequence[Sequence[str]], *, log_dir: str | Path, timeout: float,
          env: Mapping[str, str] | None = None, rank_env: Sequence[Mapping[str, str]] | None = None,
          cwd: str | Path | None = None, pythonpath: Sequence[str] = ()) -> Ranks:
    """Start one process per command line (rank ``r`` runs ``argvs[r]`` with ``env`` updated by
    ``rank_env[r]``), each in its own session, output to ``log_dir/rank<r>.log``. ``PYTHONPATH``
    gets ``pythonpath`` and this directory in front; ``PYTHONUNBUFFERED`` and
    ``PYTHONFAULTHANDLER`` are set, so a log is current and a crash shows its stack."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = os.pathsep.join(
        [*pythonpath, HERE, *([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])])
    base.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    ranks = Ranks(name, procs, logs, timeout)
    try:
        for r, argv in enumerate(argvs):
            logs.append(log_dir / f"rank{r}.log")
            with open(logs[-1], "wb") as log:  # the child holds its own descriptor
                procs.append(subprocess.Popen(
                    list(argv), env={**base, **(rank_env[r] if rank_env else {})}, cwd=cwd,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))
    except BaseException:
        ranks.kill()
        raise
    return ranks


def run(name: str, argvs: Sequence[Sequence[str]], **kwargs) -> float:
    """:func:`start` + :meth:`Ranks.wait` (see there); returns the seconds the ranks took."""
    return start(name, argvs, **kwargs).wait()


def _signal(pid: int, sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig) if group else os.kill(pid, sig)


def _wait_all(procs: list[subprocess.Popen], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- rank side
def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(f)`` into a temp file beside ``path``, flush + fsync, then ``os.replace``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: object) -> None:
    import json

    atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a broken stream must not keep the rank alive
            stream.flush()


def _end_process_group() -> None:
    """A last barrier, so every rank has finished every collective before any rank exits;
    then no ``destroy_process_group``: tearing gloo down in-process is what can deadlock (its
    destructor joins worker threads that may need the GIL), and ``os._exit`` right after lets
    the OS close the sockets. A rank leaves gloo's barrier only after reading every barrier
    message sent to it, and its own messages are then in its peers' socket buffers: its close
    is a plain FIN (no unread data, so no RST) and discards nothing a peer has yet to read."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_rank(main: Callable[[], int | None]) -> NoReturn:
    """Run one rank's ``main`` and end the process deterministically: on success a final
    barrier (see :func:`_end_process_group`), on an exception its traceback; then flush
    stdout/stderr and ``os._exit`` (0, ``main``'s code, or 1). Write results before returning
    from ``main`` (with :func:`atomic_write`). ``SIGUSR1`` dumps every thread's stack."""
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    code = 1
    try:
        code = main() or 0
        if code == 0:
            _end_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush()
        os._exit(code)


def run_process(cmd: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a
    single child of a test, in its own session: at the deadline the child and everything it
    started are killed, and :class:`RanksFailed` carries the tail of what it printed (a plain
    ``TimeoutExpired`` shows none of it). The exit code is the caller's to check."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(p.pid, signal.SIGKILL, group=True)
            out, err = p.communicate()
            raise RanksFailed(
                f"{list(cmd)[:4]}... killed after {timeout:.0f} s:\n--- stdout (tail)\n"
                f"{(out or '')[-TAIL_CHARS:]}\n--- stderr (tail)\n{(err or '')[-TAIL_CHARS:]}") from None
        except BaseException:  # the test interrupted (pytest-timeout, Ctrl-C): no orphan left
            _signal(p.pid, signal.SIGKILL, group=True)
            raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
