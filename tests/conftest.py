"""Test configuration: Triton's CPU interpreter, tokenizers, markers."""

import os

# Must be set before ntl (and its @triton.jit kernels) is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs on 2 shared cores: no per-example deadlines, no "too slow" health check.
settings.register_profile(
    "ntl", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ntl")

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
GSM8K_DIR = os.path.join(SHARED, "data", "gsm8k")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_tok():
    from ntl.tokenizers import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="session")
def llama3_tok():
    from ntl.tokenizers import llama3_tokenizer

    return llama3_tokenizer()
