"""tests/support/ranks.py, the multi-process helper of the TRL and verl tests: a failing rank
fails the test fast with every rank's log, a hung rank is killed at the deadline (with its
stack in the log), nothing is left running, and ``run_rank`` ends a gloo rank with its exit
code after a final barrier."""

import os
import sys
import textwrap
import time

import pytest
import ranks

pytestmark = pytest.mark.timeout(120)


def script(tmp_path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_failing_rank_fails_fast_with_every_rank_log_and_kills_the_rest(tmp_path):
    crash = script(tmp_path, "crash.py", """
        import sys, time
        from ranks import run_rank
        def main():
            print("rank A before the error", flush=True)
            time.sleep(0.5)
            raise ValueError("boom in rank A")
        run_rank(main)
    """)
    # a peer blocked forever (as in a collective whose partner died), with a child of its own
    hang = script(tmp_path, "hang.py", """
        import subprocess, sys, time
        from ranks import run_rank
        def main():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print(f"rank B waiting, child {child.pid}", flush=True)
            time.sleep(600)
        run_rank(main)
    """)
    t0 = time.monotonic()
    r = ranks.start("two ranks", [crash, hang], log_dir=tmp_path, timeout=100)
    with pytest.raises(ranks.RanksFailed) as e:
        r.wait()
    assert time.monotonic() - t0 < ranks.GRACE + 20  # not the 100 s deadline
    msg = str(e.value)
    assert "ValueError: boom in rank A" in msg and "rank A before the error" in msg
    assert "rank 0: exit code 1" in msg and "rank 1: still running (killed)" in msg
    assert "rank B waiting" in msg
    # rank B's stack (faulthandler on SIGUSR1, before the kill): where it hangs
    assert "most recent call first" in msg and 'hang.py", line 7 in main' in msg
    child = int(msg.split("child ")[1].split()[0])
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:  # killed with its process group
        time.sleep(0.1)
    assert gone(child) and all(p.poll() is not None for p in r.procs)


def test_a_hung_rank_is_killed_at_the_deadline(tmp_path):
    hang = script(tmp_path, "hang.py", """
        import time
        from ranks import run_rank
        run_rank(lambda: time.sleep(600))
    """)
    t0 = time.monotonic()
    with pytest.raises(ranks.RanksFailed, match=r"timed out: still running after 3 s") as e:
        ranks.run("one rank", [hang], log_dir=tmp_path, timeout=3)
    assert 3 <= time.monotonic() - t0 < 30
    assert "rank 0: still running (killed)" in str(e.value)
    assert "most recent call first" in str(e.value)  # faulthandler's dump
    assert 'hang.py", line 4 in <lambda>' in str(e.value)


def test_run_rank_exit_codes_and_atomic_results(tmp_path):
    ok = script(tmp_path, "ok.py", f"""
        from ranks import run_rank, write_json
        def main():
            write_json({str(tmp_path / "out.json")!r}, {{"x": 1}})
            print("unflushed at exit", end="")  # os._exit skips the interpreter's flush
        run_rank(main)
    """)
    assert ranks.run("ok", [ok], log_dir=tmp_path / "ok", timeout=60) > 0
    assert (tmp_path / "out.json").read_text() == '{"x": 1}'
    assert not list(tmp_path.glob("out.json.tmp*"))
    assert (tmp_path / "ok" / "rank0.log").read_text() == "unflushed at exit"
    code = script(tmp_path, "code.py", """
        from ranks import run_rank
        run_rank(lambda: 3)
    """)
    with pytest.raises(ranks.RanksFailed, match=r"rank 0: exit code 3"):
        ranks.run("code", [code], log_dir=tmp_path / "code", timeout=60)


def test_gloo_ranks_end_after_a_final_barrier(tmp_path):
    """Two gloo ranks (env:// on a free port) all-gather, rank 0 writes, both exit 0."""
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    out = tmp_path / "out.json"
    worker = script(tmp_path, "worker.py", f"""
        import torch, torch.distributed as dist
        from ranks import run_rank, write_json
        def main():
            dist.init_process_group("gloo")
            got = [None, None]
            dist.all_gather_object(got, dist.get_rank() * 10)
            if dist.get_rank() == 0:
                write_json({str(out)!r}, got)
            return 0
        run_rank(main)
    """)
    port = ranks.free_port()
    ranks.run("gloo", [worker] * 2, log_dir=tmp_path, timeout=100,
              rank_env=[ranks.dist_env(r, 2, port) for r in range(2)])
    assert out.read_text() == "[0, 10]"


def test_an_interrupted_wait_kills_the_ranks(tmp_path):
    """pytest-timeout (method signal) raises inside ``wait``: the ranks die with it."""
    import signal

    class Alarm(Exception):
        pass

    def ring(*_):
        raise Alarm("the test's own timeout")

    hang = script(tmp_path, "hang.py", """
        import time
        from ranks import run_rank
        run_rank(lambda: time.sleep(600))
    """)
    r = ranks.start("one rank", [hang], log_dir=tmp_path, timeout=100)
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(3)
    try:
        with pytest.raises(ranks.RanksFailed, match="interrupted: Alarm: the test's own timeout"):
            r.wait()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert r.procs[0].poll() is not None and r.killed == {0}


def test_run_process_kills_at_its_deadline_and_shows_the_output():
    """A single child past its deadline: killed with what it started, its output in the error."""
    code = ("import subprocess, sys, time; print('started', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(ranks.RanksFailed, match="started"):
        ranks.run_process([sys.executable, "-c", code], timeout=2)
    assert time.monotonic() - t0 < 30
    ok = ranks.run_process([sys.executable, "-c", "print('hi')"], timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "hi"
