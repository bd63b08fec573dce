"""The ``gpu``-marked tests resolve their names on CPU (issue 29.1).

A ``gpu`` test only runs on a CUDA machine, so a wrong name in one (``ntl_loss._ntl_rows_fwd``
for ``_ntl_loss_fwd``) would first fail there. Every test file holding a ``gpu`` marker is
imported and its source walked (the whole file: helpers too):

* every ``a.b.c`` chain (read, not assigned) whose root is a module (imported at the top or
  inside the function) resolves, attribute by attribute, through modules and classes;
* every call of a function or class of ``ntl`` or of a test module (through such a chain or a
  plain imported name) binds its keyword arguments and number of positional arguments
  (``inspect.Signature.bind_partial``);
* every argument of a ``gpu`` test is a fixture pytest knows or a parameter (a collection in a
  subprocess, as ``pytest -m gpu --collect-only`` on the GPU machine sees it).

A positive control feeds the checker a source with a wrong attribute and a wrong keyword.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def gpu_test_files() -> list[Path]:
    """Test files that mark something ``gpu`` (``pytest.mark.gpu`` anywhere in them)."""
    out = []
    for p in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(p.read_text())
        if any(isinstance(n, ast.Attribute) and n.attr == "gpu" and _dotted(n.value) == "pytest.mark"
               for n in ast.walk(tree)):
            out.append(p)
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _ours(obj: Any) -> bool:
    """A function or class of ``ntl`` or of a test module (whose signature we can hold it to)."""
    mod = getattr(obj, "__module__", None) or ""
    if mod.split(".")[0] == "ntl":
        return True
    f = sys.modules.get(mod)
    return bool(f and getattr(f, "__file__", None) and Path(f.__file__).resolve().is_relative_to(TESTS))


def _local_bindings(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """Names a function binds itself (arguments, assignments, loops, ``with ... as``), except
    its imports, which the checker resolves."""
    a = fn.args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    names |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n is not fn:
            names.add(n.name)
    return names


def _import(module: str, name: str | None = None) -> Any:
    """``import module`` / ``from module import name`` (a submodule too); raises ImportError."""
    mod = importlib.import_module(module)
    if name is None:
        return mod
    if hasattr(mod, name):
        return getattr(mod, name)
    try:
        return importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        raise ImportError(f"cannot import name {name!r} from {module!r}") from None


class _Checker(ast.NodeVisitor):
    def __init__(self, module: types.ModuleType, filename: str) -> None:
        self.g = vars(module)
        self.filename = filename
        self.scopes: list[tuple[set[str], dict[str, Any]]] = []
        self.errors: list[str] = []
        self.checked = 0

    def _error(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)

    def _imports(self, nodes: Any) -> dict[str, Any]:
        """What the imports among ``nodes`` bind; an import that fails is an error."""
        out: dict[str, Any] = {}
        for n in nodes:
            try:
                if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                    for al in n.names:
                        out[al.asname or al.name] = _import(n.module, al.name)
                elif isinstance(n, ast.Import):
                    for al in n.names:
                        out[al.asname or al.name.split(".")[0]] = _import(
                            al.name if al.asname else al.name.split(".")[0])
            except ImportError as e:
                self._error(f"{self.filename}:{n.lineno}: {e}")
        return out

    def visit_Module(self, node: ast.Module) -> None:
        top = [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        self.scopes.append((set(), self._imports(top)))
        self.generic_visit(node)
        self.scopes.pop()

    def _lookup(self, name: str) -> tuple[bool, Any]:
        for bound, imports in reversed(self.scopes):
            if name in imports:
                return True, imports[name]
            if name in bound:
                return False, None  # a runtime value: not ours to check
        if name in self.g:
            return True, self.g[name]
        return False, None

    def _function(self, node: Any) -> None:
        if isinstance(node, ast.Lambda):
            self.scopes.append((_local_bindings(node), {}))
        else:
            imports = self._imports(ast.walk(node))
            self.scopes.append((_local_bindings(node) - set(imports), imports))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _resolve(self, node: ast.AST) -> tuple[bool, Any]:
        """``(known, object)`` of a Name or an Attribute chain rooted at a module; reports a
        missing attribute of a module or class."""
        if isinstance(node, ast.Name):
            return self._lookup(node.id)
        if not isinstance(node, ast.Attribute) or _dotted(node) is None:
            return False, None
        known, base = self._resolve(node.value)
        if not known or not isinstance(base, (types.ModuleType, type)):
            return False, None
        self.checked += 1
        if not hasattr(base, node.attr):
            self._error(f"{self.filename}:{node.lineno}: {_dotted(node)}: "
                               f"{getattr(base, '__name__', base)!s} has no attribute {node.attr!r}")
            return False, None
        return True, getattr(base, node.attr)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            self._resolve(node)
        else:
            self.visit(node.value)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        known, fn = self._resolve(node.func)
        if not known or not callable(fn) or not _ours(fn):
            return
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        self.checked += 1
        try:
            sig.bind_partial(*[None] * len(node.args), **{str(k.arg): None for k in node.keywords})
        except TypeError as e:
            self._error(f"{self.filename}:{node.lineno}: {_dotted(node.func)}(...): {e}")


def check_source(source: str, module: types.ModuleType, filename: str) -> tuple[list[str], int]:
    """Errors (``file:line: what``) and the number of names and calls checked."""
    c = _Checker(module, filename)
    c.visit(ast.parse(source))
    return c.errors, c.checked


FILES = gpu_test_files()


def import_test_module(path: Path) -> Any:
    """The test file at ``path`` as pytest imports it (import mode prepend: its folder on
    ``sys.path``, the module named by its file name)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return importlib.import_module(path.stem)


def test_the_gpu_test_files_are_found():
    names = {p.name for p in FILES}
    assert {"test_gpu.py", "test_linear.py", "test_launches.py"} <= names, names


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(TESTS).as_posix() for p in FILES])
def test_names_resolve(path):
    mod = import_test_module(path)
    errors, checked = check_source(path.read_text(), mod, path.name)
    assert not errors, "\n".join(errors)
    assert checked >= 10, checked  # the walk did look at names


def test_checker_catches_a_wrong_attribute_keyword_and_arity():
    """Positive control: the typo the issue found, a wrong keyword, too many arguments."""
    test_gpu = import_test_module(TESTS / "kernels" / "test_gpu.py")

    src = '''
import ntl
from ntl import DigitVocab

def f(x, y, v):
    from ntl.kernels import ntl_loss
    assert ntl_loss._ntl_rows_fwd and ntl_loss._ntl_loss_fwd
    ntl.cross_entropy_with_ntl(x, y, v, ntl_wieght=0.3)
    ntl.cross_entropy_with_ntl(x, y, v, ntl_weight=0.3)
    DigitVocab([1, 2], vocab_size=5, bogus=1)
    ntl_loss = None  # a later rebinding does not hide the import above
    make_batch(1, 2, 3, 4, 5, 6, 7, 8)
    ntl.no_such_function(x)
    x.whatever(bogus=1)  # a runtime value: not checked
    from ntl.kernels import no_such_module
'''
    errors, _ = check_source(src, test_gpu, "probe.py")
    text = "\n".join(errors)
    assert "_ntl_rows_fwd" in text and "_ntl_loss_fwd" not in text, text
    assert "ntl_wieght" in text and "bogus" in text and "make_batch" in text, text
    assert "no_such_function" in text and "whatever" not in text, text
    assert "no_such_module" in text, text
    assert len(errors) == 6, text


_PLUGIN = r'''
import json, os

def pytest_collection_finish(session):
    bad, n = [], 0
    for item in session.items:
        if item.get_closest_marker("gpu") is None:
            continue
        n += 1
        info = item._fixtureinfo
        params = set(getattr(getattr(item, "callspec", None), "params", {}))
        for name in info.argnames:
            if name not in info.name2fixturedefs and name not in params and name != "request":
                bad.append(f"{item.nodeid}: no fixture or parameter {name!r}")
    with open(os.environ["NTL_GPU_FIXTURES_OUT"], "w") as f:
        json.dump({"gpu_items": n, "bad": bad}, f)
'''


def test_gpu_tests_fixtures_exist(tmp_path):
    """``pytest -m gpu --collect-only`` with a plugin that checks every gpu test's arguments."""
    (tmp_path / "gpu_fixture_probe.py").write_text(_PLUGIN)
    out = tmp_path / "out.json"
    env = {**os.environ, "NTL_GPU_FIXTURES_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--collect-only",
                          "-p", "no:cacheprovider", "-p", "gpu_fixture_probe", *map(str, FILES)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["gpu_items"] >= 40, doc
    assert doc["bad"] == [], doc["bad"]
