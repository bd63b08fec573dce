"""Every public function and class of ``ntl``, ``ntl.methods`` and ``ntl.rl.*`` documents
exactly its signature's parameters (``Args:``; a class may say ``Attributes:``), has
``Returns:`` (functions) and a runnable ``Example:``, and every example runs under ``doctest``
(so the docs cannot rot)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re

import pytest

import ntl
from ntl import _docs

MODULES = ("ntl", "ntl.methods", "ntl.rl.answers", "ntl.rl.capture", "ntl.rl.logit_transform",
           "ntl.rl.metrics", "ntl.rl.normalization", "ntl.rl.rewards", "ntl.rl.targets")


def _public() -> dict[str, object]:
    out: dict[str, object] = {}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return out


PUBLIC = _public()
IDS = sorted(PUBLIC)


def _section(doc: str, title: str) -> list[str] | None:
    """The lines of a Google-style section (``None`` when absent)."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{title}:" and not line.startswith(" "):
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.startswith(" "):
                    break
                body.append(nxt)
            return body
    return None


def _documented_args(doc: str, is_class: bool) -> list[str]:
    body = _section(doc, "Args")
    if body is None and is_class:  # a dataclass documents its fields as Attributes
        body = _section(doc, "Attributes")
    body = body or []
    indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
    names = []
    for b in body:
        if b.strip() and len(b) - len(b.lstrip()) == indent:
            m = re.match(r"\s*(\*{0,2}\w+)(?: \([^)]*\))?:", b)
            assert m, f"unparsable Args line: {b!r}"
            names.append(m.group(1).lstrip("*"))
    return names


def _params(obj: object) -> list[str]:
    sig = inspect.signature(obj)  # type: ignore[arg-type]
    return list(sig.parameters)  # a class's: its __init__'s, without self


def test_the_inventory_is_not_empty() -> None:
    assert len(PUBLIC) >= 60
    assert "ntl.losses.ntl_loss" in PUBLIC and "ntl.rl.rewards.compute_score" in PUBLIC


@pytest.mark.parametrize("qualname", IDS)
def test_args_match_signature(qualname: str) -> None:
    obj = PUBLIC[qualname]
    doc = inspect.getdoc(obj) or ""
    assert doc.splitlines() and doc.splitlines()[0].strip(), f"{qualname}: no one-line summary"
    assert "{" + "vocab_or_tokenizer}" not in doc, f"{qualname}: an unfilled shared placeholder"
    documented = _documented_args(doc, inspect.isclass(obj))
    assert len(documented) == len(set(documented)), f"{qualname}: an argument documented twice"
    assert sorted(documented) == sorted(_params(obj)), (
        f"{qualname}: Args {documented} != signature {_params(obj)}")


@pytest.mark.parametrize("qualname", IDS)
def test_returns_and_example(qualname: str) -> None:
    obj = PUBLIC[qualname]
    doc = inspect.getdoc(obj) or ""
    if inspect.isfunction(obj):
        assert _section(doc, "Returns") is not None, f"{qualname}: no Returns section"
    example = _section(doc, "Example")
    assert example is not None and any(">>>" in line for line in example), (
        f"{qualname}: no Example section with >>> lines")


@pytest.mark.parametrize("qualname", IDS)
def test_example_runs(qualname: str) -> None:
    obj = PUBLIC[qualname]
    doc = inspect.getdoc(obj) or ""
    test = doctest.DocTestParser().get_doctest(doc, {}, qualname, None, 0)
    assert test.examples, f"{qualname}: no doctest example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


def test_fill_replaces_whole_line_placeholders_only() -> None:
    doc = "Sum.\n\n    Args:\n        {ignore_index} More.\n        x: {id: value}\n"
    got = _docs.fill(doc)
    assert f"        ignore_index: {_docs.PARAMS['ignore_index']} More." in got
    assert "x: {id: value}" in got
    with pytest.raises(KeyError, match="no_such"):
        _docs.fill("    {no_such}\n")


def test_shared_text_reaches_help() -> None:
    doc = inspect.getdoc(ntl.ntl_loss) or ""
    first = _docs.PARAMS["method"].splitlines()[0].strip()
    assert f"method: {first}" in doc
    assert ntl.ntl_loss.__doc__ is not None and "{method}" not in ntl.ntl_loss.__doc__
