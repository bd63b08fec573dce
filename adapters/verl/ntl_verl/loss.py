"""The NTL term of the actor loss (verl 0.9 engine path).

``loss = policy_loss + ntl_weight * NTL`` where, per micro-batch,

    NTL_mb = dp_size * sum_{i in digits of the micro-batch} NTL_i / N_digits(global mini-batch)

so that, after verl's FSDP gradient averaging over data-parallel ranks and its
sum over micro-batches, the gradient is that of the mean NTL over every digit
target of the mini-batch (the same normalisation verl's ``ppo_loss`` uses with
``batch_num_tokens``). ``NTL_i`` is ``ntl.ntl_loss`` (``mse``: ``(sum_k q_k v_k - y)^2``;
``wasserstein``: ``sum_k q_k |v_k - y|``) on the digit logits that predict response
token ``i`` (captured by the engine in the same forward as the log-probs, already
divided by the sampling temperature). ``N_digits`` comes from the engine
(``ntl_batch_num_digits``); without it the micro-batch's own count is used.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

import ntl
from ntl.metrics import digit_stats

from .batch import DIGIT_LOGITS_KEY, TARGETS_KEY, has_key, pad_responses, response_mask_padded
from .settings import IGNORE_INDEX, NTLSettings

__all__ = ["NTLLossFn", "ntl_loss_from_digit_logits", "ntl_ppo_loss", "vocab_for_model"]

logger = logging.getLogger("ntl")

NUM_DIGITS_KEY = "ntl_batch_num_digits"
#: Per-response digit bonus ``[B, 1]`` returned by the old-log-prob pass (logged as ``ntl/reward``).
BONUS_KEY = "ntl_bonus"


def vocab_for_model(model_config: Any) -> ntl.DigitVocab:
    """The digit vocab of verl's ``HFModelConfig`` (its tokenizer; ``V`` = the model's vocab size)."""
    tok = getattr(model_config, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "NTL needs the model's tokenizer to find the digit tokens, but model_config.tokenizer "
            "is None (actor_rollout_ref.model.load_tokenizer must stay true)"
        )
    hf = getattr(model_config, "hf_config", None)
    V = getattr(hf, "vocab_size", None)
    return ntl.DigitVocab.from_tokenizer(tok, vocab_size=V)


def ntl_loss_from_digit_logits(
    digit_logits: torch.Tensor,
    targets: torch.Tensor,
    vocab: ntl.NumberVocab,
    method: str,
    reduction: str = "sum",
) -> torch.Tensor:
    """``ntl.ntl_loss_from_digit_logits`` on digit logits ``[..., K]`` (columns in ``vocab``
    value order) against target **token ids** ``targets[...]`` (-100 / non-digits ignored)."""
    return ntl.ntl_loss_from_digit_logits(digit_logits, targets, vocab, method=method,
                                          ignore_index=IGNORE_INDEX, reduction=reduction)


def _non_tensor(data: Any, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


class NTLLossFn:
    """A verl loss function ``(model_output, data, dp_group) -> (loss, metrics)`` that adds
    ``ntl_weight * NTL_mb`` (module docstring) to ``base``'s loss and the NTL metrics
    ``ntl/loss``, ``ntl/digit_accuracy``, ``ntl/total_digits``, ``ntl/confidence``,
    ``ntl/target_prob`` to its metrics (and ``ntl/reward``, the mean digit bonus, when the
    batch carries it). ``ntl_weight == 0`` returns ``base``'s loss object
    unchanged (metrics still logged).
    """

    ntl_included = True

    def __init__(self, base: Any, settings: NTLSettings, vocab: ntl.NumberVocab | None) -> None:
        self.base = base
        self.settings = settings
        self.vocab = vocab

    def __call__(self, model_output: dict, data: Any, dp_group: Any = None) -> tuple[torch.Tensor, dict]:
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.padding import no_padding_2_padding

        loss, metrics = self.base(model_output=model_output, data=data, dp_group=dp_group)
        if has_key(data, BONUS_KEY):  # per-response digit bonus from the old-log-prob pass
            bonus = data[BONUS_KEY]
            metrics["ntl/reward"] = Metric(value=float(bonus.float().mean()), aggregation=AggregationType.MEAN)
        if not self.settings.ntl_enabled:
            return loss, metrics
        if DIGIT_LOGITS_KEY not in model_output:
            raise RuntimeError(
                "NTL is enabled but the model output has no digit logits: the actor engine is not "
                "the NTL engine (import ntl_verl.config / set actor_rollout_ref.actor._target_="
                "ntl_verl.config.NTLActorConfig)"
            )
        if not has_key(data, TARGETS_KEY):
            raise RuntimeError(f"NTL is enabled but the batch has no '{TARGETS_KEY}'")
        z = no_padding_2_padding(model_output[DIGIT_LOGITS_KEY], data)  # [B, R, K]
        R = z.shape[1]
        targets = pad_responses(data[TARGETS_KEY], R, IGNORE_INDEX).to(z.device)
        mask = response_mask_padded(data["response_mask"], R).to(z.device)
        targets = targets.masked_fill(~mask, IGNORE_INDEX)

        stats = digit_stats(z.detach(), targets, self.vocab, method=self.settings.ntl_method)
        values = stats.to_dict("ntl/")
        mean = AggregationType.MEAN
        metrics.update({
            "ntl/loss": Metric(value=values["ntl/loss"], aggregation=mean),
            "ntl/digit_accuracy": Metric(value=values["ntl/digit_accuracy"], aggregation=mean),
            "ntl/total_digits": Metric(value=values["ntl/total_digits"], aggregation=AggregationType.SUM),
            "ntl/confidence": Metric(value=values["ntl/confidence"], aggregation=mean),
            "ntl/target_prob": Metric(value=values["ntl/target_prob"], aggregation=mean),
        })
        w = float(self.settings.ntl_weight)
        if w == 0.0:
            return loss, metrics
        total = ntl_loss_from_digit_logits(z, targets, self.vocab, self.settings.ntl_method, "sum")
        n = _non_tensor(data, NUM_DIGITS_KEY, None)
        dp_size = _non_tensor(data, "dp_size", 1) if n is not None else 1
        if n is None:
            n = values["ntl/total_digits"]
        ntl_mb = total * (float(dp_size) / max(float(n), 1.0))
        return loss + w * ntl_mb, metrics


def ntl_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None) -> tuple[torch.Tensor, dict]:
    """verl's ``ppo_loss`` plus ``config.ntl_weight * NTL`` (an :class:`NTLActorConfig`).

    Usable with ``worker.set_loss_fn(functools.partial(ntl_ppo_loss, config=cfg))``; the
    NTL engine installs the same thing automatically for an ``NTLActorConfig`` actor.
    """
    from verl.workers.utils.losses import ppo_loss

    fn = NTLLossFn(
        lambda model_output, data, dp_group: ppo_loss(config, model_output, data, dp_group),
        config.ntl_settings,
        vocab_for_model(config.model_config),
    )
    return fn(model_output, data, dp_group)


ntl_ppo_loss.ntl_included = True  # type: ignore[attr-defined]
