"""scripts/gpu_check.sh and the benchmark options it relies on (CPU, toy shapes).

The full dry run (``bash scripts/gpu_check.sh --dry-run``: preflight, gpu tests collected,
the bench on the CPU at toy shapes) takes ~1-2 min on 2 cores and is not run here; these
tests check its argument handling, that a real run fails loudly where no GPU is, and the
``--skip-providers`` / ``--time-budget`` options of ``ntl bench``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from toy_tokenizers import word_tokenizer  # tests/support

from ntl.bench.harness import main, parse_args

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_script_argument_errors_are_loud():
    for args, msg in ((["--bogus"], "unknown argument '--bogus'"), (["--budget", "x"], "--budget needs"),
                      (["--results"], "--results needs")):
        out = run_script(*args)
        assert out.returncode == 1 and "gpu_check: FAILED" in out.stderr and msg in out.stderr, out
    out = run_script("--help")
    assert out.returncode == 0 and "pytest -m gpu" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real check")
def test_real_run_without_a_gpu_fails_at_preflight():
    out = run_script("--skip-tests", "--skip-bench", timeout=300)
    assert out.returncode != 0
    assert "gpu_check: FAILED" in out.stdout + out.stderr
    assert "no CUDA GPU" in out.stdout + out.stderr or "missing packages" in out.stdout + out.stderr


def test_bench_skip_providers_and_time_budget(tmp_path, toy_tok):
    argv = ["--device", "cpu", "--n", "32", "48", "--vocab-size", "64", "--hidden-size", "8",
            "--cases", "ntl-w1", "ce+ntl", "--skip-providers", "torch-ref", "ntloss-rw", "ce+ntloss-rw",
            "--repeats", "1", "--time-budget", "0.001", "--out", str(tmp_path), "--name", "toy",
            "--no-plot", "--no-progress"]
    assert main(argv, tokenizer=toy_tok) == 0
    doc = json.loads((tmp_path / "toy.json").read_text())
    assert doc["config"]["skip_providers"] == ["torch-ref", "ntloss-rw", "ce+ntloss-rw"]
    assert doc["config"]["time_budget_s"] == 0.001
    provs = {r["provider"] for r in doc["results"]}
    assert provs and not provs & {"torch-ref", "ntloss-rw", "ce+ntloss-rw"}
    late = [r for r in doc["results"] if r["N"] == 48]
    assert late and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in late)
    for bad in (["--skip-providers", "nope"], ["--time-budget", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.fixture(scope="module")
def toy_tok():
    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(18)] + [str(d) for d in range(10)]
    words += [f"x{i}" for i in range(10)]
    return word_tokenizer({w: i for i, w in enumerate(words)}, unk="<unk>", pad="<pad>",
                          whitespace_split=False)


# ---------------------------------------------------------------- names the script relies on
def _options(parse) -> set[str]:
    """Option strings of the parser that ``parse([])`` builds."""
    import argparse

    seen = []
    orig = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        seen.append(self)
        return orig(self, *a, **k)

    argparse.ArgumentParser.parse_args = spy  # type: ignore[method-assign]
    try:
        parse([])
    finally:
        argparse.ArgumentParser.parse_args = orig  # type: ignore[method-assign]
    return {o for act in seen[-1]._actions for o in act.option_strings}


def _commands(text: str) -> list[str]:
    """The script's logical lines (backslash continuations joined), comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [ln for ln in joined.splitlines() if not ln.lstrip().startswith("#")]


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def test_script_uses_only_existing_flags_providers_and_imports():
    """Every flag the script passes to ``ntl bench`` / ``ntl.bench.sweep``, every (case,
    provider) its target check needs and every ``from ntl... import`` it runs exist (a wrong
    name would first fail on the GPU machine)."""
    import importlib

    from ntl.bench import sweep
    from ntl.bench.cases import CASES

    text = SCRIPT.read_text()
    lines = _commands(text)
    bench_opts, sweep_opts = _options(parse_args), _options(sweep.parse_args)
    bench_lines = [ln for ln in lines if re.search(r"-m ntl\.bench\s", ln) or re.search(r"(BENCH|COMPILE)_ARGS(\+)?=", ln)]
    sweep_lines = [ln for ln in lines if "-m ntl.bench.sweep" in ln]
    assert len(bench_lines) >= 4 and len(sweep_lines) == 2, (bench_lines, sweep_lines)
    for group, opts in ((bench_lines, bench_opts), (sweep_lines, sweep_opts)):
        used = {f for ln in group for f in FLAG.findall(ln.split(" | ")[0])}
        assert used and used <= opts, sorted(used - opts)
    need = re.findall(r'\("([\w+.-]+)", "([\w+.-]+)"\)', text[text.index('need = [("'):text.index("recs = {")])
    assert ("ce+ntl", "liger-ce-ga") in need and ("ce+ntl", "ntl-fused-inplace-ga") in need
    for case, prov in need:
        assert case in CASES and prov in {p.key for p in CASES[case].providers}, (case, prov)
    for mod, names in re.findall(r"from (ntl[\w.]*) import ([\w, ]+)", text):
        m = importlib.import_module(mod)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(m, name), f"{mod}.{name}"
    assert "ntl.bench.sweep" in text and importlib.import_module("ntl.bench.sweep").main


def test_sweep_budget_argument():
    out = run_script("--sweep-budget", "x")
    assert out.returncode == 1 and "--sweep-budget needs" in out.stderr
    out = run_script("--help")
    assert "--skip-sweep" in out.stdout and "2b. the launch-configuration sweep" in out.stdout
