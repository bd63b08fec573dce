"""The functional API: Number Token Losses on ``[..., V]`` logits.

Shared semantics (see each function for its formula):

* ``logits[..., V]`` and ``labels[...]`` are aligned position by position, as
  ``F.cross_entropy`` takes them. **Shifting for causal LMs is the caller's job**:
  pass ``logits[:, :-1]`` with ``labels[:, 1:]``.
* A position takes part iff its label is a number token of the vocab; text
  tokens and ``ignore_index`` contribute nothing.
* The softmax is over the ``K`` number-token logits only (the paper's form);
  ``reweigh=True`` reproduces ``ntloss``'s full-vocabulary reweighting:
  ``L' = m L + 1.01 D (1 - m)`` with ``m`` the full-softmax mass on number tokens
  and ``D`` the largest possible loss.
* ``reduction="mean"``: ``sum_i w_i L_i / max(sum_i w_i, eps)`` over taking-part
  positions; ``"sum"``: ``sum_i w_i L_i``; ``"none"``: ``w_i L_i`` shaped like
  ``labels`` (0 elsewhere). With no taking-part position the loss is ``0.0``,
  still attached to the graph.
* Any float dtype in, math and result in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _checks as C
from .kernels import _triton
from .kernels.reference import digit_gather_torch, ntl_rows_torch
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["gaussian_targets", "ntl_loss", "ntl_mse_loss", "ntl_wasserstein_loss", "shift_labels"]

_EPS = torch.finfo(torch.float32).eps


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for these tensors (auto: Triton on CUDA, else PyTorch)."""
    C.check_choice("backend", backend, C.BACKENDS)
    if backend == "torch":
        return False
    if backend == "auto":
        return _triton.HAS_TRITON and all(t.is_cuda for t in tensors)
    _triton.require_triton(*tensors)
    return True


def prepare(
    logits: Any, labels: Any, vocab_or_tokenizer: VocabLike, ignore_index: Any,
    weights: Any, reduction: Any,
) -> tuple[torch.Tensor, torch.Tensor, NumberVocab, torch.Tensor, torch.Tensor | None]:
    """Validate and flatten: ``(logits2d [N, V], labels1d [N], vocab, k [N], weights1d)``."""
    logits = C.check_logits(logits)
    V = logits.shape[-1]
    labels1d, vocab, k, w = prepare_labels(labels, logits.shape[:-1], logits.device, "logits.shape[:-1]",
                                           V, vocab_or_tokenizer, ignore_index, weights, reduction)
    return logits.reshape(-1, V), labels1d, vocab, k, w


def prepare_labels(
    labels: Any, shape: torch.Size, device: torch.device, what: str, V: int,
    vocab_or_tokenizer: VocabLike, ignore_index: Any, weights: Any, reduction: Any,
) -> tuple[torch.Tensor, NumberVocab, torch.Tensor, torch.Tensor | None]:
    """Checks shared by every entry point once the ``V``-wide input is known:
    ``(labels1d [N], vocab, k [N], weights1d)``."""
    labels = C.check_labels(labels, shape, device, what=what)
    ignore_index = C.check_ignore_index(ignore_index)
    C.check_choice("reduction", reduction, C.REDUCTIONS)
    vocab = resolve_vocab(vocab_or_tokenizer, default_size=V)
    C.check_vocab_fits(vocab, V)
    w = C.check_weights(weights, labels)
    C.check_values(labels, V, ignore_index, w)
    labels1d = labels.reshape(-1)
    k = number_index(vocab, labels1d, V, ignore_index)
    return labels1d, vocab, k, (w.reshape(-1) if w is not None else None)


def number_index(vocab: NumberVocab, labels: torch.Tensor, V: int, ignore_index: int) -> torch.Tensor:
    """Index ``k`` of each label in the vocab; ``-1`` for text tokens and ``ignore_index``."""
    k = vocab.digit_index(labels, V)
    return k.masked_fill(labels == ignore_index, -1)


def reduce_rows(rows: torch.Tensor, k: torch.Tensor, weights: torch.Tensor | None,
                reduction: str, shape: torch.Size) -> torch.Tensor:
    """Apply weights and reduction to per-row losses (already 0 where ``k < 0``)."""
    if weights is None:
        w = (k >= 0).float()
    else:
        w = torch.where(k >= 0, weights.float(), torch.zeros((), device=rows.device))
    rows = rows * w
    if reduction == "none":
        return rows.view(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / w.sum().clamp_min(_EPS)


def reweigh_ceiling(vocab: NumberVocab, method: str) -> float:
    """``D = 1.01 x`` the largest per-position loss (``v_max - v_min`` for W1, its square for MSE).

    ``reweigh=True`` gives ``L' = m L + D (1 - m)``: mass off the number tokens costs
    more than the worst number token (``ntloss``'s constant).
    """
    d = vocab.max_distance
    return 1.01 * (d * d if method == "mse" else d)


def ntl_rows(
    logits2d: torch.Tensor, k: torch.Tensor, vocab: NumberVocab, method: str,
    soft: torch.Tensor | None = None, reweigh: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """Per-row NTL ``[N]`` fp32 (0 where ``k < 0``) through the chosen backend."""
    dev = logits2d.device
    ids, values = vocab.ids(dev), vocab.values_on(dev)
    triton_path = use_triton(backend, logits2d)
    if triton_path:
        from .kernels.rowloss import ntl_rows_triton

        rows = ntl_rows_triton(logits2d, k, ids, values, method, soft)
    else:
        rows = ntl_rows_torch(digit_gather_torch(logits2d, ids), k, values, method, soft)
    if reweigh:
        if triton_path:
            from .kernels.gather import DigitGather

            z = DigitGather.apply(logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous(), ids)
        else:
            z = digit_gather_torch(logits2d, ids)
        # full-softmax mass on the number tokens, relative to the row max (as softmax does)
        x = logits2d.float()
        m = x.detach().amax(-1, keepdim=True)
        mass = torch.exp(z.float() - m).sum(-1) / torch.exp(x - m).sum(-1)
        rows = rows * mass + reweigh_ceiling(vocab, method) * (1.0 - mass)
        rows = torch.where(k >= 0, rows, torch.zeros((), device=dev))
    return rows


def ntl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    method: str = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    target_dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL with ``method="mse"`` (:func:`ntl_mse_loss`) or ``"wasserstein"``
    (:func:`ntl_wasserstein_loss`); the arguments are theirs."""
    method = C.check_method(method)
    if not isinstance(reweigh, bool):
        raise TypeError(f"reweigh must be a bool, got {type(reweigh).__name__}")
    logits2d, _, vocab, k, w = prepare(logits, labels, vocab_or_tokenizer, ignore_index, weights, reduction)
    soft = None
    if target_dist is not None:
        if method != "wasserstein":
            raise ValueError("target_dist is only supported with method='wasserstein'")
        soft = check_target_dist(target_dist, labels, vocab)
    rows = ntl_rows(logits2d, k, vocab, method, soft, reweigh, backend)
    return reduce_rows(rows, k, w, reduction, labels.shape)


def check_target_dist(target_dist: Any, labels: torch.Tensor, vocab: NumberVocab) -> torch.Tensor:
    """Validate a soft target distribution ``[..., K]`` and flatten it to ``[N, K]``."""
    if not isinstance(target_dist, torch.Tensor) or not target_dist.dtype.is_floating_point:
        raise TypeError("target_dist must be a floating-point torch.Tensor of shape labels.shape + (K,)")
    want = (*labels.shape, vocab.K)
    if tuple(target_dist.shape) != want:
        raise ValueError(f"target_dist shape {tuple(target_dist.shape)} must be labels.shape + (K,) = {want}")
    if target_dist.device != labels.device:
        raise ValueError(f"target_dist is on {target_dist.device} but labels are on {labels.device}")
    return target_dist.reshape(-1, vocab.K)


def ntl_mse_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL-MSE: squared error of the expected number-token value.

    Per position with number logits ``z`` (``K`` of them), ``q = softmax(z)``,
    values ``v`` and target value ``y``::

        yhat = sum_k q_k v_k,   L = (yhat - y)^2,   dL/dz_j = 2 (yhat - y) q_j (v_j - yhat)

    Args:
        logits: ``[..., V]`` float logits (fp32/bf16/fp16), aligned with ``labels``
            (shift them yourself for causal LMs).
        labels: ``[...]`` integer token ids; only number-token labels take part.
        vocab_or_tokenizer: a Hugging Face tokenizer, a ``NumberVocab``/``DigitVocab``,
            a list of the ten digit ids, or an ``{id: value}`` dict.
        ignore_index: label value that never takes part.
        reduction: ``"mean"`` (weighted mean over taking-part positions), ``"sum"``
            or ``"none"`` (shaped like ``labels``).
        weights: optional ``[...]`` non-negative per-position weights.
        reweigh: ``ntloss``'s full-vocabulary reweighting (off, as in the paper).
        backend: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"``.

    Returns:
        fp32 scalar, or ``labels``-shaped tensor for ``reduction="none"``.
    """
    return ntl_loss(logits, labels, vocab_or_tokenizer, method="mse", ignore_index=ignore_index,
                    reduction=reduction, weights=weights, reweigh=reweigh, backend=backend)


def ntl_wasserstein_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    reweigh: bool = False,
    target_dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL-W1: Wasserstein-1 distance between the number-token distribution and the target.

    With ``q = softmax(z)`` over the ``K`` number logits, sorted values ``v``, CDF
    ``Q_k = sum_{i<=k} q_i``, target CDF ``T_k`` and gaps ``g_k = v_{k+1} - v_k``::

        L = sum_{k<K-1} |Q_k - T_k| g_k          (= sum_k q_k |v_k - y| for a one-hot target y)
        dL/dz_j = q_j (|v_j - y| - L)            (one-hot target)

    ``target_dist`` (``labels.shape + (K,)``, rows summing to 1, in the vocab's
    value order) replaces the one-hot target at taking-part positions, e.g. a
    Gaussian smoothing over digits (:func:`ntl.gaussian_targets`). Other arguments
    as in :func:`ntl_mse_loss`.
    """
    return ntl_loss(logits, labels, vocab_or_tokenizer, method="wasserstein",
                    ignore_index=ignore_index, reduction=reduction, weights=weights,
                    reweigh=reweigh, target_dist=target_dist, backend=backend)


def gaussian_targets(
    labels: torch.Tensor, vocab_or_tokenizer: VocabLike, sigma: float = 1.0, *, vocab_size: int | None = None
) -> torch.Tensor:
    """Gaussian label smoothing over number values: ``T_k ∝ exp(-(v_k - y)^2 / (2 sigma^2))``.

    Returns ``labels.shape + (K,)`` fp32 rows summing to 1 (where the label is not a
    number token the row is centred on the smallest value; those rows never take part).
    """
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    vocab = resolve_vocab(vocab_or_tokenizer, vocab_size)
    values = vocab.values_on(labels.device)
    k = vocab.digit_index(labels, vocab_size)
    y = values[k.clamp_min(0)]
    return torch.softmax(-((values - y[..., None]) ** 2) / (2.0 * sigma * sigma), dim=-1)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM labels aligned with unshifted logits: ``out[..., t] = labels[..., t + 1]``,
    ``ignore_index`` at the last position.

    ``loss(logits, shift_labels(ids))`` scores the same pairs as
    ``loss(logits[:, :-1], ids[:, 1:])`` but keeps ``logits`` contiguous, so
    nothing copies the ``[B, T, V]`` tensor (a sliced view cannot be flattened).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise TypeError("labels must be a tensor with a sequence dimension last")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
