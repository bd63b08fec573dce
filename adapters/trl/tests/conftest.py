"""Test setup for the TRL adapter: offline, Triton's CPU interpreter, tiny models."""

import os

# Must be set before ntl (its @triton.jit kernels) and transformers are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest

pytest.importorskip("trl", reason="the TRL adapter tests need trl (scripts/test_trl.sh installs it)")
