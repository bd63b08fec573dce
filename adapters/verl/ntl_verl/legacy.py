"""NTL for the legacy verl 0.7.x actor (``verl.workers.actor.DataParallelPPOActor``).

verl 0.7 has no engine layer: ``DataParallelPPOActor.update_policy`` splits the batch into
mini/micro-batches, calls ``_forward_micro_batch`` (logits -> temperature -> log-probs) and
backpropagates ``policy_loss * loss_scale_factor`` itself. :class:`NTLActorMixin` adds NTL
without copying that loop:

* ``update_policy`` puts ``ntl_targets [B, R]`` (built from ``responses`` and
  ``reward_model.ground_truth`` with ``ntl.rl.targets.build_digit_targets`` unless the batch
  has them) and ``ntl_scale [B] = 1 / N_digits(mini-batch of the sample)`` into the batch
  and keeps both through verl's key selection, so they follow every mini/micro-batch split
  (also dynamic batch sizes, which only regroup samples).
* ``_forward_micro_batch`` captures the digit columns of the logits of the *same* forward
  (a forward hook on the actor module, taken before verl divides the logits in place by the
  temperature; we divide by the same temperature), lays them out exactly like verl's
  ``log_probs`` (``[:, -R-1:-1]`` of the padded sequence: row ``t`` predicts response token
  ``t``), computes ``NTL_mb = sum_i scale_i * NTL_i`` with ``ntl.ntl_loss`` and attaches it to
  the returned ``log_probs`` with an identity whose backward adds ``ntl_weight * dNTL_mb``.
  verl's ``loss.backward()`` therefore back-propagates ``policy_loss * loss_scale_factor +
  ntl_weight * NTL_mb``, i.e. ``ntl_weight * mean NTL`` over the mini-batch's digits per
  optimizer step, in the same forward/backward as the policy loss (per data-parallel rank:
  verl 0.7 normalises every loss locally and FSDP averages the ranks' gradients).
* Metrics: ``ntl/loss`` (and accuracy, confidence, target probability) are logged once per
  mini-batch as the mean over its number-token targets (the sum of its micro-batches' shares), not
  as a mean of micro-batch means; ``ntl/total_digits`` is the mini-batch's count of number-token
  targets.

NTL runs over the model's whole number vocabulary (:func:`ntl_verl.loss.number_vocab`, i.e.
``ntl.vocab_for_tokenizer``: the ten digits of Qwen2.5, all ``K = 1,110`` number tokens of
Llama-3; "digit" in the names means number token). A tokenizer with which NTL would see no target
is refused with a ``ValueError`` when the actor is built (its tokenizer known from the model's
``name_or_path`` or ``ntl_tokenizer``) or, at the latest, at the first update.

Only ``actor.loss_agg_mode=token-mean`` is supported on verl 0.7 (any other mode is refused at
start-up); verl>=0.9.1 with ``ntl_verl.config.NTLActorConfig`` aggregates NTL under every mode.

Activation in verl 0.7.x: ``actor_rollout_ref.actor._target_=ntl_verl.legacy.NTLLegacyActorConfig``
(+ the ``ntl_*`` keys) and make the workers import this module before they build the actor
(``VERL_USE_EXTERNAL_MODULES=ntl_verl.legacy`` in the Ray runtime env), which swaps
``verl.workers.actor.DataParallelPPOActor`` for :class:`NTLDataParallelPPOActor` (inert for
any config without NTL settings, e.g. the reference policy). The digit-aware reward bonus
needs verl 0.9's trainer; on 0.7 use the ``proximity`` bonus through
``custom_reward_function``. Not supported here (clear errors): Ulysses SP, fused kernels,
the prefix grouper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import ntl
from ntl.rl.metrics import digit_probs

from ._compat import require_verl_07
from .batch import TARGETS_KEY, digit_targets, ground_truths_from, has_key
from .loss import loss_method, ntl_loss_from_digit_logits, number_vocab, with_decimal_points
from .settings import IGNORE_INDEX, KEY_PREFIX, NTLConfigFields, NTLSettings

__all__ = ["NTLActorMixin", "NTLDataParallelPPOActor", "NTLLegacyActorConfig", "install"]

logger = logging.getLogger("ntl")

SCALE_KEY = "ntl_scale"
_SHARES = ("ntl/loss", "ntl/digit_accuracy", "ntl/confidence", "ntl/target_prob")

require_verl_07()

from verl.workers.actor.dp_actor import DataParallelPPOActor  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402


@dataclass
class NTLLegacyActorConfig(FSDPActorConfig, NTLConfigFields):
    """verl 0.7's ``FSDPActorConfig`` plus the NTL keys (:class:`ntl_verl.settings.NTLSettings`),
    validated at instantiation (verl's driver-side ``validate_config``)."""

    def __post_init__(self) -> None:
        s = self.ntl_settings
        if s.ntl_enabled and s.loss_agg_mode != "token-mean":
            raise ValueError(
                f"{KEY_PREFIX}loss_agg_mode={s.loss_agg_mode!r}: ntl_verl.legacy (verl 0.7) adds NTL as a "
                "token mean over the mini-batch's digit targets only; use loss_agg_mode=token-mean, or "
                "verl>=0.9.1 with ntl_verl.config.NTLActorConfig (every mode)"
            )
        if s.bonus_enabled:
            raise ValueError(
                "actor_rollout_ref.actor.ntl_bonus_type: the digit-aware bonus needs verl>=0.9.1 "
                "(its trainer carries the old-log-prob outputs to the advantage); on verl 0.7 use "
                "the proximity bonus through reward.custom_reward_function"
            )
        super().__post_init__()


class _AddLossGrad(torch.autograd.Function):
    """Identity on ``x``; backward also sends ``coef`` into ``aux`` (so ``aux``'s graph gets
    ``coef * d aux``): attaches an extra loss term to a tensor the caller backpropagates."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.coef = coef
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # pyright: ignore[reportIncompatibleMethodOverride]
        return grad, torch.full(ctx.aux_shape, ctx.coef, dtype=torch.float32, device=grad.device), None


if TYPE_CHECKING:  # the class this mixin goes on, for type checkers (object at run time)
    _ActorBase = DataParallelPPOActor
else:
    _ActorBase = object


class NTLActorMixin(_ActorBase):
    """Mixin for verl 0.7's ``DataParallelPPOActor`` (module docstring)."""

    ntl_tokenizer: Any = None

    @property
    def ntl_settings(self) -> NTLSettings | None:
        s = getattr(self.config, "ntl_settings", None)
        return s if isinstance(s, NTLSettings) and s.ntl_enabled else None

    def _ntl_model_config(self) -> Any:
        m = self.actor_module
        return getattr(getattr(m, "module", m), "config", None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self._ntl_model_config()
        if self.ntl_settings is not None and (self.ntl_tokenizer is not None or getattr(cfg, "_name_or_path", None)):
            _ = self.ntl_vocab  # refuses, at worker init, a model with which NTL would see no target

    @property
    def ntl_vocab(self) -> ntl.NumberVocab:
        """The model's whole number vocabulary (:func:`ntl_verl.loss.number_vocab`: ``K = 10``
        digits for Qwen2.5, ``K = 1,110`` number tokens for Llama-3), built when the actor is
        (its tokenizer known) or first used; ``ValueError`` when NTL could see no target."""
        v = getattr(self, "_ntl_vocab_cache", None)
        if v is None:
            cfg = self._ntl_model_config()
            v = number_vocab(self._ntl_get_tokenizer(), getattr(cfg, "vocab_size", None), self.ntl_settings)
            self._ntl_vocab_cache = v
        return v

    def _ntl_method(self) -> Any:
        """The settings' method with the tokenizer's ``'.'`` as DEL's decimal point."""
        m = getattr(self, "_ntl_method_cache", None)
        if m is None:
            s = self.ntl_settings
            assert s is not None
            m = loss_method(s, self._ntl_get_tokenizer())
            self._ntl_method_cache = m
        return m

    def _ntl_get_tokenizer(self) -> Any:
        if self.ntl_tokenizer is None:
            from transformers import AutoTokenizer

            path = getattr(self._ntl_model_config(), "_name_or_path", None)
            if not path:
                raise ValueError("NTL needs the tokenizer: set actor.ntl_tokenizer (the model has no name_or_path)")
            self.ntl_tokenizer = AutoTokenizer.from_pretrained(path)
        return self.ntl_tokenizer

    def _ntl_check_supported(self) -> None:
        for flag, what in (("use_ulysses_sp", "Ulysses sequence parallelism"),
                           ("use_fused_kernels", "use_fused_kernels"),
                           ("use_prefix_grouper", "the prefix grouper")):
            if getattr(self, flag, False):
                raise NotImplementedError(
                    f"ntl_verl.legacy: NTL with {what} is not supported on verl 0.7; use verl>=0.9.1 "
                    "(ntl_verl.config.NTLActorConfig) or turn it off"
                )

    # ------------------------------------------------------------------ update
    def update_policy(self, data: Any) -> dict:
        s = self.ntl_settings
        if s is None:
            return super().update_policy(data)
        self._ntl_check_supported()
        responses = data.batch["responses"]
        mask = data.batch["response_mask"].bool()
        if not has_key(data.batch, TARGETS_KEY):
            gts = ground_truths_from(data.non_tensor_batch.get("reward_model"), len(responses))
            data.batch[TARGETS_KEY] = digit_targets(
                responses, mask, gts, self._ntl_get_tokenizer(), self.ntl_vocab, s.ntl_labels
            )
        targets = data.batch[TARGETS_KEY].masked_fill(~mask, IGNORE_INDEX)
        targets = with_decimal_points(targets, responses, self.ntl_vocab, self._ntl_method())
        data.batch[TARGETS_KEY] = targets
        # per-sample 1 / (digits in its mini-batch); verl splits mini-batches in order
        is_digit = self.ntl_vocab.digit_index(targets) >= 0
        per_sample = is_digit.sum(1).float()
        mb = torch.arange(len(per_sample), device=per_sample.device) // int(self.config.ppo_mini_batch_size)
        per_mb = torch.zeros(int(mb.max()) + 1, device=per_sample.device).index_add_(0, mb, per_sample)
        data.batch[SCALE_KEY] = 1.0 / per_mb.clamp_min(1.0)[mb]

        keep = (TARGETS_KEY, SCALE_KEY)
        orig_select = data.select

        def select(batch_keys: Any = None, *args: Any, **kwargs: Any) -> Any:
            if batch_keys is not None:
                batch_keys = [*batch_keys, *(k for k in keep if k not in batch_keys)]
            return orig_select(batch_keys, *args, **kwargs)

        data.select = select  # keep the NTL columns through update_policy's key selection
        self._ntl_stats: list[dict[str, float]] = []
        try:
            metrics: dict[str, Any] = super().update_policy(data)  # name -> list of values
        finally:
            del data.select
        for st in _per_minibatch(self._ntl_stats):
            for k, val in st.items():
                metrics.setdefault(k, []).append(val)
        return metrics

    def _optimizer_step(self) -> Any:
        stats = getattr(self, "_ntl_stats", None)
        if stats is not None and self.ntl_settings is not None:
            stats.append({"step": 1.0})  # closes the mini-batch's metric shares
        return super()._optimizer_step()

    # ------------------------------------------------------------------ forward
    def _forward_micro_batch(self, micro_batch: dict, temperature: float, calculate_entropy: bool = False) -> dict:
        s = self.ntl_settings
        targets = micro_batch.get(TARGETS_KEY) if s is not None else None
        if s is None or targets is None or not torch.is_grad_enabled():
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=calculate_entropy)
        self._ntl_check_supported()
        ids = self.ntl_vocab.ids(targets.device)
        captured: dict[str, torch.Tensor] = {}

        def hook(_mod: Any, _args: Any, output: Any) -> None:
            logits = output.logits if hasattr(output, "logits") else output[0]
            captured["z"] = logits.index_select(-1, ids.to(logits.device))  # a copy: verl divides in place next

        handle = self.actor_module.register_forward_hook(hook)
        try:
            outputs = super()._forward_micro_batch(micro_batch, temperature, calculate_entropy=calculate_entropy)
        finally:
            handle.remove()
        if "z" not in captured:
            raise RuntimeError("ntl_verl.legacy: the actor forward produced no logits to capture")
        z = captured["z"].float() / float(temperature)
        input_ids, attention_mask = micro_batch["input_ids"], micro_batch["attention_mask"]
        B, L = input_ids.shape
        R = micro_batch["responses"].size(-1)
        if self.use_remove_padding:
            from verl.utils.attention_utils import pad_input, unpad_input

            _, indices, *_ = unpad_input(input_ids.unsqueeze(-1), attention_mask)
            z = pad_input(hidden_states=z.squeeze(0), indices=indices, batch=B, seqlen=L)
        z = z[:, -R - 1:-1]  # the causal shift, exactly as verl slices log_probs
        scale = micro_batch[SCALE_KEY].float()
        rows = ntl_loss_from_digit_logits(z, targets, self.ntl_vocab, self._ntl_method(), reduction="none")
        ntl_mb = (rows * scale[:, None]).sum()
        dp = digit_probs(z.detach(), targets, self.ntl_vocab, ignore_index=IGNORE_INDEX)
        sc = scale[:, None]
        vals = torch.stack([ntl_mb.detach(), (dp.correct.float() * sc).sum(), (dp.max_prob * sc).sum(),
                            (dp.target_prob * sc).sum(), dp.mask.float().sum()]).tolist()  # one host sync
        self._ntl_stats.append({**dict(zip(_SHARES, vals[:4], strict=True)), "ntl/total_digits": vals[4]})
        w = float(s.ntl_weight)
        if w > 0:
            scaler = getattr(self, "scaler", None)
            coef = w * (float(scaler.get_scale()) if scaler is not None else 1.0)
            outputs["log_probs"] = _AddLossGrad.apply(outputs["log_probs"], ntl_mb, coef)
        return outputs


def _per_minibatch(shares: list[dict[str, float]]) -> list[dict[str, float]]:
    """Sum the micro-batches' shares into one entry per optimizer step (= per mini-batch and
    epoch; ``_optimizer_step`` appends a ``{"step": 1}`` marker after each mini-batch)."""
    out: list[dict[str, float]] = []
    current = {k: 0.0 for k in (*_SHARES, "ntl/total_digits")}
    seen = False
    for st in shares:
        if "step" in st:
            if seen:
                out.append(current)
            current, seen = {k: 0.0 for k in current}, False
            continue
        seen = True
        for k in current:
            current[k] += st[k]
    if seen:
        out.append(current)
    return out


class NTLDataParallelPPOActor(NTLActorMixin, DataParallelPPOActor):
    """verl 0.7's ``DataParallelPPOActor`` with NTL (inert without NTL settings in its config)."""


def install() -> None:
    """Make verl 0.7's workers build :class:`NTLDataParallelPPOActor` (idempotent)."""
    import verl.workers.actor as actor_pkg
    import verl.workers.actor.dp_actor as dp_mod

    actor_pkg.DataParallelPPOActor = NTLDataParallelPPOActor
    dp_mod.DataParallelPPOActor = NTLDataParallelPPOActor


install()
