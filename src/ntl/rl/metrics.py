"""Digit-level metrics from logits and digit targets (for logging, no gradients).

Inputs shared by :func:`digit_stats` and :func:`digit_probs`:

* ``logits_or_digit_logits``: either full logits ``[..., V]`` or digit logits
  ``[..., K]``. **Disambiguation: a last dimension equal to ``vocab.K`` means digit
  logits** (columns in the vocab's value order, as ``ntl.digit_logits_from_hidden``
  returns them); any other width is full logits, whose columns ``vocab.ids`` are
  gathered (so every number-token id must be ``< V``).
* ``targets[...]``: target **token ids** aligned with the logits, ``ignore_index``
  (or any non-number token) where nothing applies — the output of
  :func:`ntl.rl.targets.build_digit_targets`.
* ``temperature``: digit logits are divided by it before the softmax (use the
  rollout temperature, as the RL log-probs do).

With ``q = softmax(z / temperature)`` over the ``K`` number tokens at a position
with target index ``k*``: confidence ``= max_k q_k``, target probability
``= q_{k*}``, correct ``= [argmax_k q_k == k*]``.

With a multi-digit vocabulary (Llama-3's whole :class:`~ntl.NumberVocab`, ``K = 1,110``,
from :func:`ntl.vocab_for_tokenizer`) these count **number tokens**, not digits:
``k*`` is the index of the target token (e.g. ``'129'``), ``digit_accuracy`` is
number-token accuracy (the argmax token equals the target token; ``'07'`` and ``'7'``
are different tokens), ``total_digits`` is the number of targeted number tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .. import _checks as C
from .._docs import shared_docs
from ..kernels.reference import ntl_rows_torch
from ..vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["DigitProbs", "DigitStats", "digit_probs", "digit_stats"]


@dataclass(frozen=True)
class DigitStats:
    """Digit metrics, each a 0-dim fp32 tensor (no host sync until :meth:`to_dict`).

    Over the ``N`` positions with a number-token target (with a multi-digit vocabulary
    these are number tokens, and ``digit_accuracy`` is number-token accuracy):
    ``loss = (1/N) sum_i NTL_i`` (``method``'s per-position loss),
    ``digit_accuracy = (1/N) sum_i [argmax q_i == k*_i]``,
    ``total_digits = N``, ``confidence = (1/N) sum_i max_k q_ik``,
    ``target_prob = (1/N) sum_i q_{i k*_i}``. With ``N = 0`` every field is ``0.0``.

    Attributes:
        loss: the NTL mean of ``method``.
        digit_accuracy: the share of positions whose argmax is the target.
        total_digits: ``N``, the positions with a number-token target.
        confidence: the mean top probability.
        target_prob: the mean target probability.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> s = ntl.digit_stats(torch.zeros(2, 12), torch.tensor([3, 11]), vocab)
        >>> {k: round(v, 2) for k, v in s.to_dict().items()}  # one host sync
        {'ntl/loss': 2.7, 'ntl/digit_accuracy': 0.0, 'ntl/total_digits': 1.0, 'ntl/confidence': 0.1,
         'ntl/target_prob': 0.1}
    """

    loss: torch.Tensor
    digit_accuracy: torch.Tensor
    total_digits: torch.Tensor
    confidence: torch.Tensor
    target_prob: torch.Tensor

    def to_dict(self, prefix: str = "ntl/") -> dict[str, float]:
        """``{prefix + name: float}`` for every field, with one host sync."""
        names = [f.name for f in fields(self)]
        vals = torch.stack([getattr(self, n).detach().float().reshape(()) for n in names]).tolist()
        return {prefix + n: float(v) for n, v in zip(names, vals, strict=True)}


@dataclass(frozen=True)
class DigitProbs:
    """Per-position digit probabilities, shaped like ``targets``.

    Attributes:
        target_prob: fp32 ``q_{k*}``, 0 where ``mask`` is False.
        max_prob: fp32 ``max_k q_k``, 0 where ``mask`` is False.
        pred_digit: int64 ``argmax_k q_k`` (index into the vocab, equal to the digit
            value for a DigitVocab), -1 where ``mask`` is False.
        target_digit: int64 ``k*``, -1 where ``mask`` is False.
        correct: bool ``pred_digit == target_digit`` (False where ``mask`` is False).
        mask: bool, True where the target is a number token.

    Example:
        >>> import torch
        >>> from ntl.rl.metrics import digit_probs
        >>> import ntl
        >>> logits = torch.zeros(1, 2, 12)
        >>> logits[0, 0, 3] = 50.0
        >>> p = digit_probs(logits, torch.tensor([[3, -100]]), ntl.DigitVocab(range(10), 12))
        >>> p.correct, p.pred_digit, p.target_prob
        (tensor([[ True, False]]), tensor([[ 3, -1]]), tensor([[1., 0.]]))
    """

    target_prob: torch.Tensor
    max_prob: torch.Tensor
    pred_digit: torch.Tensor
    target_digit: torch.Tensor
    correct: torch.Tensor
    mask: torch.Tensor


def _prepare(
    x: Any, targets: Any, vocab_or_tokenizer: VocabLike, ignore_index: Any, temperature: Any
) -> tuple[torch.Tensor, torch.Tensor, NumberVocab]:
    """Validated ``(digit_logits [N, K] fp32 / temperature, k [N], vocab)``."""
    x = C.check_logits(x, "logits_or_digit_logits")
    targets = C.check_labels(targets, x.shape[:-1], x.device, "targets", "logits_or_digit_logits.shape[:-1]")
    ignore_index = C.check_ignore_index(ignore_index)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    vocab = resolve_vocab(vocab_or_tokenizer)
    K, W = vocab.K, x.shape[-1]
    if W == K:
        z = x.reshape(-1, K)
    else:
        if max(vocab.token_ids) >= W:
            raise ValueError(
                f"logits_or_digit_logits has last dim {W}: not the vocab's K={K} (digit logits) "
                f"and too narrow for its token id {max(vocab.token_ids)} (full logits)"
            )
        # gather the K columns first: no [N, V] copy even for non-contiguous logits
        z = x.index_select(-1, vocab.ids(x.device)).reshape(-1, K)
    flat = targets.reshape(-1)
    if not flat.is_cuda and flat.numel() and bool(((flat < 0) & (flat != ignore_index)).any()):
        raise ValueError(f"targets must be token ids >= 0 or ignore_index={ignore_index}")
    width = max(vocab.vocab_size, max(vocab.token_ids) + 1)
    k = vocab.digit_index(flat, width)
    z = z.float()
    if temperature != 1:
        z = z / float(temperature)
    return z, k, vocab


@shared_docs
@torch.no_grad()
def digit_probs(
    logits_or_digit_logits: torch.Tensor,
    targets: torch.Tensor,
    vocab: VocabLike,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> DigitProbs:
    """Per-position target probability, confidence and argmax digit (see :class:`DigitProbs`).

    No host sync (on CUDA); no gradient.

    Args:
        logits_or_digit_logits: full logits ``[..., V]`` or digit logits ``[..., K]`` (a last
            dimension equal to ``vocab.K`` means digit logits; see the module docstring).
        {targets}
        {vocab}
        {ignore_index}
        {temperature}

    Returns:
        A :class:`DigitProbs` of ``targets``-shaped tensors.

    Raises:
        ValueError: shapes that do not match, ``temperature <= 0``, negative target ids.

    Example:
        >>> import torch, ntl
        >>> from ntl.rl.metrics import digit_probs
        >>> p = digit_probs(torch.zeros(3, 10), torch.tensor([2, 5, -100]), [*range(10)])
        >>> p.target_prob, p.mask
        (tensor([0.1000, 0.1000, 0.0000]), tensor([ True,  True, False]))
    """
    z, k, _ = _prepare(logits_or_digit_logits, targets, vocab, ignore_index, temperature)
    shape = targets.shape
    q = torch.softmax(z, dim=-1)
    mask = k >= 0
    maxp, arg = q.max(dim=-1)
    tp = q.gather(1, k.clamp_min(0)[:, None])[:, 0]
    zero = torch.zeros((), device=q.device)
    neg = torch.full((), -1, dtype=torch.long, device=q.device)
    return DigitProbs(
        target_prob=torch.where(mask, tp, zero).view(shape),
        max_prob=torch.where(mask, maxp, zero).view(shape),
        pred_digit=torch.where(mask, arg, neg).view(shape),
        target_digit=torch.where(mask, k, neg).view(shape),
        correct=(mask & (arg == k)).view(shape),
        mask=mask.view(shape),
    )


@shared_docs
@torch.no_grad()
def digit_stats(
    logits_or_digit_logits: torch.Tensor,
    targets: torch.Tensor,
    vocab: VocabLike,
    *,
    method: str = "wasserstein",
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> DigitStats:
    """Digit metrics over the positions whose target is a number token (:class:`DigitStats`).

    ``loss`` is the NTL mean of ``method`` (``"wasserstein"``: ``sum_k q_k |v_k - y|``;
    ``"mse"``: ``(sum_k q_k v_k - y)^2``), detached; for a loss to backpropagate use
    :func:`ntl.ntl_loss`. No host sync (on CUDA) until ``.to_dict()``.

    Args:
        logits_or_digit_logits: full logits ``[..., V]`` or digit logits ``[..., K]`` (a last
            dimension equal to ``vocab.K`` means digit logits; see the module docstring).
        {targets}
        {vocab}
        method: ``"wasserstein"`` or ``"mse"``.
        {ignore_index}
        {temperature}

    Returns:
        A :class:`DigitStats` of 0-dim fp32 tensors.

    Raises:
        ValueError: an unknown ``method``, shapes that do not match, ``temperature <= 0``.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits = torch.zeros(2, 12)
        >>> logits[0, 3] = 50.0  # sure of '3'
        >>> s = ntl.digit_stats(logits, torch.tensor([3, 8]), vocab)
        >>> s.digit_accuracy, s.total_digits, s.confidence
        (tensor(0.5000), tensor(2.), tensor(0.5500))
    """
    method = C.check_method(method)
    z, k, vocab = _prepare(logits_or_digit_logits, targets, vocab, ignore_index, temperature)
    q = torch.softmax(z, dim=-1)
    mask = k >= 0
    n = mask.float().sum()
    denom = n.clamp_min(1.0)
    zero = torch.zeros((), device=z.device)

    def mean(v: torch.Tensor) -> torch.Tensor:  # masked mean; where() keeps NaN rows out
        return torch.where(mask, v.float(), zero).sum() / denom

    rows = ntl_rows_torch(z, k, vocab.values_on(z.device), method)
    maxp, arg = q.max(dim=-1)
    tp = q.gather(1, k.clamp_min(0)[:, None])[:, 0]
    return DigitStats(
        loss=mean(rows),
        digit_accuracy=mean(arg == k),
        total_digits=n,
        confidence=mean(maxp),
        target_prob=mean(tp),
    )
