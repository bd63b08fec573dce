"""Triton kernels for NTL, one op per file, and their plain-PyTorch twins.

* :mod:`.number_columns` — :func:`digit_gather`: the number-token columns of the logits,
  ``[..., V] -> [..., K]`` (gather forward, scatter backward).
* :mod:`.ntl_loss` — the standalone losses (every method of :mod:`ntl.methods` with a
  Triton branch) + dL/dz, the label lookup, weights and reduction in one pass + a finalize;
  their autograd Function (eager) and ``torch.library`` custom ops (``torch.compile``).
* :mod:`.ce_ntl` — cross-entropy + NTL fused, online softmax over ``V``; its autograd
  Function and custom op (the front end: :mod:`ntl.fused`).
* :mod:`.number_mass` — the full-softmax number-token mass with the number logits.
* :mod:`.reference` — the plain-PyTorch twins (the CPU path and the test reference).
* :mod:`.settings` — :class:`~.settings.OpSettings`, the one record of an op call's constants,
  and the strict data checks the ops run inside.

The kernel files import nothing from the front end (only the torch-only method registry
:mod:`ntl.methods`): they take the vocab as tensors (ids, values, label -> index table) and
one :class:`~.settings.OpSettings`; the backend choice of every entry point is
:func:`._triton.resolve_backend`. The former module names ``gather``,
``rowloss``, ``ops``, ``mass`` and ``fused_ce`` are aliases of these modules.
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
