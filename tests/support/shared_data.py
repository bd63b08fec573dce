"""Where tests find the shared data files (GSM8K parquet), and what a missing one does.

The GSM8K files live in ``../shared/data/gsm8k`` beside the repository (``train.parquet``,
``test.parquet``); ``NTL_GSM8K_DIR`` points elsewhere (e.g. from a git worktree). A test
that reads them asks :func:`require_file` / :func:`gsm8k_file` (or the ``gsm8k_dir``
fixture, which every conftest re-exports): a missing file *skips* the test locally and
*fails* it in CI (``CI`` set to ``true``/``1``/``yes``, as ``.ci/run`` and CI services do),
so a CI run without the data cannot pass by skipping the tests that read it.

Used by ``tests/`` and the adapter suites (every conftest puts this folder, tests/support, on
``sys.path``).
"""

from __future__ import annotations

import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
#: The default location, beside the repository (the examples' default ``--data-dir``).
DEFAULT_GSM8K_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "gsm8k")
#: Where the tests read GSM8K: ``$NTL_GSM8K_DIR`` if set, else :data:`DEFAULT_GSM8K_DIR`.
GSM8K_DIR = os.path.abspath(os.environ.get("NTL_GSM8K_DIR") or DEFAULT_GSM8K_DIR)


def in_ci() -> bool:
    """``CI`` is set to a true value (``true``, ``1``, ``yes``, ``on``; any case)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def require_file(path: str, what: str = "test data") -> str:
    """``path`` if it is a file; else ``pytest.fail`` in CI, ``pytest.skip`` elsewhere.

    Call it from a test or fixture, not a module's top level: a failure while collecting
    interrupts the whole run, hiding every other test's result.
    """
    if os.path.isfile(path):
        return path
    msg = (f"{what} not found: {path} (put the files there or set NTL_GSM8K_DIR to the folder "
           "holding GSM8K's train.parquet / test.parquet)")
    if in_ci():
        pytest.fail(f"CI: {msg}. In CI a missing data file is a failure, not a skip", pytrace=False)
    pytest.skip(msg)


def gsm8k_file(split: str = "train") -> str:
    """The path of GSM8K's ``{split}.parquet`` (verl's format), via :func:`require_file`."""
    return require_file(os.path.join(GSM8K_DIR, f"{split}.parquet"), f"GSM8K {split} split")


@pytest.fixture
def gsm8k_dir() -> str:
    """The GSM8K folder, after :func:`gsm8k_file` found its ``train.parquet`` and ``test.parquet``
    (a missing one: skip locally, fail in CI)."""
    gsm8k_file("train")
    gsm8k_file("test")
    return GSM8K_DIR
