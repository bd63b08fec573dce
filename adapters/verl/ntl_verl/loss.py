"""The NTL term of the actor loss (verl 0.9 engine path), aggregated like verl's policy loss.

NTL runs over the model's whole number vocabulary (:func:`vocab_for_model`, i.e.
:func:`ntl.vocab_for_tokenizer`): the ``K = 10`` digits ``'0'..'9'`` of a digit-level tokenizer
(Qwen2.5), all ``K = 1,110`` number tokens ``'0'..'999'`` (values ``v_k = int(text)``) of Llama-3.
"Digit" in the names below (``digit logits``, ``ntl/total_digits``, ``ntl/digit_accuracy``) means
**number token**.

``loss = policy_loss + ntl_weight * L_NTL``. With ``l[b, t]`` the NTL of the number-token logits
that predict response token ``t`` of sequence ``b`` (``ntl.ntl_loss_from_digit_logits`` over the
``K`` columns, ``q = softmax(z / T)``; ``mse``: ``(sum_k q_k v_k - y)^2``, ``wasserstein``:
``sum_k q_k |v_k - y|``, ``y`` the target token's value; any registered method,
:attr:`ntl_verl.settings.NTLSettings.method`; DEL's place weights come from the targets'
numbers, with the response's ``'.'`` between two targets kept as the decimal point; captured by the engine in the same forward
as the log-probs, already divided by the sampling temperature ``T``) and ``d[b, t]`` the
number-token target mask, ``L_NTL`` is verl's ``agg_loss`` with ``actor.loss_agg_mode`` over the
**global mini-batch** (all micro-batches, all data-parallel ranks) with ``d`` as the loss mask and
the counts taken on ``d`` (:mod:`ntl.rl.normalization`): ``N`` number-token targets, ``S`` sequences with
at least one:

* ``token-mean``: ``sum d l / N``;  ``token-sum``: ``sum d l``;
* ``seq-mean-token-sum``: ``(1/S) sum_b sum_t d l``;
* ``seq-mean-token-mean``: ``(1/S) sum_{b: n_b > 0} (1/n_b) sum_t d l``;
* ``seq-mean-token-sum-norm``: ``(1/(S H)) sum_b sum_t d l``, ``H = actor.loss_scale_factor``, or, as
  verl does when it is unset, the micro-batch's padded response length.

Like verl's ``ppo_loss``, each micro-batch on each rank contributes
``dp_size * aggregate_loss(l_mb, d_mb, mode, num_tokens=N, num_sequences=S, horizon=H)``: verl's FSDP
averages gradients over the ``dp_size`` ranks and sums them over micro-batches, so the optimizer step
sees ``ntl_weight * grad L_NTL`` whatever the micro-batching. ``N`` and ``S`` come from the engine
(``ntl_batch_num_digits``, ``ntl_batch_num_sequences``, all-reduced over data parallel).

Metrics (verl sums ``SUM`` metrics over micro-batches and averages them over ranks): ``ntl/loss`` =
``L_NTL`` (what is optimised); ``ntl/digit_accuracy`` (argmax over the ``K`` number tokens equals
the target token), ``ntl/confidence``, ``ntl/target_prob`` = means over the mini-batch's ``N``
number-token targets; ``ntl/total_digits`` = ``N``, the number of number-token targets (Llama-3's
``'123' '4'`` counts 2); ``ntl/reward`` = the mean bonus over the mini-batch's responses.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

import ntl
from ntl.losses import bind_decimal_point
from ntl.methods import Method
from ntl.rl.metrics import digit_probs
from ntl.rl.normalization import aggregate_loss
from ntl.rl.targets import keep_decimal_points

from .batch import (
    DIGIT_LOGITS_KEY,
    TARGETS_KEY,
    check_targets_reachable,
    has_key,
    pad_responses,
    response_mask_padded,
)
from .settings import IGNORE_INDEX, NTLSettings

__all__ = [
    "NTLLossFn",
    "loss_method",
    "ntl_loss_from_digit_logits",
    "ntl_ppo_loss",
    "number_vocab",
    "target_modes",
    "vocab_for_model",
    "with_decimal_points",
]

logger = logging.getLogger("ntl")

#: Non-tensor keys the engine sets on the update batch: counts over the global mini-batch.
NUM_DIGITS_KEY = "ntl_batch_num_digits"
NUM_SEQUENCES_KEY = "ntl_batch_num_sequences"
NUM_RESPONSES_KEY = "ntl_batch_num_responses"
#: Per-response bonus ``[B, 1]`` (over the number tokens) returned by the old-log-prob pass (logged as ``ntl/reward``).
BONUS_KEY = "ntl_bonus"


def target_modes(settings: NTLSettings | None) -> tuple[str, ...]:
    """The target modes ``settings`` builds targets with: ``ntl_labels`` when the NTL loss is on,
    ``ntl_bonus_type`` when the digit bonus is on (none for ``None``)."""
    if settings is None:
        return ()
    modes = [settings.ntl_labels] if settings.ntl_enabled else []
    if settings.bonus_enabled and settings.ntl_bonus_type not in modes:
        modes.append(settings.ntl_bonus_type)
    return tuple(modes)


def number_vocab(tokenizer: Any, vocab_size: int | None, settings: NTLSettings | None = None) -> ntl.NumberVocab:
    """The model's whole number vocabulary, ``ntl.vocab_for_tokenizer(tokenizer, vocab_size=V)``
    (:class:`ntl.DigitVocab`, ``K = 10``, for a digit-level tokenizer; a :class:`ntl.NumberVocab` of
    every number token, ``K = 1,110`` for Llama-3), refused with a ``ValueError`` naming the reason
    when NTL could see no target with it: a tokenizer without number tokens, a model vocabulary
    ``V`` too small for them, or (given ``settings``) a tokenizer with which the targets of the
    modes ``settings`` uses cannot be built (:func:`ntl_verl.batch.check_targets_reachable`)."""
    if tokenizer is None:
        raise ValueError(
            "NTL needs the model's tokenizer to find the number tokens, but it is None "
            "(actor_rollout_ref.model.load_tokenizer must stay true)"
        )
    try:
        vocab = ntl.vocab_for_tokenizer(tokenizer, vocab_size=vocab_size)
    except ValueError as e:
        raise ValueError(
            f"NTL cannot run with this model: NTL needs number tokens (tokens whose text is an ASCII "
            f"digit string) in the model's tokenizer and vocabulary (V={vocab_size}), so it could see "
            f"no target: {e}"
        ) from e
    check_targets_reachable(tokenizer, vocab, target_modes(settings))
    return vocab


def vocab_for_model(model_config: Any, settings: NTLSettings | None = None) -> ntl.NumberVocab:
    """:func:`number_vocab` of verl's ``HFModelConfig``: its tokenizer, ``V`` = its
    ``hf_config.vocab_size`` (the model's, possibly padded, vocabulary), and the targets of
    ``settings``' modes checked (``ValueError`` when NTL could see no target)."""
    tok = getattr(model_config, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "NTL needs the model's tokenizer to find the number tokens, but model_config.tokenizer "
            "is None (actor_rollout_ref.model.load_tokenizer must stay true)"
        )
    hf = getattr(model_config, "hf_config", None)
    V = getattr(hf, "vocab_size", None)
    return number_vocab(tok, V, settings)


def loss_method(settings: NTLSettings, tokenizer: Any) -> Method:
    """``settings.method`` with the tokenizer's ``'.'`` as DEL's decimal point (``None``: none);
    ``ValueError`` for DEL's place weights with a multi-digit vocab of unknown token widths
    is the core's, at the first step."""
    return bind_decimal_point(settings.method, tokenizer) if tokenizer is not None else settings.method


def with_decimal_points(targets: torch.Tensor, responses: Any, vocab: ntl.NumberVocab,
                        method: Method) -> torch.Tensor:
    """``targets [B, R]`` with the response's ``'.'`` kept between two number targets when
    ``method`` has place weights (:func:`ntl.rl.targets.keep_decimal_points`), so DEL's place
    weights, read from the targets by the core, see an answer's decimals."""
    dot = method.decimal_point() if method.place_weighted else None
    if dot is None or responses is None:
        return targets
    resp = pad_responses(responses, targets.shape[1], IGNORE_INDEX).to(targets.device).long()
    return keep_decimal_points(targets, resp, vocab, dot, IGNORE_INDEX)


def ntl_loss_from_digit_logits(
    digit_logits: torch.Tensor,
    targets: torch.Tensor,
    vocab: ntl.NumberVocab,
    method: str | Method,
    reduction: str = "sum",
) -> torch.Tensor:
    """``ntl.ntl_loss_from_digit_logits`` on number-token logits ``[..., K]`` (columns in ``vocab``
    value order) against target **token ids** ``targets[...]`` (-100 / non-number tokens ignored)."""
    return ntl.ntl_loss_from_digit_logits(digit_logits, targets, vocab, method=method,
                                          ignore_index=IGNORE_INDEX, reduction=reduction)


def _non_tensor(data: Any, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


class NTLLossFn:
    """A verl loss function ``(model_output, data, dp_group) -> (loss, metrics)`` that adds
    ``ntl_weight * L_NTL`` (this micro-batch's share, module docstring) to ``base``'s loss and
    the NTL metrics to its metrics. ``ntl_weight == 0`` returns ``base``'s loss object unchanged
    (metrics still logged).
    """

    ntl_included = True

    def __init__(self, base: Any, settings: NTLSettings, vocab: ntl.NumberVocab | None,
                 tokenizer: Any = None) -> None:
        self.base = base
        self.settings = settings
        self.vocab = vocab
        self.method = loss_method(settings, tokenizer)  # tokenizer: DEL's decimal point

    def __call__(self, model_output: dict, data: Any, dp_group: Any = None) -> tuple[torch.Tensor, dict]:
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.padding import no_padding_2_padding

        loss, metrics = self.base(model_output=model_output, data=data, dp_group=dp_group)
        dp_size = float(_required(data, "dp_size"))
        SUM, MEAN = AggregationType.SUM, AggregationType.MEAN
        if has_key(data, BONUS_KEY):  # per-response digit bonus from the old-log-prob pass
            bonus = pad_responses(data[BONUS_KEY], None, 0.0)[:, :1].float()  # [B, 1], nested after TQ
            n_resp = max(float(_required(data, NUM_RESPONSES_KEY)), 1.0)
            metrics["ntl/reward"] = Metric(value=float(bonus.sum()) * dp_size / n_resp, aggregation=SUM)
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
        if self.vocab is None:
            raise RuntimeError("NTL is enabled but the loss has no number vocab")
        z = no_padding_2_padding(model_output[DIGIT_LOGITS_KEY], data)  # [B, R, K]
        R = z.shape[1]
        targets = pad_responses(data[TARGETS_KEY], R, IGNORE_INDEX).to(z.device)
        mask = response_mask_padded(data["response_mask"], R).to(z.device)
        targets = targets.masked_fill(~mask, IGNORE_INDEX)

        s = self.settings
        n_digits = float(_required(data, NUM_DIGITS_KEY))
        n_seqs = float(_required(data, NUM_SEQUENCES_KEY))
        horizon = s.loss_scale_factor
        if horizon is None and s.loss_agg_mode == "seq-mean-token-sum-norm":
            # verl's default horizon: the width of the padded response_mask its ppo_loss sees
            horizon = pad_responses(data["response_mask"]).shape[1]
        resp = data["responses"] if has_key(data, "responses") else None
        targets = with_decimal_points(targets, resp, self.vocab, self.method)
        rows = ntl_loss_from_digit_logits(z, targets, self.vocab, self.method, reduction="none")  # [B, R]
        dp = digit_probs(z.detach(), targets, self.vocab, ignore_index=IGNORE_INDEX)
        ntl_mb = dp_size * aggregate_loss(rows, dp.mask, s.loss_agg_mode, num_tokens=n_digits,
                                          num_sequences=n_seqs, horizon=horizon)
        per_digit = dp_size / max(n_digits, 1.0)
        values = torch.stack([
            ntl_mb.detach(), dp.correct.float().sum() * per_digit, dp.max_prob.sum() * per_digit,
            dp.target_prob.sum() * per_digit,
        ]).tolist()  # one host sync
        metrics.update({
            "ntl/loss": Metric(value=values[0], aggregation=SUM),
            "ntl/digit_accuracy": Metric(value=values[1], aggregation=SUM),
            "ntl/confidence": Metric(value=values[2], aggregation=SUM),
            "ntl/target_prob": Metric(value=values[3], aggregation=SUM),
            "ntl/total_digits": Metric(value=n_digits, aggregation=MEAN),
        })
        w = float(s.ntl_weight)
        if w == 0.0:
            return loss, metrics
        return loss + w * ntl_mb, metrics


def _required(data: Any, key: str) -> Any:
    value = _non_tensor(data, key, None)
    if value is None:
        raise RuntimeError(
            f"the NTL loss needs '{key}' on the batch, which the NTL engine's update sets "
            "(the loss ran outside ntl_verl's engine: set actor_rollout_ref.actor._target_="
            "ntl_verl.config.NTLActorConfig)"
        )
    return value


def ntl_ppo_loss(config: Any, model_output: dict, data: Any, dp_group: Any = None) -> tuple[torch.Tensor, dict]:
    """verl's ``ppo_loss`` plus ``config.ntl_weight * NTL`` (an :class:`NTLActorConfig`).

    Usable with ``worker.set_loss_fn(functools.partial(ntl_ppo_loss, config=cfg))``; the
    NTL engine installs the same thing automatically for an ``NTLActorConfig`` actor.
    """
    from verl.workers.utils.losses import ppo_loss

    fn = NTLLossFn(
        lambda model_output, data, dp_group: ppo_loss(config, model_output, data, dp_group),
        config.ntl_settings,
        vocab_for_model(config.model_config, config.ntl_settings),
        getattr(config.model_config, "tokenizer", None),
    )
    return fn(model_output, data, dp_group)


ntl_ppo_loss.ntl_included = True  # type: ignore[attr-defined]
