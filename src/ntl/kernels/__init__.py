"""Triton kernels for NTL, their plain-PyTorch twins, and dispatch.

* :func:`digit_gather` — ``[..., V] -> [..., K]`` number-token logits (kernel 1).
* :mod:`.ntl_loss` — the standalone losses (expected-value MSE/MAE/Huber, W1) + dL/dz, the
  label lookup, weights and reduction in one pass + a finalize (kernels 2, 3).
* :mod:`.ops` — their autograd Function (eager) and ``torch.library`` custom ops (compile).
* :mod:`.ce_ntl` — cross-entropy + NTL, online softmax over ``V`` (kernel 4).
* :mod:`.reference` — the plain-PyTorch twins (CPU path and test reference).
"""

from ._triton import HAS_TRITON, interpreting
from .number_columns import digit_gather
from .reference import digit_gather_torch, ntl_rows_grad_torch, ntl_rows_torch

__all__ = [
    "HAS_TRITON",
    "digit_gather",
    "digit_gather_torch",
    "interpreting",
    "ntl_rows_grad_torch",
    "ntl_rows_torch",
]
