"""Rule-based and NTL-aware reward scoring for math RL (no framework import).

Notation: ``c`` = correctness, ``1`` when the extracted final answer
(:func:`ntl.rl.answers.extract_answer`) equals the ground truth numerically
(:func:`ntl.rl.answers.answers_equal`), else ``0``. ``a`` = text digit agreement in
``[0, 1]`` (:func:`ntl.rl.answers.digit_agreement`: fraction of matching positions on a
common place-value grid, plus a sign position when either number is negative).

**Digit probabilities** (optional, argument ``digit_probs``): per digit ``i`` of the
covered digits (the final-answer digits for ``final_answer``, every digit token for
``all``), ``target_prob_i = q_i(target digit)``, ``max_prob_i = max_k q_ik`` and
``correct_i = [argmax_k q_ik == target digit]``. Accepted formats:

* a mapping with 1-D equal-length sequences (lists, numpy arrays or tensors) under
  ``"target_prob"`` and ``"max_prob"``, plus either ``"correct"`` or both
  ``"pred_digit"`` and ``"target_digit"``; an optional boolean ``"mask"`` selects
  entries;
* a :class:`ntl.rl.metrics.DigitProbs` (e.g. one row of :func:`ntl.rl.metrics.digit_probs`;
  its ``mask`` selects the digits).

Probabilities must lie in ``[0, 1]`` (``ValueError`` otherwise). With ``n = 0``
covered digits a probability bonus is ``0.0``.

**Bonuses** (each in ``[0, 1]``):

* ``final_answer``: ``0.4 * mean_i correct_i + 0.3 * mean_i max_prob_i +
  0.3 * mean_i target_prob_i``. Without probabilities: ``a`` (text digit agreement;
  ``0`` when no answer was extracted).
* ``all``: ``c * (0.4 * mean_i correct_i + 0.3 * mean_i max_prob_i + 0.3 * mean_i
  target_prob_i)`` over every digit token (targets are the sampled digits, as in the
  ``all`` NTL mode). Without probabilities: ``c`` (what a policy that is sure of each
  sampled digit would get).
* ``proximity`` (text only, ignores probabilities):
  ``exp(-|pred - truth| / max(1, |truth|))``; ``0`` when no answer was extracted,
  ``1`` iff ``pred == truth``.

**Scores:** :func:`compute_score`: ``score = c + w * bonus`` with
``w = ntl_bonus_weight >= 0`` (``bonus = 0`` unless ``use_ntl_bonus``), so
``score in [0, 1 + w]``, and exactly ``c`` by default.
:func:`compute_score_ntl_enhanced`: ``score = 0.6 c + 0.25 a + 0.15 p`` in ``[0, 1]``
with ``p = mean_i target_prob_i`` over the final-answer digits, or ``p = a`` without
probabilities.

The TRL reward functions (``correctness_reward``, ``proximity_reward``, ``make_ntl_reward``,
``completion_text``, ``TRUTH_COLUMNS``) live in :mod:`ntl_trl.rewards` and verl's
``scatter_to_last_token`` in :mod:`ntl_verl.batch`; both remain importable from here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .._docs import shared_docs
from .answers import (
    Answer,
    answers_equal,
    digit_agreement,
    extract_answer,
    parse_ground_truth,
)
from .metrics import DigitProbs

__all__ = [
    "BONUS_TYPES",
    "compute_ntl_bonus_all",
    "compute_ntl_bonus_final_answer",
    "compute_score",
    "compute_score_ntl_enhanced",
    "ntl_bonus_from_digit_probs",
    "proximity",
]

logger: logging.Logger = logging.getLogger("ntl")

BONUS_TYPES = ("final_answer", "all", "proximity")
W_ACC, W_CONF, W_PROB = 0.4, 0.3, 0.3
W_CORRECT, W_AGREE, W_QUALITY = 0.6, 0.25, 0.15


# ----------------------------------------------------------------------------- helpers
def _to_list(name: str, v: Any) -> list[float]:
    if isinstance(v, torch.Tensor):
        v = v.detach().reshape(-1).cpu().tolist()
    elif hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
        v = v.tolist()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"digit_probs[{name!r}] must be a 1-D sequence, got {type(v).__name__}")
    return [float(x) for x in v]


def _digit_prob_table(digit_probs: Any) -> tuple[list[float], list[float], list[float]]:
    """``(correct, max_prob, target_prob)`` lists from a documented digit_probs format."""
    if isinstance(digit_probs, DigitProbs):
        d: Mapping[str, Any] = {
            "target_prob": digit_probs.target_prob, "max_prob": digit_probs.max_prob,
            "correct": digit_probs.correct, "mask": digit_probs.mask,
        }
    elif isinstance(digit_probs, Mapping):
        d = digit_probs
    else:
        raise TypeError(
            "digit_probs must be a mapping with 'target_prob', 'max_prob' and 'correct' (or "
            f"'pred_digit' + 'target_digit'), or an ntl.rl.metrics.DigitProbs; got {type(digit_probs).__name__}"
        )
    missing = [k for k in ("target_prob", "max_prob") if k not in d]
    if missing:
        raise ValueError(f"digit_probs lacks {missing}; it has {sorted(d)}")
    tp = _to_list("target_prob", d["target_prob"])
    mp = _to_list("max_prob", d["max_prob"])
    if "correct" in d:
        corr = _to_list("correct", d["correct"])
    elif "pred_digit" in d and "target_digit" in d:
        pd_, td = _to_list("pred_digit", d["pred_digit"]), _to_list("target_digit", d["target_digit"])
        if len(pd_) != len(td):
            raise ValueError(f"digit_probs: pred_digit has {len(pd_)} entries, target_digit {len(td)}")
        corr = [float(p == t) for p, t in zip(pd_, td, strict=True)]
    else:
        raise ValueError("digit_probs needs 'correct' or both 'pred_digit' and 'target_digit'")
    if not len(tp) == len(mp) == len(corr):
        raise ValueError(
            f"digit_probs entries differ in length: target_prob {len(tp)}, max_prob {len(mp)}, "
            f"correct {len(corr)}"
        )
    if d.get("mask") is not None:
        mask = _to_list("mask", d["mask"])
        if len(mask) != len(tp):
            raise ValueError(f"digit_probs: mask has {len(mask)} entries, target_prob {len(tp)}")
        keep = [i for i, m in enumerate(mask) if m]
        tp, mp, corr = ([v[i] for i in keep] for v in (tp, mp, corr))
    for name, vals in (("target_prob", tp), ("max_prob", mp)):
        bad = [x for x in vals if not 0.0 <= x <= 1.0]  # also catches NaN
        if bad:
            raise ValueError(f"digit_probs[{name!r}] must lie in [0, 1], got {bad[0]!r}")
    return corr, mp, tp


def _prob_bonus(digit_probs: Any) -> float:
    corr, mp, tp = _digit_prob_table(digit_probs)
    n = len(tp)
    if n == 0:
        return 0.0
    acc = sum(1.0 for c in corr if c) / n
    return W_ACC * acc + W_CONF * sum(mp) / n + W_PROB * sum(tp) / n


def _pred(pred: str | Answer | None) -> Answer | None:
    if pred is None or isinstance(pred, Answer):
        return pred
    if not isinstance(pred, str):
        raise TypeError(f"pred must be a str, an Answer or None, got {type(pred).__name__}")
    return extract_answer(pred, flexible=True) if pred.strip() else None


# ----------------------------------------------------------------------------- bonuses
@shared_docs
def proximity(pred: str | Answer | None, ground_truth: str | int | float | Answer) -> float:
    """Text-only partial credit ``exp(-|pred - truth| / max(1, |truth|))`` in ``[0, 1]``.

    Args:
        pred: the prediction (see above).
        {ground_truth}

    Returns:
        The credit in ``[0, 1]``.

    Raises:
        TypeError: a ``pred`` that is not a str, an :class:`~ntl.rl.answers.Answer` or ``None``.
        ValueError: a ground truth that is not a number.

    Example:
        >>> from ntl.rl.rewards import proximity
        >>> proximity("The answer is 42", "42"), round(proximity("40", "42"), 4)
        (1.0, 0.9535)
        >>> proximity(None, 42)
        0.0
    """
    truth = parse_ground_truth(ground_truth)
    p = _pred(pred)
    if p is None:
        return 0.0
    t = float(truth.value)
    diff = abs(float(p.value) - t)
    if not math.isfinite(diff):
        return 0.0
    return math.exp(-diff / max(1.0, abs(t)))


@shared_docs
def compute_ntl_bonus_final_answer(
    digit_probs: Any = None,
    *,
    pred: str | Answer | None = None,
    ground_truth: str | int | float | Answer | None = None,
) -> float:
    """Final-answer NTL bonus in ``[0, 1]``.

    With ``digit_probs`` over the final-answer digits:
    ``0.4 * mean correct_i + 0.3 * mean max_prob_i + 0.3 * mean target_prob_i``
    (``0.0`` for zero digits). Without: the text digit agreement
    ``a = digit_agreement(pred, ground_truth)`` (``0.0`` when ``pred`` is None), which
    needs ``ground_truth``.

    Args:
        {digit_probs}
        pred: the prediction (an :class:`~ntl.rl.answers.Answer`, a response whose last number is
            read, or ``None``), for the text fallback.
        {ground_truth} Needed for the text fallback.

    Returns:
        The bonus in ``[0, 1]``.

    Raises:
        ValueError: neither ``digit_probs`` nor ``ground_truth``; malformed ``digit_probs``.

    Example:
        >>> from ntl.rl.rewards import compute_ntl_bonus_final_answer
        >>> probs = {"target_prob": [0.9, 0.5], "max_prob": [0.9, 0.7], "correct": [True, False]}
        >>> round(compute_ntl_bonus_final_answer(probs), 4)  # 0.4 * 0.5 + 0.3 * 0.8 + 0.3 * 0.7
        0.65
        >>> compute_ntl_bonus_final_answer(pred="15", ground_truth="5")  # grid 15 / 05
        0.5
    """
    if digit_probs is not None:
        return _prob_bonus(digit_probs)
    if ground_truth is None:
        raise ValueError(
            "compute_ntl_bonus_final_answer needs digit_probs, or ground_truth (and pred) for "
            "its text fallback"
        )
    return digit_agreement(_pred(pred), parse_ground_truth(ground_truth))


@shared_docs
def compute_ntl_bonus_all(digit_probs: Any = None, *, correct: bool | None = None) -> float:
    """All-digit NTL bonus in ``[0, 1]``.

    With ``digit_probs`` over every digit token (targets = the sampled digits):
    ``g * (0.4 * mean correct_i + 0.3 * mean max_prob_i + 0.3 * mean target_prob_i)``
    with ``g = correct`` (the response's answer is right; ``g = 1`` when ``correct`` is
    None). Without ``digit_probs``: ``float(correct)``, which is then required.

    Args:
        {digit_probs}
        correct: whether the response's answer is right (the gate ``g``).

    Returns:
        The bonus in ``[0, 1]``.

    Raises:
        ValueError: neither ``digit_probs`` nor ``correct``; malformed ``digit_probs``.

    Example:
        >>> from ntl.rl.rewards import compute_ntl_bonus_all
        >>> probs = {"target_prob": [1.0], "max_prob": [1.0], "correct": [True]}
        >>> compute_ntl_bonus_all(probs, correct=True), compute_ntl_bonus_all(probs, correct=False)
        (1.0, 0.0)
    """
    if digit_probs is None:
        if correct is None:
            raise ValueError("compute_ntl_bonus_all needs digit_probs or correct=")
        return float(bool(correct))
    gate = 1.0 if correct is None else float(bool(correct))
    return gate * _prob_bonus(digit_probs) if gate else 0.0


def _check_weight(w: Any) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"ntl_bonus_weight must be a finite number >= 0, got {w!r}")
    return float(w)


# ----------------------------------------------------------------------------- verl
@shared_docs
def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: str | int | float,
    extra_info: Any = None,
    *,
    use_ntl_bonus: bool = False,
    ntl_bonus_type: str = "final_answer",
    ntl_bonus_weight: float = 0.1,
    digit_probs: Any = None,
    flexible: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl reward function: ``score = c + ntl_bonus_weight * bonus`` (module docstring).

    ``data_source``/``extra_info`` are accepted for verl and unused; other keyword
    arguments are ignored. A ground truth that is not a number raises ``ValueError``.
    Use with verl: point ``custom_reward_function.path`` at a file containing
    ``from ntl.rewards import compute_score`` (verl loads that file by path, so this
    package module itself cannot be the path), ``custom_reward_function.name=compute_score``,
    options under ``custom_reward_function.reward_kwargs``.

    Args:
        {data_source}
        {solution_str}
        {ground_truth}
        {extra_info}
        use_ntl_bonus: add the bonus.
        ntl_bonus_type: one of :data:`BONUS_TYPES` (``"final_answer"``, ``"all"``,
            ``"proximity"``).
        ntl_bonus_weight: ``w >= 0``.
        {digit_probs}
        {flexible}
        {kwargs}

    Returns:
        ``{"score": float, "acc": bool, "pred": str ("" when no answer), "ntl_bonus": float}``
        (``ntl_bonus`` is ``0.0`` unless ``use_ntl_bonus``).

    Raises:
        ValueError: a ground truth that is not a number, an unknown ``ntl_bonus_type``, a
            negative or non-finite ``ntl_bonus_weight``.
        TypeError: ``solution_str`` not a str.

    Example:
        >>> from ntl.rl.rewards import compute_score
        >>> compute_score("gsm8k", "3 + 4 = 7. #### 7", "7")
        {'score': 1.0, 'acc': True, 'pred': '7', 'ntl_bonus': 0.0}
        >>> compute_score("gsm8k", "#### 15", "5", use_ntl_bonus=True, ntl_bonus_weight=0.2)
        {'score': 0.1, 'acc': False, 'pred': '15', 'ntl_bonus': 0.5}
    """
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a str, got {type(solution_str).__name__}")
    if ntl_bonus_type not in BONUS_TYPES:
        raise ValueError(f"ntl_bonus_type must be one of {list(BONUS_TYPES)}, got {ntl_bonus_type!r}")
    w = _check_weight(ntl_bonus_weight)
    if kwargs:
        logger.debug("compute_score: ignoring options %s", sorted(kwargs))
    truth = parse_ground_truth(ground_truth)
    pred = extract_answer(solution_str, flexible=flexible)
    acc = pred is not None and answers_equal(pred, truth)
    bonus = 0.0
    if use_ntl_bonus:
        if ntl_bonus_type == "final_answer":
            bonus = compute_ntl_bonus_final_answer(digit_probs, pred=pred, ground_truth=truth)
        elif ntl_bonus_type == "all":
            bonus = compute_ntl_bonus_all(digit_probs, correct=acc)
        else:
            bonus = proximity(pred, truth)
    return {
        "score": float(acc) + w * bonus,
        "acc": bool(acc),
        "pred": pred.text if pred is not None else "",
        "ntl_bonus": float(bonus),
    }


@shared_docs
def compute_score_ntl_enhanced(
    data_source: Any,
    solution_str: str,
    ground_truth: str | int | float,
    extra_info: Any = None,
    *,
    digit_probs: Any = None,
    flexible: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """``score = 0.6 c + 0.25 a + 0.15 p`` in ``[0, 1]``.

    ``c`` correctness, ``a`` text digit agreement, ``p`` probability quality: mean
    ``target_prob`` over the final-answer digits in ``digit_probs`` (``0.0`` for zero

    Args:
        {data_source}
        {solution_str}
        {ground_truth}
        {extra_info}
        {digit_probs}
        {flexible}
        {kwargs}

    Returns:
        ``{"score", "acc", "pred", "ntl_bonus", "digit_agreement", "prob_quality"}``.

    Raises:
        ValueError: a ground truth that is not a number; malformed ``digit_probs``.
        TypeError: ``solution_str`` not a str.

    Example:
        >>> from ntl.rl.rewards import compute_score_ntl_enhanced
        >>> r = compute_score_ntl_enhanced(None, "#### 15", "5")  # c = 0, a = p = 0.5
        >>> r["score"], r["digit_agreement"]
        (0.2, 0.5)
    """
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a str, got {type(solution_str).__name__}")
    truth = parse_ground_truth(ground_truth)
    pred = extract_answer(solution_str, flexible=flexible)
    c = float(pred is not None and answers_equal(pred, truth))
    a = digit_agreement(pred, truth)
    if digit_probs is None:
        p = a
    else:
        _, _, tp = _digit_prob_table(digit_probs)
        p = sum(tp) / len(tp) if tp else 0.0
    bonus = W_AGREE * a + W_QUALITY * p
    return {
        "score": W_CORRECT * c + bonus,
        "acc": bool(c),
        "pred": pred.text if pred is not None else "",
        "ntl_bonus": bonus,
        "digit_agreement": a,
        "prob_quality": p,
    }


# ----------------------------------------------------------------------------- batched
def ntl_bonus_from_digit_probs(
    target_prob: torch.Tensor | DigitProbs,
    max_prob: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    gate: torch.Tensor | None = None,
    weights: tuple[float, float, float] = (W_ACC, W_CONF, W_PROB),
) -> torch.Tensor:
    """Per-sample probability bonus over the last dim, vectorised (no host sync).

    ``bonus_b = g_b * (w0 * mean_t correct_bt + w1 * mean_t max_prob_bt +
    w2 * mean_t target_prob_bt)``, means over ``t`` with ``mask_bt`` (``0`` for a row
    with no masked position), ``g = gate`` (e.g. the response is correct, for the
    ``all`` bonus; default 1).
    With masks from ``build_digit_targets(mode="final_answer")`` this is the
    ``final_answer`` bonus of every response at once.

    Args:
        target_prob: ``[..., T]`` fp32 target probabilities, or a
            :class:`~ntl.rl.metrics.DigitProbs` (then leave the next three ``None``).
        max_prob: ``[..., T]`` top probabilities.
        correct: ``[..., T]`` bool, argmax equals the target.
        mask: ``[..., T]`` bool, the covered digits.
        gate: optional ``[...]`` per-sample gate ``g``.
        weights: ``(w0, w1, w2)`` of accuracy, confidence and target probability.

    Returns:
        fp32 ``[...]`` bonuses.

    Raises:
        ValueError: a missing input, shapes that differ, a ``gate`` of the wrong shape.
        TypeError: an input that is not a tensor.

    Example:
        >>> import torch
        >>> from ntl.rl.rewards import ntl_bonus_from_digit_probs
        >>> tp = torch.tensor([[0.9, 0.5], [1.0, 0.0]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> ntl_bonus_from_digit_probs(tp, tp, tp > 0.8, mask)
        tensor([0.6200, 1.0000])
    """
    if isinstance(target_prob, DigitProbs):
        dp = target_prob
        target_prob, max_prob = dp.target_prob, dp.max_prob
        correct = dp.correct if correct is None else correct
        mask = dp.mask if mask is None else mask
    if max_prob is None or correct is None or mask is None:
        raise ValueError("ntl_bonus_from_digit_probs needs target_prob, max_prob, correct and mask")
    for name, t in (("target_prob", target_prob), ("max_prob", max_prob), ("correct", correct), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != target_prob.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != target_prob shape {tuple(target_prob.shape)}")
    m = mask.bool()
    zero = torch.zeros((), device=target_prob.device)
    n = m.float().sum(-1)

    def msum(v: torch.Tensor) -> torch.Tensor:
        return torch.where(m, v.float(), zero).sum(-1)

    w0, w1, w2 = (float(x) for x in weights)
    bonus = (w0 * msum(correct) + w1 * msum(max_prob) + w2 * msum(target_prob)) / n.clamp_min(1.0)
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or gate.shape != bonus.shape:
            raise ValueError(f"gate must be a tensor of shape {tuple(bonus.shape)}")
        bonus = bonus * gate.float()
    return bonus


# ----------------------------------------------------------------------------- moved
# Functions with a framework's signature live in its adapter; these names stay importable from
# here (and from ntl.rewards, this module) and are the adapter's own objects.
if TYPE_CHECKING:  # the moved framework signatures (handed out by ntl.rl.rewards.__getattr__)
    from ntl_trl.rewards import TRUTH_COLUMNS as TRUTH_COLUMNS
    from ntl_trl.rewards import completion_text as completion_text
    from ntl_trl.rewards import correctness_reward as correctness_reward
    from ntl_trl.rewards import make_ntl_reward as make_ntl_reward
    from ntl_trl.rewards import proximity_reward as proximity_reward
    from ntl_verl.batch import scatter_to_last_token as scatter_to_last_token

_MOVED = {
    "TRUTH_COLUMNS": "ntl_trl.rewards",
    "completion_text": "ntl_trl.rewards",
    "correctness_reward": "ntl_trl.rewards",
    "make_ntl_reward": "ntl_trl.rewards",
    "proximity_reward": "ntl_trl.rewards",
    "scatter_to_last_token": "ntl_verl.batch",
}


def __getattr__(name: str) -> Any:
    """The moved names (``_MOVED``), imported from their adapter on first use (PEP 562)."""
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(where), name)
