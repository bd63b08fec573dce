"""``nn.Module`` front end of the functional losses."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks as C
from ._docs import shared_docs
from .losses import MethodLike, bind_decimal_point, ntl_loss, resolve_method
from .methods import W1, Method
from .number_level import (
    NumberLevelVocab,
    check_options,
    decimal_point,
    number_level_loss,
    number_level_vocab,
)
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["NumberTokenLoss"]


@shared_docs
class NumberTokenLoss(nn.Module):
    """Number Token Loss as a module: ``NumberTokenLoss(tokenizer)(logits, labels)``.

    Wraps :func:`ntl.ntl_loss` for every method of :mod:`ntl.methods` and
    :func:`ntl.number_level_loss` (``method="number"``, which alone takes ``float_level``,
    ``decimal_point_id`` and ``max_number_length``); the vocabulary and the method are
    resolved once at construction. Logits and labels are aligned position by position
    (shift them for causal LMs). ``forward(logits, labels, weights=None, target_dist=None)``.

    Attributes: ``method`` the canonical name (``"number"`` for the number-level loss),
    ``loss_method`` the :class:`ntl.methods.Method` (``None`` for ``"number"``).

    Args:
        {vocab_or_tokenizer}
        method: as in :func:`ntl.ntl_loss` (a registered name or an :mod:`ntl.methods`
            object), or ``"number"`` for :func:`ntl.number_level_loss`.
        {ignore_index}
        {reduction}
        {reweigh}
        {backend}
        {vocab_size}
        {float_level} ``method="number"`` only.
        {decimal_point_id} ``method="number"`` only.
        {max_number_length} ``method="number"`` only.
        {squash_factor}
        {huber_delta}

    Raises:
        ValueError: options that do not apply to ``method``, options out of range.

    Example:
        >>> import torch, ntl
        >>> crit = ntl.NumberTokenLoss(ntl.DigitVocab(range(10), 12), method="mse")
        >>> crit(torch.zeros(2, 12), torch.tensor([3, 5]))  # yhat = 4.5
        tensor(1.2500)
    """

    number_level: NumberLevelVocab | None
    vocab: NumberVocab
    method: str
    loss_method: Method | None
    float_level: bool
    max_number_length: int
    ignore_index: int
    reduction: str
    backend: str
    reweigh: bool
    squash_factor: float | None

    def __init__(
        self,
        vocab_or_tokenizer: VocabLike,
        method: MethodLike = "wasserstein",
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        reweigh: bool = False,
        backend: str = "auto",
        vocab_size: int | None = None,
        float_level: bool = False,
        decimal_point_id: int | None = None,
        max_number_length: int = 20,
        squash_factor: float | None = None,
        huber_delta: float | None = None,
    ) -> None:
        super().__init__()
        self.number_level = None
        self.loss_method = None
        if isinstance(method, str) and method == "number":
            self.number_level = number_level_vocab(vocab_or_tokenizer, vocab_size,
                                                   decimal_point_id=decimal_point_id)
            check_options(float_level, max_number_length, reweigh, decimal_point_id)
            decimal_point(self.number_level, float_level, ignore_index=ignore_index)
            self.vocab, self.method = self.number_level.digits, method
            self.float_level, self.max_number_length = float_level, max_number_length
        elif (float_level, decimal_point_id, max_number_length) != (False, None, 20):
            raise ValueError("float_level, decimal_point_id and max_number_length apply only to "
                             f"method='number', got method={method!r}")
        else:
            self.vocab = resolve_vocab(vocab_or_tokenizer, vocab_size)
            self.loss_method = bind_decimal_point(resolve_method(method, squash_factor, huber_delta),
                                                  vocab_or_tokenizer)
            self.method = self.loss_method.name
            self.loss_method.kernel_scalars(self.vocab)  # a vocab the method cannot use fails here
        self.ignore_index = C.check_ignore_index(ignore_index)
        self.reduction = C.check_choice("reduction", reduction, C.REDUCTIONS)
        self.backend = C.check_backend(backend)
        self.reweigh = C.check_bool("reweigh", reweigh)
        if self.loss_method is not None:
            self.loss_method.check_reweigh(reweigh)
        if self.loss_method is None and (squash_factor, huber_delta) != (None, None):
            raise ValueError("squash_factor and huber_delta do not apply to method='number'")
        lm = self.loss_method
        self.squash_factor = lm.squash_factor if isinstance(lm, W1) else None

    @shared_docs
    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
        target_dist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``logits`` against ``labels`` with the settings of construction.

        Args:
            {logits}
            {labels}
            {weights}
            {target_dist} Not with ``method="number"``.

        Returns:
            fp32 scalar, or a ``labels``-shaped tensor for ``reduction="none"``.
        """
        if self.number_level is not None:
            if target_dist is not None:
                raise ValueError("target_dist is not supported with method='number'")
            return number_level_loss(logits, labels, self.number_level, float_level=self.float_level,
                                     max_number_length=self.max_number_length, reweigh=self.reweigh,
                                     ignore_index=self.ignore_index, reduction=self.reduction,
                                     weights=weights, backend=self.backend)
        assert self.loss_method is not None
        return ntl_loss(logits, labels, self.vocab, method=self.loss_method, ignore_index=self.ignore_index,
                        reduction=self.reduction, weights=weights, reweigh=self.reweigh,
                        target_dist=target_dist, backend=self.backend)

    def extra_repr(self) -> str:
        m = self.loss_method.describe() if self.loss_method is not None else repr(self.method)
        return f"method={m}, K={self.vocab.K}, reduction={self.reduction!r}, reweigh={self.reweigh}"
