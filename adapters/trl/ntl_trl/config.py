"""Configuration of the TRL adapter: :class:`NTLConfig` (RL) and :class:`NTLSFTConfig` (SFT)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ntl.checks import check_method, check_ntl_weight
from ntl.methods import REGISTRY, Method

__all__ = ["NTL_LABELS", "NTL_METHODS", "NTLConfig", "NTLSFTConfig"]

NTL_METHODS = tuple(REGISTRY)  # every registered ntl.methods name ("w1" is an alias of "wasserstein")
NTL_LABELS = ("all", "final_answer")


@dataclass
class NTLConfig:
    """Options of :class:`ntl_trl.NTLTrainerMixin` (validated on construction).

    The trainer's loss becomes ``loss + ntl_weight * NTL(method)``, where NTL is the
    mean over the completion positions that have a number-token target (see ``ntl_labels``;
    the number tokens are the model's whole number vocabulary, :func:`ntl.vocab_for_tokenizer`:
    ``'0'..'9'`` for a digit-level tokenizer, ``'0'..'999'`` for Llama-3), taken over the whole
    gradient-accumulation window and all processes (each micro-batch adds its sum divided by
    the window's target count, as TRL's ``dapo`` loss does).

    Attributes:
        ntl_weight: weight of the NTL term (``>= 0``; ``0`` logs the metrics but
            leaves the update untouched).
        ntl_method: a registered :mod:`ntl.methods` name: ``"wasserstein"`` (NTL-W1, alias
            ``"w1"``), ``"mse"`` (NTL-MSE), ``"mae"``, ``"huber"`` (delta 1), ``"del"`` (the
            Digit Entropy Loss, with place weights), ``"dist2"`` (DIST², tau 1); or a method
            object carrying its parameters: ``ntl.methods.DEL(place_weights=False)``,
            ``ntl.methods.DIST2(tau=2.0)``, ``ntl.methods.Huber(delta=2.0)``,
            ``ntl.methods.W1(squash_factor=3.0)``. DEL's place weights follow the numbers of
            the scored tokens (the completion's final answer, with its ``'.'`` as the decimal
            point: the tokenizer's ``'.'`` unless the object names one).
        ntl_labels: which completion number tokens get a target.
            ``"all"``: every number token of a completion targets itself (the sampled
            token); with ``correct_only=True`` only completions whose final answer
            equals the ground truth take part (needs ``answer_column``).
            ``"final_answer"``: the number tokens of the completion's final answer (after
            the last ``####``, else the last ``\\boxed{}``) target the ground truth's digits
            aligned by place value: a token covering ``w`` digits at places ``[p, p + w)``
            targets the width-``w`` token of the truth's digits there, zero-padded (Llama-3:
            ``'123' '4'`` vs 1299 -> ``'129' '9'``; ``'42'`` vs 7 -> ``'07'``; a digit-level
            tokenizer: ``1 2 3`` vs 45 -> ``0 4 5``). Needs ``answer_column`` and a vocab
            that knows its tokens' widths (texts; a tokenizer's always does).
        answer_column: dataset column with the ground-truth answer; a dotted path
            (``"reward_model.ground_truth"``) reads a nested field, as in verl's GSM8K
            parquet. Required by ``"final_answer"`` and by ``"all"`` with ``correct_only``.
        correct_only: only for ``ntl_labels="all"``: restrict to correct completions.
            ``False`` reproduces exactly what :class:`ntl_trl.NTLCallback` does.
        temperature: temperature dividing the number-token logits; ``None`` (default) uses the
            trainer's own ``args.temperature``, as its log-probs do.
    """

    ntl_weight: float = 0.1
    ntl_method: str | Method = "wasserstein"
    ntl_labels: str = "final_answer"
    answer_column: str | None = "ground_truth"
    correct_only: bool = True
    temperature: float | None = None

    def __post_init__(self) -> None:
        self.ntl_weight = check_ntl_weight(self.ntl_weight, "NTLConfig.ntl_weight")
        self.ntl_method = check_method(self.ntl_method, "NTLConfig.ntl_method")
        if self.ntl_labels not in NTL_LABELS:
            raise ValueError(f"NTLConfig.ntl_labels must be one of {NTL_LABELS}, got {self.ntl_labels!r}")
        if not isinstance(self.correct_only, bool):
            raise TypeError(f"NTLConfig.correct_only must be a bool, got {self.correct_only!r}")
        if self.answer_column is not None and (
            not isinstance(self.answer_column, str) or not self.answer_column.strip()
        ):
            raise ValueError(
                f"NTLConfig.answer_column must be a non-empty column name or None, got {self.answer_column!r}"
            )
        if self.needs_answers and self.answer_column is None:
            what = (
                "ntl_labels='final_answer'"
                if self.ntl_labels == "final_answer"
                else "ntl_labels='all' with correct_only=True"
            )
            raise ValueError(
                f"NTLConfig: {what} needs the ground truth: set answer_column to the dataset column "
                "holding it (or use ntl_labels='all', correct_only=False)"
            )
        t = self.temperature
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
        ):
            raise ValueError(f"NTLConfig.temperature must be a positive number or None, got {t!r}")

    @property
    def needs_answers(self) -> bool:
        """Whether the targets need the dataset's ground-truth answers."""
        return self.ntl_labels == "final_answer" or self.correct_only


@dataclass
class NTLSFTConfig:
    """Options of :class:`ntl_trl.supervised.NTLSFTMixin` (``NTLSFTTrainer``, ``NTLTrainer``),
    validated on construction.

    The trainer's loss becomes ``CE + ntl_weight * NTL(method)`` with NTL the mean over the
    supervised positions (labels not ``-100``, after the causal shift) whose label is a
    number token of the model's whole number vocabulary (Llama-3's ``'123'`` included), taken over the whole gradient-accumulation window and all processes.

    Attributes:
        ntl_weight: weight of the NTL term (``>= 0``; default ``0.3``, the paper's SFT
            recipe; ``0`` logs the metrics and leaves the update bit-identical to the
            plain trainer).
        ntl_method: a registered :mod:`ntl.methods` name: ``"wasserstein"`` (NTL-W1, alias
            ``"w1"``), ``"mse"`` (NTL-MSE), ``"mae"``, ``"huber"`` (delta 1), ``"del"`` (the
            Digit Entropy Loss, with place weights), ``"dist2"`` (DIST², tau 1); or a method
            object carrying its parameters: ``ntl.methods.DEL(place_weights=False)``,
            ``ntl.methods.DIST2(tau=2.0)``, ``ntl.methods.Huber(delta=2.0)``,
            ``ntl.methods.W1(squash_factor=3.0)``. DEL's place weights follow the numbers of
            the scored tokens (the labels, with its ``'.'`` as the decimal
            point: the tokenizer's ``'.'`` unless the object names one).

    ``ntloss``'s ``reweigh`` (weighting each position by its number-token probability mass
    over the full vocabulary) is not offered: it needs every position's full-vocabulary
    log-sum-exp, which neither TRL's fused LM head nor the number-token logits from hidden states
    provide.
    """

    ntl_weight: float = 0.3
    ntl_method: str | Method = "wasserstein"

    def __post_init__(self) -> None:
        self.ntl_weight = check_ntl_weight(self.ntl_weight, "NTLSFTConfig.ntl_weight")
        self.ntl_method = check_method(self.ntl_method, "NTLSFTConfig.ntl_method")
