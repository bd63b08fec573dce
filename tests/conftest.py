"""Test configuration: Triton's CPU interpreter (only without CUDA), tokenizers, markers.

Without a CUDA GPU, ``TRITON_INTERPRET=1`` is set before ``ntl`` (and its ``@triton.jit``
kernels) is imported, so ``backend="triton"`` tests run the kernels in Triton's CPU
interpreter and ``gpu`` tests are skipped. With a GPU it is left alone: ``pytest -m gpu``
then runs the compiled kernels (a ``gpu`` test fails if the interpreter is on, since the
interpreter would silently copy CUDA tensors to the host). The interpreter tests need it
on, so on a GPU machine run them in their own process:
``TRITON_INTERPRET=1 pytest -m "not gpu"``.
"""

import os
import sys

import torch

# tests/support/ranks.py: the multi-process helper (also of the TRL and verl adapter tests)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must happen before ntl (and its @triton.jit kernels) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI runs on 2 shared cores: no per-example deadlines, no "too slow" health check.
settings.register_profile(
    "ntl", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# CI: the same examples every run (a red CI must be reproducible, never a draw); locally each
# run explores new ones (NTL_HYPOTHESIS=ci to replay CI's).
settings.register_profile("ci", parent=settings.get_profile("ntl"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") or os.environ.get("NTL_HYPOTHESIS") == "ci" else "ntl")

# The shared data (GSM8K): a missing file skips locally and fails in CI (shared_data.py)
from shared_data import GSM8K_DIR, gsm8k_dir  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: that also
            item.add_marker(skip)  # matches a folder named gpu above the tests (every test skipped)


def require_compiled_kernels(node) -> None:
    """Fail a ``gpu``-marked test when Triton's interpreter is on."""
    if node.get_closest_marker("gpu") is not None:
        from ntl.kernels import interpreting

        if interpreting():
            pytest.fail("gpu test under TRITON_INTERPRET=1: it would test Triton's interpreter "
                        "(which copies CUDA tensors to the host), not the compiled kernels; "
                        "run `TRITON_INTERPRET=0 pytest -m gpu`")


@pytest.fixture(autouse=True)
def _gpu_tests_run_compiled_kernels(request):
    require_compiled_kernels(request.node)


@pytest.fixture(scope="session")
def qwen_tok():
    from ntl.tokenizers import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="session")
def llama3_tok():
    from ntl.tokenizers import llama3_tokenizer

    return llama3_tokenizer()
