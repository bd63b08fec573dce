"""NTL straight from hidden states: no ``[N, V]`` logits anywhere.

The number-token logits of a position are ``z = (h @ W[ids].T + b[ids]) / T``:
a ``[N, H] x [H, K]`` matmul (``K = 10`` for digits) instead of the ``[N, V]``
LM head. This is how the RL adapters get digit logits when the framework never
materialises logits (fused LM-head kernels in TRL >= 1.15 and verl).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from . import _checks as C
from ._docs import shared_docs
from .kernels._triton import resolve_backend
from .kernels.ntl_loss import ntl_loss_apply
from .losses import (
    LossSpec,
    MethodLike,
    loss_spec,
    need_grad,
    op_settings,
    place_scale,
    resolve_call,
    resolve_method,
    soft_targets,
    vocab_tensors,
)
from .methods import W1, Method
from .vocab import VocabLike, vocab_from_handle

__all__ = ["digit_logits_from_hidden", "ntl_loss_from_digit_logits", "ntl_loss_from_hidden"]


# ------------------------------------------------------------------ number rows of the LM head
@torch.library.custom_op("ntl::number_rows", mutates_args=())
def _number_rows_op(weight: torch.Tensor, handle: int) -> torch.Tensor:
    return weight.index_select(0, vocab_from_handle(handle).ids(weight.device))


@_number_rows_op.register_fake
def _(weight, handle):
    K = vocab_from_handle(handle).K
    return weight.new_empty((K, *weight.shape[1:]))


@torch.library.custom_op("ntl::number_rows_bwd", mutates_args=())
def _number_rows_bwd_op(g: torch.Tensor, weight: torch.Tensor, handle: int) -> torch.Tensor:
    ids = vocab_from_handle(handle).ids(weight.device)
    return torch.zeros_like(weight).index_add_(0, ids, g.to(weight.dtype))


@_number_rows_bwd_op.register_fake
def _(g, weight, handle):
    return torch.empty_like(weight)


def _rows_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.handle = inputs[1]


def _rows_backward(ctx: Any, g: torch.Tensor):
    (weight,) = ctx.saved_tensors
    return torch.ops.ntl.number_rows_bwd(g, weight, ctx.handle), None


_number_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def number_rows(weight: torch.Tensor, handle: int) -> torch.Tensor:
    """``weight[ids]`` (rows of an LM-head weight or entries of its bias), differentiable."""
    if torch.compiler.is_compiling():
        return torch.ops.ntl.number_rows(weight, handle)
    return weight.index_select(0, vocab_from_handle(handle).ids(weight.device))


def _check_head(hidden: Any, weight: Any, bias: Any, temperature: Any) -> tuple[int, float]:
    V = C.check_head(hidden, weight, bias, name="lm_head_weight")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return V, float(temperature)


def _digit_logits(hidden: torch.Tensor, weight: torch.Tensor, handle: int,
                  temperature: float, bias: torch.Tensor | None) -> torch.Tensor:
    w = number_rows(weight, handle).float()
    b = number_rows(bias, handle).float() if bias is not None else None
    z = F.linear(hidden.float(), w, b)
    return z / temperature if temperature != 1.0 else z


@shared_docs
def digit_logits_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number-token logits ``(hidden @ W[ids].T + bias[ids]) / temperature``: ``[..., K]`` fp32.

    ``ids`` are the vocab's number tokens in value order. Gradients reach ``hidden`` and the
    ``K`` rows of ``W``; the ``[N, V]`` logits are never formed.

    Args:
        {hidden}
        {lm_head_weight}
        {vocab_or_tokenizer}
        {temperature}
        {bias}

    Returns:
        ``[..., K]`` fp32 number-token logits, in the vocab's value order.

    Raises:
        ValueError: shapes that do not match, ``temperature <= 0``, number ids ``>= V``.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> hidden, w = torch.randn(2, 5, 8), torch.randn(12, 8)
        >>> z = ntl.digit_logits_from_hidden(hidden, w, vocab, temperature=2.0)
        >>> z.shape, torch.allclose(z, (hidden @ w.T)[..., :10] / 2.0, atol=1e-5)
        (torch.Size([2, 5, 10]), True)
    """
    V, t = _check_head(hidden, lm_head_weight, bias, temperature)
    spec = loss_spec(vocab_or_tokenizer, None, V, W1())
    C.check_ids_fit(spec.max_id, spec.vocab_size, V)
    return _digit_logits(hidden, lm_head_weight, spec.handle, t, bias)


def _from_digit_logits(z: torch.Tensor, labels: torch.Tensor, spec: LossSpec, method: Method,
                       ignore_index: int, reduction: str, weights: Any, target_dist: Any,
                       W: int, hi: int, hi_what: str, backend: str, vocab_or_tokenizer: Any) -> torch.Tensor:
    """The loss of number logits ``z [N, K]`` (value order) against token-id ``labels``."""
    w = C.check_weights(weights, labels)
    soft = soft_targets(target_dist, labels, spec.K, method)
    scale = place_scale(method, labels, vocab_or_tokenizer, spec, ignore_index, W)
    kernel = resolve_backend(backend, z, method=method)
    if kernel and z.stride(-1) != 1:
        z = z.contiguous()
    cfg = op_settings(spec, reduction=reduction, ignore_index=ignore_index, use_triton=kernel,
                      check=C.strict_checks(), hi=hi, hi_what=hi_what, need_dz=need_grad(z))
    _, values, table = vocab_tensors(spec.handle, z.device, W)  # z: the K number logits, no ids
    out = ntl_loss_apply(z, labels.reshape(-1).contiguous(),
                         w.reshape(-1).contiguous() if w is not None else None, soft, None, values, table,
                         cfg, scale)
    return out.view(labels.shape) if reduction == "none" else out


@shared_docs
def ntl_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    method: MethodLike = "wasserstein",
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    target_dist: torch.Tensor | None = None,
    squash_factor: float | None = None,
    huber_delta: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL from hidden states and the LM head, without ever forming ``[N, V]`` logits.

    Equals ``ntl_loss((hidden @ W.T + bias) / temperature, labels, ...)`` for every method
    (see :func:`ntl.ntl_loss` and :mod:`ntl.methods` for the formulas and reductions;
    ``reweigh`` is not available: it needs the full row): the digit logits are
    ``z = (h @ W[ids].T + b[ids]) / T``.

    Args:
        hidden: ``[..., H]`` hidden states (any float dtype), aligned with ``labels``
            (for a causal LM, the state at position ``t-1`` scores the token at ``t``).
        lm_head_weight: ``[V, H]`` LM-head weight (tied embeddings work the same way).
        {labels}
        {vocab_or_tokenizer}
        {method}
        {temperature}
        {bias}
        {ignore_index}
        {reduction}
        {weights}
        {target_dist}
        {squash_factor}
        {huber_delta}
        {backend}

    Returns:
        fp32 loss (scalar, or ``labels``-shaped for ``reduction="none"``).

    Raises:
        ValueError: shapes that do not match, ``temperature <= 0``, options as in
            :func:`ntl.ntl_loss`.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> hidden, w = torch.randn(2, 8), torch.randn(12, 8)
        >>> labels = torch.tensor([3, 7])
        >>> loss = ntl.ntl_loss_from_hidden(hidden, w, labels, vocab, method="mse")
        >>> torch.allclose(loss, ntl.ntl_loss(hidden @ w.T, labels, vocab, method="mse"), atol=1e-4)
        True
    """
    m = resolve_method(method, squash_factor, huber_delta)
    V, t = _check_head(hidden, lm_head_weight, bias, temperature)
    labels, ignore_index, spec = resolve_call(labels, hidden.shape[:-1], hidden.device, V,
                                              vocab_or_tokenizer, m, ignore_index, reduction,
                                              what="hidden.shape[:-1]")
    z = _digit_logits(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, spec.handle, t, bias)
    return _from_digit_logits(z, labels, spec, m, ignore_index, reduction, weights, target_dist,
                              V, V, "lm_head_weight.shape[0]", backend, vocab_or_tokenizer)


@shared_docs
def ntl_loss_from_digit_logits(
    digit_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    method: MethodLike = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    target_dist: torch.Tensor | None = None,
    vocab_size: int | None = None,
    squash_factor: float | None = None,
    huber_delta: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL from number-token logits ``[..., K]`` that were already gathered.

    ``digit_logits[..., k]`` is the logit of ``vocab.token_ids[k]`` (value order), as
    :func:`digit_logits_from_hidden` and ``ntl.kernels.digit_gather(logits, vocab.ids())``
    produce them; ``labels`` are token ids as for :func:`ntl.ntl_loss`, whose formulas
    and reductions apply. Useful when a framework hands out digit logits only.

    Labels that are not number tokens take no part, whatever their value. ``vocab_size``
    (the model's ``V``) makes labels ``>= V`` an error; without it the bound is the vocab's
    ``vocab_size`` for a tokenizer or ``NumberVocab``, and none for a plain id list or dict
    (whose size would only be ``max(id) + 1``).
    No ``reweigh`` (it needs the full row).

    Args:
        {digit_logits}
        {labels}
        {vocab_or_tokenizer}
        {method}
        {ignore_index}
        {reduction}
        {weights}
        {target_dist}
        vocab_size: the model's ``V``; labels ``>= V`` are then an error (see above).
        {squash_factor}
        {huber_delta}
        {backend}

    Returns:
        fp32 loss (scalar, or ``labels``-shaped for ``reduction="none"``).

    Raises:
        ValueError: ``digit_logits``' last axis is not ``K``, shapes that do not match, a bad
            ``vocab_size``, options as in :func:`ntl.ntl_loss`.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.randn(4, 12), torch.tensor([3, 7, 11, 0])
        >>> loss = ntl.ntl_loss_from_digit_logits(logits[:, :10], labels, vocab)
        >>> torch.allclose(loss, ntl.ntl_loss(logits, labels, vocab))
        True
    """
    m = resolve_method(method, squash_factor, huber_delta)
    C.check_logits(digit_logits, "digit_logits", dim="K")
    plain = isinstance(vocab_or_tokenizer, (list, tuple, Mapping, torch.Tensor))
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size <= 0):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    spec = loss_spec(vocab_or_tokenizer, vocab_size, None, m)
    if digit_logits.shape[-1] != spec.K:
        raise ValueError(f"digit_logits has {digit_logits.shape[-1]} columns but the vocab has "
                         f"K={spec.K} number tokens (shape {tuple(digit_logits.shape)})")
    labels = C.check_labels(labels, digit_logits.shape[:-1], digit_logits.device,
                            what="digit_logits.shape[:-1]")
    ignore_index = C.check_ignore_index(ignore_index)
    C.check_choice("reduction", reduction, C.REDUCTIONS)
    if vocab_size is not None:
        if vocab_size <= spec.max_id:
            raise ValueError(f"vocab_size={vocab_size} is too small for the vocab's number token id "
                             f"{spec.max_id}")
        W, hi, where = vocab_size, vocab_size, f"vocab_size={vocab_size}"
    elif plain:
        W, hi, where = spec.vocab_size, -1, ""
    else:
        W, hi = spec.vocab_size, spec.vocab_size
        where = "the vocab's vocab_size; pass vocab_size= for the model's (padded) vocabulary"
    z = digit_logits.reshape(-1, spec.K)
    return _from_digit_logits(z, labels, spec, m, ignore_index, reduction, weights, target_dist,
                              W, hi, where, backend, vocab_or_tokenizer)
