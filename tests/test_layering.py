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


def _absolute_imports(path: Path, package: str) -> list[str]:
    """Every import of ``path`` (a module of ``package``) as an absolute name, lazy ones too;
    ``from .. import x`` counts as ``<parent>.x``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = package.split(".")
    out: list[str] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = parts[:len(parts) - n.level + 1] if n.level else []
            mod = ".".join(base + ([n.module] if n.module else []))
            out.extend([mod] if n.module else [f"{mod}.{a.name}" for a in n.names])
        elif isinstance(n, ast.Import):
            out.extend(a.name for a in n.names)
    return out


#: What ntl.kernels may import from ntl: itself and the torch-only method registry.
KERNEL_DEPS = ("ntl.kernels", "ntl.methods")


def test_kernels_import_nothing_from_the_front_end():
    """Kernel files take tensors and scalars: no import (lazy ones included) of ``ntl._checks``,
    ``ntl.vocab``, ``ntl.losses`` or any other front-end module; ``ntl.methods`` is allowed."""
    files = sorted((ROOT / "src" / "ntl" / "kernels").glob("*.py"))
    assert {"ntl_loss.py", "ce_ntl.py", "number_mass.py", "number_columns.py"} <= {f.name for f in files}
    bad = [(f.name, m) for f in files for m in _absolute_imports(f, "ntl.kernels")
           if m.split(".")[0] == "ntl" and not m.startswith(KERNEL_DEPS)]
    assert bad == [], f"ntl.kernels imports the front end: {bad}"


def test_the_kernel_scan_sees_a_front_end_import(tmp_path):
    """Positive control: relative, parent-package and lazy imports are all resolved."""
    p = tmp_path / "x.py"
    p.write_text("from .. import _checks as C\nfrom ..vocab import vocab_from_handle\n"
                 "from ..methods import kernel_code\nfrom ._triton import tl\nfrom . import reference\n"
                 "def f():\n    from ntl.losses import use_triton\n")
    got = _absolute_imports(p, "ntl.kernels")
    assert sorted(got) == ["ntl._checks", "ntl.kernels._triton", "ntl.kernels.reference", "ntl.losses",
                           "ntl.methods", "ntl.vocab"]
    assert [m for m in got if not m.startswith(KERNEL_DEPS)] == ["ntl._checks", "ntl.vocab", "ntl.losses"]
