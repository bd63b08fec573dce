"""Pieces shared by the mixins and the callback: the number vocab, targets, metrics bookkeeping."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

import ntl
from ntl.methods import Method, resolve

__all__ = [
    "METRIC_KEYS",
    "MetricSums",
    "adapter_method",
    "check_final_answer_vocab",
    "digit_metric_sums",
    "lookup_column",
    "ntl_sums_from_digit_logits",
    "place_weights_of",
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
    decimal_point_id: int | None = None,
) -> tuple[torch.Tensor, list[bool] | None]:
    """Per-token number-token targets (token ids; ``-100`` where NTL does not apply), aligned
    with ``completion_ids`` [B, C], and whether each completion has an extracted final answer.

    ``all`` without ``correct_only``: every sampled token targets itself (the losses only
    count positions whose target is a number token of ``vocab``, so text tokens drop out by
    themselves) and no answers are looked at (``None``); otherwise
    :func:`ntl.rl.targets.build_digit_targets` with the ground truths and ``vocab`` (for
    ``final_answer``, each answer token covering places ``[p, p + w)`` targets the width-``w``
    token of the truth's digits there: Llama-3 ``'123' '4'`` vs 1299 -> ``'129' '9'``).
    ``decimal_point_id`` (DEL's place weights): the completion's ``'.'`` between two number
    targets is kept (:func:`ntl.rl.targets.keep_decimal_points`), so the answer's decimals count
    as decimals.
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
    if decimal_point_id is not None:
        from ntl.rl.targets import keep_decimal_points

        targets = keep_decimal_points(targets, completion_ids.masked_fill(mask == 0, -100), vocab,
                                      decimal_point_id)
    return targets, [p is not None for p in info.preds]


def adapter_method(method: str | Method, tokenizer_or_vocab: Any, vocab: ntl.NumberVocab) -> Method:
    """The :class:`ntl.methods.Method` an adapter hands to the core losses: ``method`` (a
    registered name or a method object) resolved, with the tokenizer's ``'.'`` as DEL's decimal
    point (unless the object names one; none for a :class:`ntl.NumberVocab`). ``ValueError``
    for DEL's place weights with a multi-digit vocab that does not know its tokens' widths."""
    from ntl.losses import bind_decimal_point

    tok = tokenizer_or_vocab
    if not hasattr(tok, "get_vocab") and hasattr(tok, "tokenizer"):
        tok = tok.tokenizer  # a processor wraps its tokenizer
    m = bind_decimal_point(resolve(method, name="ntl_method"), tok)
    if m.place_weighted and vocab.widths is None and not vocab.is_digit_vocab:
        raise ValueError(
            f"ntl_method={m.describe()}: DEL's place weights need each number token's digit width, "
            f"and {vocab!r} was built without token texts; pass the tokenizer, or "
            "ntl_method=ntl.methods.DEL(place_weights=False)"
        )
    return m


def place_weights_of(targets: torch.Tensor, vocab: ntl.NumberVocab,
                     method: str | Method) -> torch.Tensor | None:
    """DEL's place weights (:func:`ntl.number_level.place_weights`) of ``targets [..., L]``
    (token ids; the last axis the sequence, as the core reads labels), or ``None`` for a method
    without them. Computed on the whole rows, before the number-token rows are selected."""
    m = resolve(method)
    if not m.place_weighted:
        return None
    from ntl.number_level import place_weights

    return place_weights(targets, vocab, m.decimal_point(), -100, max(vocab.vocab_size, 1))


def ntl_sums_from_digit_logits(z: torch.Tensor, targets: torch.Tensor, vocab: ntl.NumberVocab,
                               method: str | Method,
                               place: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i pw_i NTL_i, metric sums)`` for number logits ``z [n, K]`` of the ``n`` selected
    targets ``targets [n]``; ``place [n]``: DEL's place weights ``pw`` of those positions (from
    :func:`place_weights_of` on the whole rows: the selected rows alone are no sequence).
    ``ntl/loss`` is the mean of the same per-position terms the loss sums."""
    m = resolve(method)
    if m.place_weighted:
        if place is None:
            raise ValueError("DEL's place weights must come from the whole rows (place_weights_of)")
        m = dataclasses.replace(m, place_weights=False)  # type: ignore[call-arg]
    rows = ntl.ntl_loss_from_digit_logits(z, targets, vocab, method=m, reduction="none")
    if place is not None:
        rows = rows * place.to(rows.device)
    return rows.sum(), digit_metric_sums(z, targets, vocab, rows)


def digit_metric_sums(digit_logits: torch.Tensor, targets: torch.Tensor, vocab: ntl.NumberVocab,
                      loss_rows: torch.Tensor) -> torch.Tensor:
    """``[n, n*loss, n*accuracy, n*confidence, n*target_prob]`` (fp32, no host sync) over the
    ``n`` number-token targets: ``loss_rows [n]`` the per-position NTL terms (0 off the
    targets), the others from :func:`ntl.rl.metrics.digit_stats` (``digit_logits``: ``[n, K]``
    over the vocab's ``K`` number tokens; accuracy = argmax token == target token), so that
    batches and processes combine by summing."""
    from ntl.rl.metrics import digit_stats

    with torch.no_grad():
        s = digit_stats(digit_logits.detach(), targets, vocab)
        n = torch.as_tensor(s.total_digits, dtype=torch.float32, device=digit_logits.device)
        vals = [torch.as_tensor(getattr(s, f), dtype=torch.float32, device=n.device)
                for f in ("digit_accuracy", "confidence", "target_prob")]
        return torch.stack([n, loss_rows.detach().float().sum().to(n.device), *(n * v for v in vals)])


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
