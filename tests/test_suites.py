"""scripts/_env.sh's suite runner (scripts/test.sh): every suite runs even when an earlier one
fails (a failing command or an ``ntl_die`` ends only its own suite), and the exit code is
non-zero naming each failed suite."""

import subprocess
from pathlib import Path

ENV_SH = Path(__file__).resolve().parents[1] / "scripts" / "_env.sh"


def _run(body: str) -> subprocess.CompletedProcess:
    script = f"set -uo pipefail\nsource {ENV_SH}\n{body}\n"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_every_suite_runs_and_failures_are_named():
    p = _run("""
ok() { echo ran-ok; }
bad() { false; echo never-printed; }
dies() { ntl_die "no environment"; }
ntl_suite first bad
ntl_suite second ok
ntl_suite third dies
ntl_suite fourth ok
ntl_suites_report
""")
    assert p.returncode == 1, p.stderr
    assert p.stdout.count("ran-ok") == 2
    assert "never-printed" not in p.stdout  # set -e inside the suite: it stops at the failure
    assert "2 suite(s) failed: first third" in p.stderr
    assert "passed  second" in p.stderr and "passed  fourth" in p.stderr
    assert "ntl: error: no environment" in p.stderr


def test_all_passing_exits_zero():
    p = _run("ok() { :; }\nntl_suite a ok\nntl_suite b ok\nntl_suites_report")
    assert p.returncode == 0, p.stderr
    assert "failed" not in p.stderr
