"""TRL reward functions (``fn(completions, **kwargs) -> list[float]``) from :mod:`ntl.rewards`.

TRL calls every reward function with the completions and each dataset column as a
keyword argument (one value per completion). The scoring lives in :mod:`ntl.rewards`;
this module re-exports it and adds :func:`reward_with_answer_column` for datasets whose
ground truth sits under another (or a nested, dotted) column.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from ntl.rewards import correctness_reward, make_ntl_reward, proximity_reward

from ._common import lookup_column

__all__ = [
    "correctness_reward",
    "make_ntl_reward",
    "proximity_reward",
    "reward_with_answer_column",
]


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
        kwargs = {k: v for k, v in kwargs.items() if k not in ("ground_truth", "answer", "solution",
                                                              "reward_model")}
        return fn(completions, ground_truth=truths, **kwargs)

    return wrapped
