"""Fused cross-entropy + NTL with a single ``N x V`` gradient buffer (or none).

``F.cross_entropy(...) + w * ntl_loss(...)`` materialises the CE gradient and a
second dense ``N x V`` NTL gradient that autograd then adds. Here the gradient
of the whole objective is computed during the forward pass, row block by row
block, into one buffer (or over the logits themselves with ``inplace=True``, as
Liger-Kernel does); backward only scales it by the incoming gradient, and skips
that when the incoming gradient is 1 (on CUDA decided on the device) -- or equals the
``grad_scale`` the forward was told of (``loss / k`` in gradient accumulation, a
GradScaler's scale), which the forward folds into the per-row scales.

Per row with full softmax ``p = softmax(x)``, label ``c`` and CE scale ``a``,
NTL scale ``b`` (``w / n_ntl`` for the mean)::

    dLoss/dx = a (p - e_c) + b * scatter_ids(dNTL/dz)

and with ``reweigh=True`` (``L' = m L + D (1 - m)``, ``m = sum_{k in ids} p_k``)::

    dL'/dx_j = m dL/dx_j + (L - D) (p_j 1[j in ids] - m p_j)

A row with ``a = b = 0`` (label ``ignore_index``) gets a zero gradient. fp16
gradients are stored times a power of two per row, ``S_i``, that puts the row's
largest entry in ``[2^14, 2^15)``; backward multiplies by ``grad_out / S_i`` in
fp32. So a GradScaler scale (a power of two) costs no extra rounding and small
entries are not flushed to zero before it is applied (fp16 has 5 exponent bits;
``a = 1 / n`` alone pushes most entries below its range at ``n = 16k``).

``squash_factor`` (``ntloss.NTLoss(squash_factor=...)``) only reshapes the W1 distance
table: ``d > 0`` becomes ``sq_a + sq_b d`` (:func:`ntl.methods.squash_table`), so ``dNTL/dz``
keeps its form ``q_j (d_j - L)``; with ``reweigh`` ``D = 1.01 squash_factor``.

Eager calls run :class:`ntl.kernels.ce_ntl.CENTLFunction` (an autograd Function: no custom-op
dispatch); under ``torch.compile`` the call is the custom op ``ntl::ce_ntl_fwd`` (a fake for its
shapes, the same code inside) whose registered backward multiplies the saved buffer by the
incoming gradient with traceable ops. Both live beside the kernels, in :mod:`ntl.kernels.ce_ntl`.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from . import _checks as C
from ._docs import shared_docs
from .kernels._triton import resolve_backend

# ``name as name``: the former names here of the op (moved beside its kernels, ntl.kernels.ce_ntl)
# and of its twin (moved to ntl.kernels.reference)
from .kernels.ce_ntl import _CHUNK_ELEMS as _CHUNK_ELEMS
from .kernels.ce_ntl import ce_ntl_apply
from .kernels.ce_ntl import fused_backward as fused_backward
from .kernels.ce_ntl import fused_forward as fused_forward
from .kernels.ce_ntl import row_scales as row_scales
from .kernels.reference import ce_ntl_rows_torch as ce_ntl_rows_torch
from .kernels.reference import pow2_row_scale as pow2_row_scale
from .losses import (
    MethodLike,
    op_settings,
    place_scale,
    resolve_call,
    resolve_method,
    vocab_tensors,
)
from .vocab import VocabLike

__all__ = ["cross_entropy_with_ntl"]


# The type of the result follows ``return_parts`` (overloads for type checkers only).
@overload
def cross_entropy_with_ntl(
    logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *, ntl_weight: float = ...,
    method: MethodLike = ..., ignore_index: int = ..., reduction: str = ..., reweigh: bool = ...,
    squash_factor: float | None = ..., huber_delta: float | None = ...,
    weights: torch.Tensor | None = ..., inplace: bool = ..., return_parts: Literal[False] = ...,
    backend: str = ..., grad_scale: float | torch.Tensor | None = ...,
) -> torch.Tensor: ...
@overload
def cross_entropy_with_ntl(
    logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *, ntl_weight: float = ...,
    method: MethodLike = ..., ignore_index: int = ..., reduction: str = ..., reweigh: bool = ...,
    squash_factor: float | None = ..., huber_delta: float | None = ...,
    weights: torch.Tensor | None = ..., inplace: bool = ..., return_parts: Literal[True],
    backend: str = ..., grad_scale: float | torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@overload
def cross_entropy_with_ntl(
    logits: torch.Tensor, labels: torch.Tensor, vocab_or_tokenizer: VocabLike, *, ntl_weight: float = ...,
    method: MethodLike = ..., ignore_index: int = ..., reduction: str = ..., reweigh: bool = ...,
    squash_factor: float | None = ..., huber_delta: float | None = ...,
    weights: torch.Tensor | None = ..., inplace: bool = ..., return_parts: bool = ...,
    backend: str = ..., grad_scale: float | torch.Tensor | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
@shared_docs
def cross_entropy_with_ntl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    ntl_weight: float = 0.3,
    method: MethodLike = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    reweigh: bool = False,
    squash_factor: float | None = None,
    huber_delta: float | None = None,
    weights: torch.Tensor | None = None,
    inplace: bool = False,
    return_parts: bool = False,
    backend: str = "auto",
    grad_scale: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``CE(logits, labels) + ntl_weight * NTL(logits, labels)`` with one ``N x V`` gradient.

    Equal in value and gradient to
    ``F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=ignore_index,
    reduction=reduction) + ntl_weight * ntl_loss(logits, labels, vocab, method=method,
    weights=weights, ...)`` (for every method of :mod:`ntl.methods`),
    except that a batch with no non-ignored label gives CE = 0 instead of NaN. The
    CE mean is over non-ignored labels, the NTL mean over number-token labels.

    The gradient is computed during forward into one ``N x V`` buffer in the
    logits' dtype; backward scales it by the incoming gradient, so only one
    backward per forward is allowed. With ``inplace=True`` that buffer **is the
    logits tensor**: after the call ``logits`` holds the gradient, not the logits
    (use it only when nothing else needs the logits, e.g. straight after the LM
    head; autograd raises if another node saved them). Under ``torch.no_grad()``
    or for logits that do not require grad, no gradient is built and the logits
    are left untouched, ``inplace`` or not. On a leaf tensor, ``inplace=True``
    makes ``logits.grad`` share the logits' storage (it is the same gradient).
    fp16 logits: until backward each row holds its gradient times a power of two
    (see the module docstring), so fp16 backward always rescales the ``N x V`` buffer;
    bf16/fp32 backward with an incoming gradient of 1 touches nothing.
    Second derivatives are not supported (backward raises under ``create_graph``).

    ``grad_scale=s``: the incoming gradient the caller will send (``(loss * s).backward()``,
    ``(loss / k).backward()`` with ``s = 1 / k``, ``scaler.scale(loss).backward()`` with
    ``s`` the GradScaler's scale). The stored gradient is ``s dLoss/dlogits`` (folded into
    the row scales in forward); the returned loss (and the parts) are **not** scaled. Backward
    multiplies by ``grad_out / s`` (fp32): when ``grad_out == s`` exactly, the Triton path
    reads and writes nothing over ``N x V`` and makes no host sync (bf16/fp32; fp16 rescales
    anyway, see above); any other ``grad_out`` still gives the right gradient, with that
    extra pass. A 0-d tensor on the logits' device avoids the host read of a float (e.g.
    pass the GradScaler's scale tensor rather than ``scaler.get_scale()``, which syncs).
    Labels outside ``[0, V)`` (other than ``ignore_index``) raise with strict checks on; with
    them off (:func:`ntl.set_strict_checks`) they take no part in CE or NTL (nor in the mean's
    count).

    ``torch.compile(fullgraph=True)``: the call is one custom op (``ntl::ce_ntl_fwd``, the
    vocab a constant; the label checks run inside it, so strict checks do not break the
    graph); its backward is a traceable multiply of the saved buffer (always run, even for
    an incoming gradient of 1). ``inplace=True`` with a gradient to build raises a
    ``ValueError`` when the compiled graph runs (``fullgraph`` or not): the graph holds the
    logits as a functional value, so the gradient would land in a copy, not over them.

    Args:
        {logits}
        labels: ``[...]`` token ids; ``ignore_index`` positions take no part in CE, and
            only number-token labels in NTL.
        {vocab_or_tokenizer}
        {ntl_weight}
        {method}
        {ignore_index}
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``labels``-shaped).
        {reweigh}
        {squash_factor}
        {huber_delta}
        {weights} CE is unweighted; they get no gradient
            (a ``weights`` tensor that requires grad is refused).
        inplace: write the gradient over ``logits`` (no extra ``N x V`` memory); see above.
        return_parts: also return the detached CE and NTL parts (for logging).
        {backend}
        grad_scale: the incoming gradient backward will get (a non-zero number or a 0-d
            float tensor on the logits' device; ``None``: 1); see above.

    Returns:
        fp32 loss, or ``(loss, ce, ntl)`` with ``return_parts=True``.

    Raises:
        ValueError: shapes, options or labels out of range (strict checks); ``inplace=True``
            inside a compiled graph that builds a gradient.
        TypeError: non-float logits, non-integer labels, a vocab of the wrong kind.

    Example:
        >>> import torch, ntl
        >>> import torch.nn.functional as F
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(2, 12, requires_grad=True)
        >>> labels = torch.tensor([3, 11])
        >>> loss, ce, nt = ntl.cross_entropy_with_ntl(logits, labels, vocab, ntl_weight=0.5,
        ...                                           return_parts=True)
        >>> torch.allclose(ce, F.cross_entropy(logits, labels)), round(nt.item(), 2)
        (True, 2.7)
        >>> loss.backward(); logits.grad.shape
        torch.Size([2, 12])
    """
    m = resolve_method(method, squash_factor, huber_delta)
    C.check_ntl_weight(ntl_weight)
    for name, flag in (("reweigh", reweigh), ("inplace", inplace), ("return_parts", return_parts)):
        C.check_bool(name, flag)
    m.check_reweigh(reweigh)
    logits = C.check_logits(logits)
    V = logits.shape[-1]
    labels, ignore_index, spec = resolve_call(labels, logits.shape[:-1], logits.device, V,
                                              vocab_or_tokenizer, m, ignore_index, reduction)
    w = C.check_weights(weights, labels)
    if w is not None and w.requires_grad and torch.is_grad_enabled():
        raise ValueError("cross_entropy_with_ntl does not differentiate weights; pass weights.detach() "
                         "(or use ntl.ntl_loss, whose weights get a gradient)")
    logits2d = logits.reshape(-1, V)
    if inplace and not torch.compiler.is_compiling() and (
            logits2d.data_ptr() != logits.data_ptr() or logits2d.stride(-1) != 1):
        raise ValueError("inplace=True needs logits that can be viewed as [N, V] without a copy, "
                         f"with a contiguous last dimension (got strides {tuple(logits.stride())})")
    cfg = op_settings(spec, reduction=reduction, ignore_index=ignore_index, reweigh=reweigh,
                      ntl_weight=float(ntl_weight), use_triton=resolve_backend(backend, logits2d, method=m),
                      check=C.strict_checks(), hi=V)
    grad_scale = C.check_grad_scale(grad_scale, logits.device)
    grad = torch.is_grad_enabled() and logits.requires_grad
    w1d = w.reshape(-1).contiguous() if w is not None else None
    place = place_scale(m, labels, vocab_or_tokenizer, spec, ignore_index, V)
    ids, values, table = vocab_tensors(spec.handle, logits.device, V)
    loss, ce, ntl = ce_ntl_apply(logits2d, labels.reshape(-1), w1d, ids, values, table, cfg, grad, inplace,
                                 grad_scale, place)
    if reduction == "none":
        loss, ce, ntl = (t.view(labels.shape) for t in (loss, ce, ntl))
    return (loss, ce, ntl) if return_parts else loss
