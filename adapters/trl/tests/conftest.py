"""Test setup for the TRL adapter: offline, Triton's CPU interpreter, tiny models."""

import os

# Must be set before ntl (its @triton.jit kernels) and transformers are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import importlib.util
import sys

# tests/support/ranks.py: the multi-process helper shared with the core and verl tests
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "support"))
# tests/support/shared_data.py: where the GSM8K files are; a missing one skips locally, fails in CI
from shared_data import gsm8k_dir  # noqa: F401  (the fixture)

# Without trl (the system python), collect nothing here: scripts/test_trl.sh runs these
# tests in venvs that have it.
if importlib.util.find_spec("trl") is None:
    collect_ignore_glob = ["test_*.py"]
