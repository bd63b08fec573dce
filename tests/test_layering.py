"""Boundaries: adapters use ntl's public API only; kernels import nothing from the front end."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.append("." * n.level + n.module)
        elif isinstance(n, ast.Import):
            out.extend(a.name for a in n.names)
    return out


def test_adapters_import_no_private_ntl_module():
    files = sorted((ROOT / "adapters").glob("*/ntl_*/**/*.py"))
    assert len(files) > 10, files  # the scan sees the adapters
    bad = [(str(f.relative_to(ROOT)), m) for f in files for m in _imports(f)
           if m.startswith("ntl.") and any(part.startswith("_") for part in m.split(".")[1:])]
    assert bad == [], f"adapters import private ntl modules: {bad}"


def test_the_scan_sees_a_private_import(tmp_path):
    """Positive control for the scan above."""
    p = tmp_path / "x.py"
    p.write_text("from ntl._checks import check_method\nimport ntl.kernels._triton\n")
    assert _imports(p) == ["ntl._checks", "ntl.kernels._triton"]


def _runtime_imports(path: Path) -> list[str]:
    """Imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            n.body = []
    out: list[str] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.append(n.module)
        elif isinstance(n, ast.Import):
            out.extend(a.name for a in n.names)
    return out


def test_core_imports_no_adapter():
    """The library in src/ntl never imports ntl_trl / ntl_verl at run time (ntl.rl.rewards hands
    out the moved framework-signature functions by name, on first use). ntl.demo, an application
    that trains with TRL, is not the library."""
    files = sorted(f for f in (ROOT / "src" / "ntl").rglob("*.py")
                   if "demo" not in f.relative_to(ROOT / "src" / "ntl").parts)
    assert any(f.name == "capture.py" for f in files), files
    bad = [(str(f.relative_to(ROOT)), m) for f in files for m in _runtime_imports(f)
           if m.split(".")[0] in ("ntl_trl", "ntl_verl")]
    assert bad == [], f"src/ntl imports adapters: {bad}"


def test_the_core_scan_sees_a_runtime_import(tmp_path):
    """Positive control: a TYPE_CHECKING import is skipped, a run-time one is seen."""
    p = tmp_path / "x.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ntl_trl\n"
                 "from ntl_verl.batch import has_key\n")
    assert _runtime_imports(p) == ["typing", "ntl_verl.batch"]
