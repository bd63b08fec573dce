"""The wheel: ``python -m build`` makes one that installs into a clean virtual environment.

The wheel is built from a copy of the sources (the checkout stays clean), installed with
``installer`` into a scratch venv that sees this environment's packages through a ``.pth``
line (torch etc. are reused, nothing is downloaded), and checked from there: ``ntl`` imports
from the scratch venv (not from the checkout), ``py.typed`` ships, no top-level package other
than ``ntl``, ``ntl_trl``, ``ntl_verl`` is installed, the declared requirements are satisfied,
``ntl --version`` and ``ntl bench --list`` run from the installed console script, and
``ntl_trl`` / ``ntl_verl`` import their frameworks where those are installed (TRL in .venv,
verl in .venvs/verl09: scripts/test_verl.sh runs this file there too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import ranks  # tests/support (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"ntl", "ntl_trl", "ntl_verl"}

pytestmark = pytest.mark.slow


def _need(module: str) -> None:
    """The wheel tools come with the test extra; in CI their absence is a failure, not a skip."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (it is in the test extra)")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    # no PYTHONPATH: a checkout put first on the path would shadow the installed wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # each step 5-12 s here (build, install, console script, a tiny bench); 3x a loaded cold run
    p = ranks.run_process(cmd, timeout=180, env=env, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    _need("build")
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "tests", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = tmp_path_factory.mktemp("dist")
    # sdist first, then the wheel from the unpacked sdist (build's default): the sdist must be complete
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    wheels = sorted(out.glob("ntl-*.whl"))
    assert len(wheels) == 1 and sorted(out.glob("ntl-*.tar.gz")), sorted(out.iterdir())
    return wheels[0]


@pytest.fixture(scope="module")
def scratch(wheel, tmp_path_factory) -> Path:
    """A venv without pip, this environment's site-packages visible after its own."""
    _need("installer")
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False, symlinks=True)
    py = env / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # A plain path line: the directory is appended to sys.path, its own .pth files (the
    # checkout's editable install) are not run. So `ntl` can only come from the wheel.
    (site / "zz_test_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # installer runs in the scratch python (it sees installer through the .pth): its scheme,
    # its console-script shebangs
    _run([str(py), "-m", "installer", "--no-compile-bytecode", "--validate-record", "all", str(wheel)])
    return env


def _version() -> str:
    text = (ROOT / "src" / "ntl" / "__init__.py").read_text()
    line = next(s for s in text.splitlines() if s.startswith("__version__"))
    return line.split("=", 1)[1].strip().strip("\"'")


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"ntl-{_version()}.dist-info"
    assert wheel.name == f"ntl-{_version()}-py3-none-any.whl"
    assert {n.split("/")[0] for n in names} == TOP_LEVEL | {dist_info}
    assert "ntl/py.typed" in names
    # every module of the source tree is in the wheel (nothing left behind by packages.find)
    for pkg, where in (("ntl", "src"), ("ntl_trl", "adapters/trl"), ("ntl_verl", "adapters/verl")):
        for f in (ROOT / where / pkg).rglob("*.py"):
            assert f.relative_to(ROOT / where).as_posix() in names, f
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Name: ntl\n" in meta and f"Version: {_version()}\n" in meta
    for extra in ("test", "bench", "demo", "verl", "trl"):  # the extras the READMEs name
        assert f"Provides-Extra: {extra}\n" in meta
    entry = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "ntl = ntl.cli:main" in entry


_CHECK = r"""
import importlib, importlib.metadata as md, json, sys
from packaging.requirements import Requirement
from packaging.version import Version

import ntl
out = {"ntl": ntl.__file__, "version": ntl.__version__, "tokenizers": ntl.tokenizers.__name__}
importlib.import_module("ntl.bench.harness")
importlib.import_module("ntl.demo")
frameworks = [name for name in ("trl", "verl") if importlib.util.find_spec(name)]
for name, module in (("trl", "ntl_trl.trainer"), ("verl", "ntl_verl.config")):
    if name in frameworks:
        out[module] = importlib.import_module(module).__file__
unmet = []
for r in md.requires("ntl") or []:
    req = Requirement(r)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ["", *frameworks]):
        continue  # an extra whose framework is not in this environment
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        unmet.append(f"{req} (missing)")
        continue
    if not req.specifier.contains(Version(have), prereleases=True):
        unmet.append(f"{req} (have {have})")
out["unmet"] = unmet
out["frameworks"] = frameworks
print(json.dumps(out))
"""


def test_wheel_installs_and_imports(scratch):
    py = scratch / "bin" / "python"
    res = json.loads(_run([str(py), "-c", _CHECK], cwd=scratch).stdout.strip().splitlines()[-1])
    assert Path(res["ntl"]).is_relative_to(scratch), res["ntl"]  # the wheel's, not the checkout's
    assert res["version"] == _version() and res["tokenizers"] == "ntl.tokenizers"
    assert res["unmet"] == []
    for name, module in (("trl", "ntl_trl.trainer"), ("verl", "ntl_verl.config")):
        if importlib.util.find_spec(name) is not None:  # this environment has the framework
            assert Path(res[module]).is_relative_to(scratch), res
    site = Path(res["ntl"]).parents[1]
    installed = {p.name for p in site.iterdir()} - {"zz_test_env.pth", "__pycache__"}
    assert installed == TOP_LEVEL | {f"ntl-{_version()}.dist-info"}, installed  # no 'benchmarks'
    assert (site / "ntl" / "py.typed").is_file()


def test_console_script_from_the_wheel(scratch, tmp_path):
    ntl_bin = scratch / "bin" / "ntl"
    assert ntl_bin.is_file()
    v = _run([str(ntl_bin), "--version"], cwd=tmp_path).stdout
    assert v.startswith(f"ntl {_version()} (torch ") and str(scratch) in v, v
    listing = _run([str(ntl_bin), "bench", "--list"], cwd=tmp_path).stdout
    assert "ntl.cross_entropy_with_ntl" in listing and "F.cross_entropy" in listing
    assert list(tmp_path.iterdir()) == []  # --list writes nothing


def test_bench_from_the_wheel_writes_to_the_current_directory(scratch, tmp_path):
    """The default output is ./ntl-bench (not the installed package's folder)."""
    site = Path(_run([str(scratch / "bin" / "python"), "-c",
                      "import ntl, os; print(os.path.dirname(os.path.dirname(ntl.__file__)))"]).stdout.strip())
    before = sorted(p for p in site.rglob("*") if "__pycache__" not in p.parts)
    _run([str(scratch / "bin" / "ntl"), "bench", "--device", "cpu", "--n", "8", "--vocab-size", "1000",
          "--cases", "ntl-mse", "--providers", "ntl", "--repeats", "1", "--warmup", "0",
          "--no-plot", "--no-progress"], cwd=tmp_path)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(w.startswith("ntl-bench/") for w in written), written
    assert {Path(w).suffix for w in written} == {".json", ".md"}
    result = json.loads(next((tmp_path / "ntl-bench").glob("*.json")).read_text())
    [row] = result["results"]
    assert (row["case"], row["provider"], row["N"], row["status"]) == ("ntl-mse", "ntl", 8, "ok")
    assert row["check"]["ok"]  # checked against the harness's float64 reference
    assert sorted(p for p in site.rglob("*") if "__pycache__" not in p.parts) == before
