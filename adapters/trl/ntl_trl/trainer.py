"""NTL for TRL's GRPO and RLOO trainers: :class:`NTLTrainerMixin` and ready classes.

How it plugs in (TRL 1.16):

* TRL's ``compute_loss(model, inputs)`` receives one micro-batch with ``prompt_ids``,
  ``prompt_mask``, ``completion_ids``, ``completion_mask`` (``tool_mask`` with tools)
  and runs *one* forward of ``cat(prompt_ids, completion_ids)`` through the fused LM
  head (no logits are materialised). The mixin captures the backbone's
  ``last_hidden_state`` of that very forward with a forward hook (armed only inside
  ``compute_loss``), so there is no second forward.
* Completion token ``t`` sits at position ``P + t`` (``P = prompt_ids.size(1)``) and is
  predicted by the hidden state at ``P + t - 1``; NTL is
  ``ntl.ntl_loss_from_hidden(h[:, P-1:P+C-1], lm_head.weight, targets, vocab,
  temperature=args.temperature, bias=lm_head.bias)``, the same temperature as the
  trainer's log-probs.
* Gradient accumulation: GRPO's ``compute_loss`` divides its loss by
  ``current_gradient_accumulation_steps`` itself (``loss_is_scaled_for_ga = True``);
  RLOO returns an unscaled loss that the HF ``Trainer`` divides. The mixin adds
  ``ntl_weight * NTL`` under the same rule, so NTL is always a per-micro-batch mean
  averaged over the accumulation window, whatever the policy-loss normalisation.
* Metrics go to ``self._metrics[mode]["ntl/..."]``; TRL averages them per logging window.
* ``final_answer`` (and ``all`` with ``correct_only``) need the ground truth in
  ``compute_loss``: the mixin extends ``_generate_and_score_completions`` to carry
  ``NTLConfig.answer_column`` of every row along with its completion (TRL shuffles
  and splits lists together with the tensors).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl import GRPOTrainer, RLOOTrainer

import ntl

from ._common import (
    MetricSums,
    digit_metric_sums,
    lookup_column,
    resolve_model_vocab,
    targets_for_completions,
)
from ._model import find_lm_parts, last_hidden_state
from .config import NTLConfig

__all__ = ["NTL_ANSWERS_KEY", "NTLGRPOTrainer", "NTLRLOOTrainer", "NTLTrainerMixin"]

logger = logging.getLogger("ntl")

#: Key under which the ground-truth answers travel in TRL's buffered batches.
NTL_ANSWERS_KEY = "ntl_answers"


class _HiddenCapture:
    """Forward hook on the backbone that records its last hidden state while armed."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.armed = False
        self.captured: list[torch.Tensor] = []
        self.handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.armed:
            self.captured.append(last_hidden_state(output))

    def remove(self) -> None:
        self.handle.remove()


class NTLTrainerMixin:
    """Adds ``ntl_weight * NTL`` to a TRL GRPO/RLOO trainer's loss, in the same forward pass.

    Use as ``class MyTrainer(NTLTrainerMixin, GRPOTrainer)`` (the mixin first) or take
    :class:`NTLGRPOTrainer` / :class:`NTLRLOOTrainer`; pass ``ntl_config=NTLConfig(...)``
    to the constructor. Loss per micro-batch::

        loss = trainer_loss + ntl_weight * NTL / s,   NTL = mean over digit targets of
        W1: sum_k q_k |v_k - y|   or   MSE: (sum_k q_k v_k - y)^2,
        q = softmax_k((h W[ids].T + b[ids]) / T),

    with ``s`` the gradient-accumulation divisor the trainer applies to its own loss
    (1 where the HF ``Trainer`` divides instead). Logs ``ntl/loss``,
    ``ntl/digit_accuracy``, ``ntl/total_digits``, ``ntl/confidence``, ``ntl/target_prob``.
    """

    def __init__(self, *args: Any, ntl_config: NTLConfig | None = None, **kwargs: Any) -> None:
        if ntl_config is None:
            ntl_config = NTLConfig()
        if not isinstance(ntl_config, NTLConfig):
            raise TypeError(f"ntl_config must be an ntl_trl.NTLConfig, got {type(ntl_config).__name__}")
        self.ntl_config = ntl_config
        super().__init__(*args, **kwargs)
        for attr in ("_metrics", "temperature", "accelerator", "processing_class"):
            if not hasattr(self, attr):
                raise TypeError(
                    f"{type(self).__name__}: NTLTrainerMixin needs a TRL GRPO/RLOO-style trainer "
                    f"(missing attribute {attr!r}); put the mixin before the trainer class"
                )
        model = self.accelerator.unwrap_model(self.model)
        self._ntl_parts = find_lm_parts(model)
        self._ntl_vocab = resolve_model_vocab(self.processing_class, self._ntl_parts.weight.shape[0])
        self._ntl_capture = _HiddenCapture(self._ntl_parts.backbone)
        self._ntl_tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        logger.info(
            "NTL on %s: weight=%g method=%s labels=%s, %d number tokens",
            type(self).__name__, ntl_config.ntl_weight, ntl_config.ntl_method,
            ntl_config.ntl_labels, self._ntl_vocab.K,
        )

    # -- ground truths travel with their completions ---------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        if self.ntl_config.needs_answers:
            answers = [lookup_column(x, self.ntl_config.answer_column) for x in inputs]
            n = output["completion_ids"].shape[0]
            if len(answers) != n:
                raise RuntimeError(
                    f"NTL: {len(answers)} dataset rows but {n} completions in this generation batch; "
                    "cannot pair ground truths with completions"
                )
            output[NTL_ANSWERS_KEY] = answers
        return output

    # -- the loss -----------------------------------------------------------------------
    def _ntl_temperature(self) -> float:
        t = self.ntl_config.temperature
        return float(self.temperature if t is None else t)

    def _ntl_trainer_scales_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``transformers.Trainer.training_step``: does compute_loss scale for GA itself?"""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        cap = self._ntl_capture
        cap.captured.clear()
        cap.armed = True
        try:
            loss = super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            cap.armed = False
        captured, cap.captured = cap.captured, []
        if not captured:
            raise RuntimeError(
                "NTL: the backbone forward hook did not fire inside compute_loss; the trainer did not "
                f"run {type(self._ntl_parts.backbone).__name__} (is this a TRL GRPO/RLOO trainer?)"
            )
        hidden = captured[0] if len(captured) == 1 else torch.cat(captured, dim=0)
        if self.ntl_config.ntl_weight == 0.0:  # metrics only; the update is untouched
            with torch.no_grad():
                self._ntl_loss_and_log(hidden, inputs)
            return loss
        ntl_term = self._ntl_loss_and_log(hidden, inputs)
        mode = "train" if self.model.training else "eval"
        scale = self.ntl_config.ntl_weight
        if mode == "train" and self._ntl_trainer_scales_for_ga(num_items_in_batch):
            scale = scale / self.current_gradient_accumulation_steps
        return loss + scale * ntl_term.to(loss.dtype)

    def _ntl_loss_and_log(self, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        cfg = self.ntl_config
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        P, C = prompt_ids.shape[1], completion_ids.shape[1]
        if hidden.shape[:2] != (completion_ids.shape[0], P + C):
            raise RuntimeError(
                f"NTL: captured hidden state {tuple(hidden.shape)} does not match prompt+completion "
                f"({completion_ids.shape[0]}, {P}+{C}); the trainer's forward changed the sequence"
            )
        # hidden state at P+t-1 predicts completion token t (causal shift)
        h = hidden[:, P - 1 : P + C - 1]
        targets = targets_for_completions(
            completion_ids, mask, self._ntl_vocab, labels_mode=cfg.ntl_labels,
            correct_only=cfg.correct_only, answers=inputs.get(NTL_ANSWERS_KEY),
            tokenizer=self._ntl_tokenizer,
        )
        parts, T = self._ntl_parts, self._ntl_temperature()
        weight = parts.weight.to(h.device)
        bias = parts.bias
        loss = ntl.ntl_loss_from_hidden(
            h, weight, targets, self._ntl_vocab, method=cfg.ntl_method, temperature=T, bias=bias
        )
        with torch.no_grad():
            z = ntl.digit_logits_from_hidden(h.detach(), weight.detach(), self._ntl_vocab,
                                             temperature=T,
                                             bias=None if bias is None else bias.detach())
            sums = digit_metric_sums(z, targets, self._ntl_vocab, cfg.ntl_method)
            sums = self.accelerator.reduce(sums, reduction="sum")
        mode = "train" if self.model.training else "eval"
        for key, val in MetricSums.to_metrics(sums).items():
            self._metrics[mode][key].append(val)
        return loss


class NTLGRPOTrainer(NTLTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with the Number Token Loss; extra argument ``ntl_config``
    (see :class:`NTLTrainerMixin`)."""


class NTLRLOOTrainer(NTLTrainerMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with the Number Token Loss; extra argument ``ntl_config``
    (see :class:`NTLTrainerMixin`)."""
