"""TRL reward functions (``fn(completions, **kwargs) -> list[float]``).

TRL calls every reward function with the completions and each dataset column as a keyword
argument (one value per completion). The scoring they call lives in :mod:`ntl.rl.rewards`
(:func:`~ntl.rl.rewards.compute_score`, :func:`~ntl.rl.rewards.proximity`, ...); this module
holds the TRL signatures: :func:`correctness_reward`, :func:`proximity_reward`,
:func:`make_ntl_reward`, and :func:`reward_with_answer_column` for datasets whose ground truth
sits under another (or a nested, dotted) column. They moved here from ``ntl.rewards``, which
still hands them out (the same objects).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ntl.rl.answers import answers_equal, extract_answer, parse_ground_truth
from ntl.rl.rewards import compute_score, compute_score_ntl_enhanced, proximity

from ._common import lookup_column

__all__ = [
    "TRUTH_COLUMNS",
    "completion_text",
    "correctness_reward",
    "make_ntl_reward",
    "proximity_reward",
    "reward_with_answer_column",
]

#: Dataset columns read (in this order) as the ground truth by the reward functions.
TRUTH_COLUMNS = ("ground_truth", "answer", "solution", "reward_model")


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a conversational list of
    ``{"role", "content"}`` messages (the contents of the assistant messages are
    joined; all messages when none has role ``assistant``). ``content`` may be a
    string or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if not isinstance(completion, Sequence):
        raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")
    msgs = [m for m in completion if isinstance(m, Mapping)]
    if len(msgs) != len(completion):
        raise TypeError("a conversational completion must be a list of {'role', 'content'} dicts")
    chosen = [m for m in msgs if m.get("role") == "assistant"] or msgs

    def text(c: Any) -> str:
        if c is None:
            return ""
        if isinstance(c, str):
            return c
        if isinstance(c, Sequence):
            return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in c)
        return str(c)

    return "\n".join(text(m.get("content")) for m in chosen)


def _truths(kwargs: Mapping[str, Any], n: int) -> list[Any]:
    for col in TRUTH_COLUMNS:
        if col in kwargs and kwargs[col] is not None:
            vals = list(kwargs[col])
            if col == "reward_model":
                vals = [v["ground_truth"] if isinstance(v, Mapping) else v for v in vals]
            if len(vals) != n:
                raise ValueError(f"column {col!r} has {len(vals)} entries for {n} completions")
            return vals
    raise ValueError(
        f"no ground-truth column among the reward kwargs {sorted(kwargs)}; the dataset needs one "
        f"of {list(TRUTH_COLUMNS)} (a number, or a solution ending in '#### N')"
    )


def correctness_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward: ``1.0`` when a completion's final answer equals its ground truth, else ``0.0``.

    The ground truth comes from the first dataset column present among
    ``ground_truth``, ``answer`` (GSM8K's full solution ending in ``#### N`` works),
    ``solution`` and ``reward_model`` (verl parquet: ``{"ground_truth": ...}``).
    """
    truths = _truths(kwargs, len(completions))
    out = []
    for c, t in zip(completions, truths, strict=True):
        pred = extract_answer(completion_text(c))
        out.append(float(pred is not None and answers_equal(pred, parse_ground_truth(t))))
    return out


def proximity_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward: :func:`proximity` of each completion's final answer, in ``[0, 1]``
    (ground-truth columns as for :func:`correctness_reward`)."""
    truths = _truths(kwargs, len(completions))
    return [
        proximity(extract_answer(completion_text(c)), t)
        for c, t in zip(completions, truths, strict=True)
    ]


def make_ntl_reward(
    kind: str = "score", *, name: str | None = None, **score_kwargs: Any
) -> Callable[..., list[float]]:
    """A TRL reward function ``fn(completions, **kwargs) -> list[float]``.

    ``kind``: ``"correctness"``, ``"proximity"``, ``"score"`` (:func:`compute_score`'s
    ``score`` with ``score_kwargs``, e.g. ``use_ntl_bonus=True, ntl_bonus_type="proximity"``)
    or ``"enhanced"`` (:func:`compute_score_ntl_enhanced`). ``name`` sets ``__name__``
    (TRL logs rewards under it).
    """
    kinds = ("correctness", "proximity", "score", "enhanced")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {list(kinds)}, got {kind!r}")
    if kind in ("correctness", "proximity") and score_kwargs:
        raise ValueError(f"kind={kind!r} takes no options, got {sorted(score_kwargs)}")
    if kind == "score":  # validate the options once, now
        compute_score("", "", "0", **score_kwargs)
    scorer = compute_score if kind == "score" else compute_score_ntl_enhanced

    def fn(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if kind == "correctness":
            return correctness_reward(completions, **kwargs)
        if kind == "proximity":
            return proximity_reward(completions, **kwargs)
        truths = _truths(kwargs, len(completions))
        return [
            float(scorer(None, completion_text(c), t, **score_kwargs)["score"])
            for c, t in zip(completions, truths, strict=True)
        ]

    fn.__name__ = name or f"ntl_{kind}_reward"
    fn.__qualname__ = fn.__name__
    return fn


def reward_with_answer_column(
    fn: Callable[..., list[float]], answer_column: str
) -> Callable[..., list[float]]:
    """Wrap a reward so that it reads the ground truth from ``answer_column``.

    ``answer_column`` may be dotted (``"reward_model.ground_truth"``: the ``reward_model``
    column's ``ground_truth`` field). The wrapped function receives it as ``ground_truth``.
    """
    if not isinstance(answer_column, str) or not answer_column:
        raise ValueError(f"answer_column must be a non-empty string, got {answer_column!r}")
    top, _, rest = answer_column.partition(".")

    @functools.wraps(fn)
    def wrapped(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if top not in kwargs:
            raise KeyError(
                f"answer_column={answer_column!r}: TRL passed no column {top!r} "
                f"(columns: {sorted(kwargs)})"
            )
        col = list(kwargs[top])
        truths = [lookup_column(v, rest) for v in col] if rest else col
        kwargs = {k: v for k, v in kwargs.items() if k not in TRUTH_COLUMNS}
        return fn(completions, ground_truth=truths, **kwargs)

    return wrapped
