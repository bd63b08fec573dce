"""verl adapter tests: run with a python that has verl installed (scripts/test_verl.sh).

Sets the offline/interpreter environment before ntl is imported; tests for the verl
0.9 engine and for the legacy 0.7 actor skip themselves on the other verl line.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# tests/support/ranks.py: the multi-process helper shared with the core and TRL tests
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "support"))
# tests/support/shared_data.py: where the GSM8K files are; a missing one skips locally, fails in CI
from shared_data import gsm8k_dir  # noqa: F401  (the fixture)


def verl_version():
    try:
        import verl
    except Exception:
        return None
    from packaging.version import Version

    return Version(verl.__version__)


@pytest.fixture(scope="session")
def qwen_tok():
    from ntl.tokenizers import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="session")
def dist_group():
    """A single-process gloo group (verl's engine all-reduces token counts)."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(), "gloo")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield dist.group.WORLD
