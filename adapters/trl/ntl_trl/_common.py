"""Pieces shared by the mixin and the callback: vocab, targets, metrics bookkeeping."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

import ntl

__all__ = [
    "METRIC_KEYS",
    "MetricSums",
    "digit_metric_sums",
    "lookup_column",
    "resolve_model_vocab",
    "targets_for_completions",
    "trainer_scales_loss_for_ga",
    "warn_everywhere",
]

logger = logging.getLogger("ntl")


def warn_everywhere(msg: str) -> None:
    """``msg`` on the ``ntl`` logger and on the HF trainer's logger (what users see)."""
    from transformers.utils import logging as hf_logging

    logger.warning(msg)
    hf_logging.get_logger("transformers.trainer").warning(msg)


def trainer_scales_loss_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether ``trainer.compute_loss``'s loss counts as already scaled for gradient
    accumulation, i.e. ``transformers.Trainer.training_step`` will *not* divide it by the
    accumulation count: ``trainer.loss_is_scaled_for_ga`` when set, else (the HF rule) the
    model takes loss kwargs and ``num_items_in_batch`` is given, or a ``compute_loss_func`` is."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )


#: The metrics both routes log (means over digit positions, and the count).
METRIC_KEYS = ("ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence", "ntl/target_prob")


def resolve_model_vocab(tokenizer_or_vocab: Any, vocab_size: int) -> ntl.NumberVocab:
    """The number vocab of ``tokenizer_or_vocab`` for a model whose LM head has ``vocab_size`` rows.

    A processor (``.tokenizer``) is unwrapped; a :class:`ntl.NumberVocab` is used as is.
    """
    if tokenizer_or_vocab is None:
        raise ValueError(
            "NTL needs the tokenizer (or an ntl.NumberVocab) to find the digit tokens; got None"
        )
    tok = getattr(tokenizer_or_vocab, "tokenizer", None)
    if tok is not None and not isinstance(tokenizer_or_vocab, ntl.NumberVocab):
        tokenizer_or_vocab = tok
    return ntl.resolve_vocab(tokenizer_or_vocab, vocab_size)


def lookup_column(row: Any, column: str) -> Any:
    """``row[column]``, where a dotted ``column`` ("reward_model.ground_truth") walks nested dicts."""
    cur = row
    for part in column.split("."):
        if not isinstance(cur, dict) or part not in cur:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise KeyError(
                f"answer_column={column!r}: the dataset row has no field {part!r} (row keys: {keys}). "
                "Keep the column in the dataset (GRPOConfig(remove_unused_columns=False), the "
                "default) or set NTLConfig.answer_column"
            )
        cur = cur[part]
    return cur


def targets_for_completions(
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    vocab: ntl.NumberVocab,
    *,
    labels_mode: str,
    correct_only: bool,
    answers: Sequence[Any] | None,
    tokenizer: Any,
) -> tuple[torch.Tensor, list[bool] | None]:
    """Per-token digit targets (token ids; ``-100`` where NTL does not apply), aligned with
    ``completion_ids`` [B, C], and whether each completion has an extracted final answer.

    ``all`` without ``correct_only``: every sampled token targets itself (the losses only
    count positions whose target is a number token, so text tokens drop out by themselves)
    and no answers are looked at (``None``); otherwise
    :func:`ntl.targets.build_digit_targets` with the ground truths.
    """
    if labels_mode == "all" and not correct_only:
        return completion_ids.masked_fill(mask == 0, -100), None
    from ntl.targets import build_digit_targets

    if answers is None:
        raise ValueError(
            f"ntl_labels={labels_mode!r} needs the ground-truth answers, but none reached the trainer"
        )
    if len(answers) != completion_ids.shape[0]:
        raise ValueError(
            f"got {len(answers)} ground-truth answers for {completion_ids.shape[0]} completions"
        )
    targets, info = build_digit_targets(
        completion_ids,
        [str(a) for a in answers],
        tokenizer,
        mode=labels_mode,
        response_mask=mask,
        vocab=vocab,
        return_info=True,
    )
    return targets, [p is not None for p in info.preds]


def digit_metric_sums(digit_logits: torch.Tensor, targets: torch.Tensor, vocab: ntl.NumberVocab,
                      method: str) -> torch.Tensor:
    """``[n, n*loss, n*accuracy, n*confidence, n*target_prob]`` (fp32, no host sync) from
    :func:`ntl.metrics.digit_stats`, so that batches and processes combine by summing."""
    from ntl.metrics import digit_stats

    with torch.no_grad():
        s = digit_stats(digit_logits.detach(), targets, vocab, method=method)
        n = torch.as_tensor(s.total_digits, dtype=torch.float32, device=digit_logits.device)
        vals = [torch.as_tensor(getattr(s, f), dtype=torch.float32, device=n.device)
                for f in ("loss", "digit_accuracy", "confidence", "target_prob")]
        return torch.stack([n, *(n * v for v in vals)])


class MetricSums:
    """Turns summed ``[n, n*loss, ...]`` vectors into the logged ``ntl/*`` means.

    Means are NaN when no digit took part (TRL's metric averaging skips NaN)."""

    @staticmethod
    def to_metrics(sums: torch.Tensor) -> dict[str, float]:
        n, *rest = sums.tolist()
        means = [v / n if n > 0 else math.nan for v in rest]
        return {
            "ntl/loss": means[0],
            "ntl/digit_accuracy": means[1],
            "ntl/total_digits": n,
            "ntl/confidence": means[2],
            "ntl/target_prob": means[3],
        }

    @staticmethod
    def average(rows: list[dict[str, float]]) -> dict[str, float | None]:
        """Per-key mean over ``rows`` skipping NaN (``None`` if all are NaN), as TRL's ``log``."""
        out: dict[str, float | None] = {}
        for key in rows[0]:
            vals = [r[key] for r in rows if not math.isnan(r[key])]
            out[key] = sum(vals) / len(vals) if vals else None
        return out
