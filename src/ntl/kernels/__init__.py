"""Triton kernels for NTL, their plain-PyTorch twins, and dispatch."""

from ._triton import HAS_TRITON, interpreting
from .reference import digit_gather_torch, ntl_rows_torch

__all__ = ["HAS_TRITON", "digit_gather_torch", "interpreting", "ntl_rows_torch"]
