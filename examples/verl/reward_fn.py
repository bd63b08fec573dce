"""Reward functions for the verl launchers (verl loads this file by path).

``compute_score``: correctness of the final answer, ``ntl.rewards.compute_score``
(score = 1 if the number after ``####`` (or in the last ``\\boxed{}``) equals the ground
truth, else 0). ``compute_score_proximity``: the same plus the text-only proximity bonus
``w * exp(-|pred - truth| / max(1, |truth|))``; select it with
``reward.custom_reward_function.name=compute_score_proximity`` (weight:
``+reward.custom_reward_function.reward_kwargs.ntl_bonus_weight=0.1``). The digit-aware
bonuses that need probabilities (final_answer / all) are added by the NTL actor instead
(``actor_rollout_ref.actor.ntl_bonus_type``), since verl's reward functions never see them.
"""

from ntl.rewards import compute_score


def compute_score_proximity(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """``ntl.rewards.compute_score`` with ``use_ntl_bonus=True, ntl_bonus_type="proximity"``."""
    kwargs.setdefault("ntl_bonus_weight", 0.1)
    return compute_score(
        data_source, solution_str, ground_truth, extra_info,
        use_ntl_bonus=True, ntl_bonus_type="proximity", **kwargs,
    )


__all__ = ["compute_score", "compute_score_proximity"]
