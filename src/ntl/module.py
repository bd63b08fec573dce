"""``nn.Module`` front end of the functional losses."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks as C
from .losses import check_squash_factor, ntl_loss, squash_table
from .number_level import (
    NumberLevelVocab,
    check_options,
    decimal_point,
    number_level_loss,
    number_level_vocab,
)
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["NumberTokenLoss"]


class NumberTokenLoss(nn.Module):
    """Number Token Loss as a module: ``NumberTokenLoss(tokenizer)(logits, labels)``.

    Wraps :func:`ntl.ntl_mse_loss` (``method="mse"``),
    :func:`ntl.ntl_wasserstein_loss` (``method="wasserstein"``, optionally with
    ``squash_factor``) and :func:`ntl.number_level_loss` (``method="number"``, which
    alone takes ``float_level``, ``decimal_point_id`` and ``max_number_length``); the
    vocabulary is resolved once at construction. Logits and labels are aligned
    position by position (shift them for causal LMs).
    """

    number_level: NumberLevelVocab | None
    vocab: NumberVocab
    method: str
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
        method: str = "wasserstein",
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
    ) -> None:
        super().__init__()
        self.number_level = None
        if method == "number":
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
            self.method = C.check_method(method)
        self.ignore_index = C.check_ignore_index(ignore_index)
        self.reduction = C.check_choice("reduction", reduction, C.REDUCTIONS)
        self.backend = C.check_choice("backend", backend, C.BACKENDS)
        self.reweigh = C.check_bool("reweigh", reweigh)
        self.squash_factor = check_squash_factor(squash_factor, self.method)
        if self.squash_factor is not None:
            squash_table(self.vocab, self.squash_factor)  # a vocab it cannot squash fails here

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
        target_dist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.number_level is not None:
            if target_dist is not None:
                raise ValueError("target_dist is not supported with method='number'")
            return number_level_loss(logits, labels, self.number_level, float_level=self.float_level,
                                     max_number_length=self.max_number_length, reweigh=self.reweigh,
                                     ignore_index=self.ignore_index, reduction=self.reduction,
                                     weights=weights, backend=self.backend)
        return ntl_loss(logits, labels, self.vocab, method=self.method, ignore_index=self.ignore_index,
                        reduction=self.reduction, weights=weights, reweigh=self.reweigh,
                        target_dist=target_dist, squash_factor=self.squash_factor, backend=self.backend)

    def extra_repr(self) -> str:
        sq = f", squash_factor={self.squash_factor}" if self.squash_factor is not None else ""
        return (f"method={self.method!r}, K={self.vocab.K}, reduction={self.reduction!r}, "
                f"reweigh={self.reweigh}{sq}")
