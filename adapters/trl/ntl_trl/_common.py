"""Pieces shared by the mixins and the callback: the number vocab, targets, metrics bookkeeping."""

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
    "check_final_answer_vocab",
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


#: The metrics both routes log: means over the number-token targets, and their count.
#: ``ntl/total_digits`` and ``ntl/digit_accuracy`` keep their names but count number tokens
#: (Llama-3's ``'123'`` is one target; with a digit-level tokenizer every number token is a digit).
METRIC_KEYS = ("ntl/loss", "ntl/digit_accuracy", "ntl/total_digits", "ntl/confidence", "ntl/target_prob")


def resolve_model_vocab(tokenizer_or_vocab: Any, vocab_size: int, *,
                        ntl_labels: str | None = None) -> ntl.NumberVocab:
    """The number vocabulary NTL uses for a model whose LM head has ``vocab_size`` rows.

    A tokenizer (a processor's ``.tokenizer`` is unwrapped) gives the model's *whole* number
    vocabulary, :func:`ntl.vocab_for_tokenizer`: the :class:`ntl.DigitVocab` ``'0'..'9'``
    (``K = 10``) for a digit-level tokenizer (Qwen2.5), the :class:`ntl.NumberVocab` of every
    number token (Llama-3: ``'0'..'999'``, ``K = 1,110``, widths 1-3) otherwise, so NTL
    sees every number token the model writes. A :class:`ntl.NumberVocab` is used as is.

    Refused with a ``ValueError`` naming the reason (NTL could see no target): ``None``; a
    tokenizer with no number token (no token whose text is an ASCII digit string); a number
    token id outside the LM head's ``vocab_size`` rows; with ``ntl_labels="final_answer"``,
    a vocabulary whose tokens' digit widths are unknown (:func:`check_final_answer_vocab`).
    """
    if tokenizer_or_vocab is None:
        raise ValueError(
            "NTL needs the tokenizer (or an ntl.NumberVocab) to find the number tokens; got None"
        )
    if isinstance(tokenizer_or_vocab, ntl.NumberVocab):
        vocab = tokenizer_or_vocab
        if max(vocab.token_ids) >= vocab_size:
            raise ValueError(
                f"NTL: the number vocabulary {vocab!r} has token id {max(vocab.token_ids)}, but the "
                f"model's LM head has only {vocab_size} rows"
            )
    else:
        tok = getattr(tokenizer_or_vocab, "tokenizer", None)
        if tok is not None and not hasattr(tokenizer_or_vocab, "get_vocab"):
            tokenizer_or_vocab = tok  # a processor wraps its tokenizer
        try:
            vocab = ntl.vocab_for_tokenizer(tokenizer_or_vocab, vocab_size)
        except ValueError as e:
            raise ValueError(
                f"NTL could see no target with {type(tokenizer_or_vocab).__name__} and a "
                f"{vocab_size}-row LM head: {e}. NTL needs the tokenizer's number tokens (digits "
                "'0'..'9' or multi-digit tokens such as Llama-3's '123')"
            ) from e
    if ntl_labels == "final_answer":
        check_final_answer_vocab(vocab)
    return vocab


def check_final_answer_vocab(vocab: ntl.NumberVocab) -> None:
    """``ValueError`` unless ``final_answer`` targets can be built with ``vocab``.

    A final-answer token covering ``w`` digits at places ``[p, p + w)`` targets the token of
    the ground truth's digits at those places (:func:`ntl.rl.targets.build_digit_targets`), so
    the vocabulary must tell each token's digit width: its :attr:`ntl.NumberVocab.texts`
    (``NumberVocab.from_tokenizer`` and :func:`ntl.vocab_for_tokenizer` record them), or
    values that are all single digits (every token writes one digit). The
    rule is the core's own: a one-row ``build_digit_targets`` call without any answer runs
    its vocabulary checks here, at setup, instead of at the first generation batch."""
    from ntl.rl.targets import build_digit_targets

    try:
        build_digit_targets(torch.full((1, 1), -100, dtype=torch.long), ["0"], vocab=vocab,
                            responses=[""], mode="final_answer")
    except ValueError as e:
        raise ValueError(
            f"NTL: ntl_labels='final_answer' cannot place-align targets, so NTL could see no "
            f"target: {e}; or use ntl_labels='all'"
        ) from e


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
    """Per-token number-token targets (token ids; ``-100`` where NTL does not apply), aligned
    with ``completion_ids`` [B, C], and whether each completion has an extracted final answer.

    ``all`` without ``correct_only``: every sampled token targets itself (the losses only
    count positions whose target is a number token of ``vocab``, so text tokens drop out by
    themselves) and no answers are looked at (``None``); otherwise
    :func:`ntl.rl.targets.build_digit_targets` with the ground truths and ``vocab`` (for
    ``final_answer``, each answer token covering places ``[p, p + w)`` targets the width-``w``
    token of the truth's digits there: Llama-3 ``'123' '4'`` vs 1299 -> ``'129' '9'``).
    """
    if labels_mode == "all" and not correct_only:
        return completion_ids.masked_fill(mask == 0, -100), None
    from ntl.rl.targets import build_digit_targets

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
    :func:`ntl.rl.metrics.digit_stats` over the ``n`` number-token targets (``digit_logits``:
    ``[n, K]`` over the vocab's ``K`` number tokens; accuracy = argmax token == target
    token), so that batches and processes combine by summing."""
    from ntl.rl.metrics import digit_stats

    with torch.no_grad():
        s = digit_stats(digit_logits.detach(), targets, vocab, method=method)
        n = torch.as_tensor(s.total_digits, dtype=torch.float32, device=digit_logits.device)
        vals = [torch.as_tensor(getattr(s, f), dtype=torch.float32, device=n.device)
                for f in ("loss", "digit_accuracy", "confidence", "target_prob")]
        return torch.stack([n, *(n * v for v in vals)])


class MetricSums:
    """Turns summed ``[n, n*loss, ...]`` vectors into the logged ``ntl/*`` means.

    ``ntl/total_digits`` is ``n``, the number-token targets (one per token: Llama-3's
    ``'123'`` counts once); ``ntl/digit_accuracy`` the share whose argmax number token is
    the target. Means are NaN when no number token took part (TRL's metric averaging skips
    NaN)."""

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
