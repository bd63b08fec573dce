"""NTL straight from hidden states: no ``[N, V]`` logits anywhere.

The number-token logits of a position are ``z = (h @ W[ids].T + b[ids]) / T``:
a ``[N, H] x [H, K]`` matmul (``K = 10`` for digits) instead of the ``[N, V]``
LM head. This is how the RL adapters get digit logits when the framework never
materialises logits (fused LM-head kernels in TRL >= 1.15 and verl).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import _checks as C
from .kernels.reference import ntl_rows_torch
from .losses import check_target_dist, prepare_labels, reduce_rows, use_triton
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["digit_logits_from_hidden", "ntl_loss_from_digit_logits", "ntl_loss_from_hidden"]


def _check_head(hidden: Any, weight: Any, bias: Any, temperature: Any) -> tuple[int, float]:
    C.check_logits(hidden, "hidden", dim="H")
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.dim() != 2:
        raise TypeError(
            "lm_head_weight must be a 2-D float tensor [V, H], got "
            + (f"{weight.dtype} of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
               else type(weight).__name__)
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight shape {tuple(weight.shape)} does not match hidden size "
            f"{hidden.shape[-1]} (hidden shape {tuple(hidden.shape)}); expected [V, {hidden.shape[-1]}]"
        )
    if weight.device != hidden.device:
        raise ValueError(f"lm_head_weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError("bias must be a float tensor of shape [V] or None, got "
                            + (str(bias.dtype) if isinstance(bias, torch.Tensor) else type(bias).__name__))
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be [V={weight.shape[0]}]")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return weight.shape[0], float(temperature)


def _digit_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: NumberVocab,
                  temperature: float, bias: torch.Tensor | None) -> torch.Tensor:
    ids = vocab.ids(hidden.device)
    w = weight.index_select(0, ids).float()
    b = bias.index_select(0, ids).float() if bias is not None else None
    z = F.linear(hidden.float(), w, b)
    return z / temperature if temperature != 1.0 else z


def digit_logits_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number-token logits ``(hidden @ W[ids].T + bias[ids]) / temperature``: ``[..., K]`` fp32.

    ``lm_head_weight`` is the LM head's ``[V, H]`` weight; ``ids`` the vocab's
    number tokens in value order. Gradients reach ``hidden`` and the ``K`` rows of ``W``.
    """
    V, t = _check_head(hidden, lm_head_weight, bias, temperature)
    vocab = resolve_vocab(vocab_or_tokenizer, default_size=V)
    C.check_vocab_fits(vocab, V)
    return _digit_logits(hidden, lm_head_weight, vocab, t, bias)


def ntl_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    method: str = "wasserstein",
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    target_dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL from hidden states and the LM head, without ever forming ``[N, V]`` logits.

    Equals ``ntl_loss(hidden @ W.T + bias) / temperature, labels, ...)`` (see
    :func:`ntl.ntl_mse_loss` / :func:`ntl.ntl_wasserstein_loss` for the formulas
    and reductions): the digit logits are ``z = (h @ W[ids].T + b[ids]) / T``.

    Args:
        hidden: ``[..., H]`` hidden states (any float dtype), aligned with ``labels``
            (for a causal LM, the state at position ``t-1`` scores the token at ``t``).
        lm_head_weight: ``[V, H]`` LM-head weight (tied embeddings work the same way).
        labels: ``[...]`` token ids; number tokens take part.
        method: ``"mse"`` or ``"wasserstein"``.
        temperature: divides the logits, as samplers and RL log-probs do.
        bias: optional ``[V]`` LM-head bias.

    Returns:
        fp32 loss (scalar, or ``labels``-shaped for ``reduction="none"``).
    """
    method = C.check_method(method)
    V, t = _check_head(hidden, lm_head_weight, bias, temperature)
    _, vocab, k, w = prepare_labels(labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]", V,
                                    vocab_or_tokenizer, ignore_index, weights, reduction)
    soft = _soft(target_dist, method, labels, vocab)
    z = _digit_logits(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, vocab, t, bias)
    return reduce_rows(_rows_from_digit_logits(z, k, vocab, method, soft, backend), k, w, reduction,
                       labels.shape)


def _soft(target_dist: Any, method: str, labels: torch.Tensor, vocab: NumberVocab) -> torch.Tensor | None:
    if target_dist is None:
        return None
    if method != "wasserstein":
        raise ValueError("target_dist is only supported with method='wasserstein'")
    return check_target_dist(target_dist, labels, vocab)


def _rows_from_digit_logits(z: torch.Tensor, k: torch.Tensor, vocab: NumberVocab, method: str,
                            soft: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Per-row NTL from ``[N, K]`` digit logits (columns in the vocab's value order)."""
    values = vocab.values_on(z.device)
    if use_triton(backend, z):
        from .kernels.rowloss import ntl_rows_triton

        return ntl_rows_triton(z, k, torch.arange(vocab.K, device=z.device), values, method, soft)
    return ntl_rows_torch(z, k, values, method, soft)


def ntl_loss_from_digit_logits(
    digit_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    method: str = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    target_dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL from number-token logits ``[..., K]`` that were already gathered.

    ``digit_logits[..., k]`` is the logit of ``vocab.token_ids[k]`` (value order), as
    :func:`digit_logits_from_hidden` and ``ntl.kernels.digit_gather(logits, vocab.ids())``
    produce them; ``labels`` are token ids as for :func:`ntl.ntl_loss`, whose formulas
    and reductions apply. Useful when a framework hands out digit logits only.
    """
    method = C.check_method(method)
    C.check_logits(digit_logits, "digit_logits", dim="K")
    vocab = resolve_vocab(vocab_or_tokenizer)
    if digit_logits.shape[-1] != vocab.K:
        raise ValueError(f"digit_logits has {digit_logits.shape[-1]} columns but the vocab has "
                         f"K={vocab.K} number tokens (shape {tuple(digit_logits.shape)})")
    _, vocab, k, w = prepare_labels(labels, digit_logits.shape[:-1], digit_logits.device,
                                    "digit_logits.shape[:-1]", vocab.vocab_size, vocab, ignore_index,
                                    weights, reduction)
    soft = _soft(target_dist, method, labels, vocab)
    z = digit_logits.reshape(-1, vocab.K)
    return reduce_rows(_rows_from_digit_logits(z, k, vocab, method, soft, backend), k, w, reduction,
                       labels.shape)

