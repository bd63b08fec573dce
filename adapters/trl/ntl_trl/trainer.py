"""NTL for TRL's GRPO and RLOO trainers: :class:`NTLTrainerMixin` and ready classes.

How it plugs in (TRL 1.16):

* **The model's whole number vocabulary.** NTL runs over the ``K`` number tokens of the
  tokenizer (:func:`ntl.vocab_for_tokenizer`): the digits ``'0'..'9'`` for a digit-level
  tokenizer (Qwen2.5), every number token ``'0'..'999'`` (``K = 1,110``, widths 1-3) for
  Llama-3; ``ntl_vocab=`` overrides it. A tokenizer without number tokens, and
  ``final_answer`` with a vocab whose token widths are unknown, are refused at construction.
* **Targets at generation.** The mixin extends ``_generate_and_score_completions``: for
  the whole generation batch it builds the per-token number-token targets (``ntl_targets``,
  ``[B, C]`` token ids, ``-100`` elsewhere; completion mask times ``tool_mask``, so numbers
  in tool results never count) from ``NTLConfig.answer_column`` of every row, and the
  target count summed over processes (``ntl_num_targets``), the way TRL gathers
  ``num_items_in_batch``. TRL shuffles and splits these with the other tensors, so they
  stay paired with their completions across ``steps_per_generation`` and
  ``num_iterations``.
* **Same forward, inside it.** TRL's ``compute_loss(model, inputs)`` runs *one* forward
  of ``cat(prompt_ids, completion_ids)`` through its fused LM head (no logits are
  materialised). A forward hook on the backbone (:class:`ntl_trl._capture.HiddenNTLCapture`,
  armed only inside ``compute_loss``) takes that forward's ``last_hidden_state``;
  completion token ``t`` sits at ``P + t`` and is predicted by the state at ``P + t - 1``.
  Only the targeted rows enter ``z = f(h @ W[ids].T + b[ids])`` (``f``: the model's logit
  scale / soft-cap, then the trainer's temperature, as in TRL's log-probs), computed while
  the forward runs, so under FSDP2 ``W`` is the all-gathered parameter and its gradient is
  averaged over ranks like the trainer's own.
* **Normalisation over the accumulation window.** Each micro-batch adds
  ``ntl_weight * sum_i NTL_i / D`` with ``D = max(N, 1) / P * G / S``
  (:func:`ntl.rl.normalization.accumulation_normalizer`; ``N`` = ``ntl_num_targets``, ``P``
  processes, ``G`` = ``current_gradient_accumulation_steps``, ``S`` =
  ``steps_per_generation``), TRL's ``dapo`` normaliser: after accumulation and the
  data-parallel gradient average the update is that of the mean NTL over every number-token
  target of the window, whatever the micro-batch split. GRPO scales its loss for
  accumulation itself (``loss_is_scaled_for_ga``); RLOO leaves it to the HF ``Trainer``,
  so there the term is multiplied by ``G`` first. Evaluation: ``D = max(N, 1) / P``.
* **Metrics** go to ``self._metrics[mode]["ntl/..."]`` (TRL averages them per logging
  window and prefixes ``eval_``), reduced across processes; ``ntl/answer_rate`` is the
  share of completions with an extracted final answer (modes that read answers). A
  warning (``ntl`` logger and ``transformers.trainer``) says when the first generation
  batch has no target at all while ``ntl_weight > 0``. ``ntl/total_digits`` counts number
  tokens (Llama-3's ``'123'`` is one), ``ntl/digit_accuracy`` is number-token accuracy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import torch
from trl import GRPOTrainer, RLOOTrainer

import ntl
from ntl.rl.normalization import accumulation_normalizer
from ntl.rl.targets import digit_token_mask

from ._capture import HiddenNTLCapture
from ._common import (
    MetricSums,
    adapter_method,
    lookup_column,
    resolve_model_vocab,
    targets_for_completions,
    trainer_scales_loss_for_ga,
    warn_everywhere,
)
from ._model import find_lm_parts
from .config import NTLConfig

__all__ = [
    "NTL_ANSWERS_KEY",
    "NTL_COUNT_KEY",
    "NTL_TARGETS_KEY",
    "NTLGRPOTrainer",
    "NTLRLOOTrainer",
    "NTLTrainerMixin",
]

logger = logging.getLogger("ntl")

#: Keys under which the ground truths, the number-token targets and their gathered count travel
#: in TRL's buffered batches.
NTL_ANSWERS_KEY = "ntl_answers"
NTL_TARGETS_KEY = "ntl_targets"
NTL_COUNT_KEY = "ntl_num_targets"


class NTLTrainerMixin:
    """Adds ``ntl_weight * NTL`` to a TRL GRPO/RLOO trainer's loss, in the same forward pass.

    Use as ``class MyTrainer(NTLTrainerMixin, GRPOTrainer)`` (the mixin first) or take
    :class:`NTLGRPOTrainer` / :class:`NTLRLOOTrainer`; pass ``ntl_config=NTLConfig(...)``
    to the constructor, and optionally ``ntl_vocab=`` (an :class:`ntl.NumberVocab` used as
    is; default :func:`ntl.vocab_for_tokenizer` of the ``processing_class``: every number
    token of the model). Loss per micro-batch::

        loss = trainer_loss + ntl_weight * sum_i NTL_i / D,   D = max(N, 1) / P * G / S,
        W1: NTL_i = sum_k q_k |v_k - y_i|   or   MSE: NTL_i = (sum_k q_k v_k - y_i)^2,
        q = softmax_k(f(h_i W[ids].T + b[ids])),  f(z) = c tanh(s z / c) / T,

    over the number-token targets ``i`` of the micro-batch (``v_k`` the values of the ``K``
    number tokens ``ids``, e.g. 0..999 for Llama-3; module docstring: ``N, P, G, S``; ``s``,
    ``c`` the model's logit scale and soft-cap, ``T`` the temperature). Logs ``ntl/loss``,
    ``ntl/digit_accuracy`` (number-token accuracy), ``ntl/total_digits`` (number-token
    targets), ``ntl/confidence``, ``ntl/target_prob`` and, when answers are read,
    ``ntl/answer_rate``.
    """

    if TYPE_CHECKING:  # the TRL trainer's attributes this mixin uses (checked in __init__)
        accelerator: Any
        args: Any
        callback_handler: Any
        current_gradient_accumulation_steps: int
        model: Any
        processing_class: Any
        temperature: float
        _metrics: Any

    def __init__(self, *args: Any, ntl_config: NTLConfig | None = None,
                 ntl_vocab: ntl.NumberVocab | None = None, **kwargs: Any) -> None:
        if ntl_config is None:
            ntl_config = NTLConfig()
        if not isinstance(ntl_config, NTLConfig):
            raise TypeError(f"ntl_config must be an ntl_trl.NTLConfig, got {type(ntl_config).__name__}")
        if ntl_vocab is not None and not isinstance(ntl_vocab, ntl.NumberVocab):
            raise TypeError(
                f"ntl_vocab must be an ntl.NumberVocab or None (the tokenizer's), got {type(ntl_vocab).__name__}"
            )
        self.ntl_config = ntl_config
        super().__init__(*args, **kwargs)
        for attr in ("_metrics", "temperature", "accelerator", "processing_class"):
            if not hasattr(self, attr):
                raise TypeError(
                    f"{type(self).__name__}: NTLTrainerMixin needs a TRL GRPO/RLOO-style trainer "
                    f"(missing attribute {attr!r}); put the mixin before the trainer class"
                )
        from .callback import NTLCallback

        if any(isinstance(cb, NTLCallback) for cb in self.callback_handler.callbacks):
            raise ValueError(
                f"{type(self).__name__} already adds NTL; an NTLCallback as well would add it twice. "
                "Drop the callback (or use a plain TRL trainer with the callback)"
            )
        model = self.accelerator.unwrap_model(self.model)
        self._ntl_parts = find_lm_parts(model)
        self._ntl_vocab = resolve_model_vocab(
            ntl_vocab if ntl_vocab is not None else self.processing_class,
            self._ntl_parts.vocab_size, ntl_labels=ntl_config.ntl_labels,
        )
        self._ntl_method = adapter_method(ntl_config.ntl_method, self.processing_class,
                                          self._ntl_vocab)
        self._ntl_capture = HiddenNTLCapture(self._ntl_parts, self._ntl_vocab, method=self._ntl_method)
        self._ntl_transform = self._ntl_parts.logit_transform(self._ntl_temperature())
        self._ntl_tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._ntl_train_rounds = 0
        logger.info(
            "NTL on %s: weight=%g method=%s labels=%s, %d number tokens (%s), logits %s",
            type(self).__name__, ntl_config.ntl_weight, ntl_config.ntl_method,
            ntl_config.ntl_labels, self._ntl_vocab.K, type(self._ntl_vocab).__name__,
            self._ntl_transform,
        )

    def _ntl_temperature(self) -> float:
        t = self.ntl_config.temperature
        return float(self.temperature if t is None else t)

    # -- targets, built once per generation batch ----------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        if self.ntl_config.needs_answers:
            # NTLConfig rejects needs_answers without an answer_column
            column = cast(str, self.ntl_config.answer_column)
            answers = [lookup_column(x, column) for x in inputs]
            n = output["completion_ids"].shape[0]
            if len(answers) != n:
                raise RuntimeError(
                    f"NTL: {len(answers)} dataset rows but {n} completions in this generation batch; "
                    "cannot pair ground truths with completions"
                )
            output[NTL_ANSWERS_KEY] = answers
        self.ntl_annotate(output)
        return output

    def ntl_annotate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add ``ntl_targets`` and the process-summed ``ntl_num_targets`` to a generated
        batch (``completion_ids``, ``completion_mask``, optional ``tool_mask`` and, for
        modes that read answers, ``ntl_answers``); log ``ntl/answer_rate``; warn once
        when the first training batch has no target. Called for every generation batch."""
        cfg = self.ntl_config
        completion_ids = batch["completion_ids"]
        mask = batch["completion_mask"]
        if batch.get("tool_mask") is not None:
            mask = mask * batch["tool_mask"]
        targets, has_answer = targets_for_completions(
            completion_ids, mask, self._ntl_vocab, labels_mode=cfg.ntl_labels,
            correct_only=cfg.correct_only, answers=batch.get(NTL_ANSWERS_KEY),
            tokenizer=self._ntl_tokenizer, decimal_point_id=self._ntl_method.decimal_point(),
        )
        n_ans = float(sum(has_answer)) if has_answer is not None else 0.0
        local = torch.stack([
            digit_token_mask(targets, self._ntl_vocab).sum().float(),
            torch.tensor(float(completion_ids.shape[0]), device=targets.device),
            torch.tensor(n_ans, device=targets.device),
        ])
        total = self.accelerator.reduce(local, reduction="sum")
        batch[NTL_TARGETS_KEY] = targets
        batch[NTL_COUNT_KEY] = total[0]
        mode = "train" if self.model.training else "eval"
        n_targets, n_completions, n_answers = total.tolist()
        if has_answer is not None:
            self._metrics[mode]["ntl/answer_rate"].append(n_answers / max(n_completions, 1.0))
        if mode == "train":
            if self._ntl_train_rounds == 0 and n_targets == 0 and cfg.ntl_weight > 0:
                self._ntl_warn_no_targets(int(n_completions), n_answers, has_answer is not None)
            self._ntl_train_rounds += 1
        return batch

    def _ntl_warn_no_targets(self, n: int, n_answers: float, reads_answers: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        cfg = self.ntl_config
        if cfg.ntl_labels == "final_answer":
            why = (f"{n_answers / max(n, 1):.0%} of them have a final answer (after '####' or in "
                   "\\boxed{}) with digits")
            fix = "ask for the answer as '#### <number>' in the prompt, or use ntl_labels='all'"
        elif reads_answers:
            why = "none has a final answer equal to the ground truth (correct_only=True)"
            fix = "use correct_only=False, or train the format first"
        else:
            why = "none contains a number token"
            fix = "check that the task makes the policy write numbers"
        warn_everywhere(
            f"NTL: the first generation batch ({n} completions over all processes) has no digit "
            f"target (no number token to score), so the NTL term is 0 (ntl_weight={cfg.ntl_weight:g}, "
            f"ntl_labels={cfg.ntl_labels!r}): {why}. To make NTL apply, {fix}. "
            "Watch ntl/total_digits and ntl/answer_rate."
        )

    # -- the loss -------------------------------------------------------------------------
    def _ntl_trainer_scales_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``transformers.Trainer.training_step``: does compute_loss scale for GA itself?"""
        return trainer_scales_loss_for_ga(self, num_items_in_batch)

    def _ntl_normalizer(self, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        n = inputs[NTL_COUNT_KEY]
        P = self.accelerator.num_processes
        if mode == "train":
            return accumulation_normalizer(
                n, num_processes=P, accumulation_steps=int(self.current_gradient_accumulation_steps),
                steps_per_generation=int(self.args.steps_per_generation),
            )
        return accumulation_normalizer(n, num_processes=P)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        cfg = self.ntl_config
        if NTL_TARGETS_KEY not in inputs or NTL_COUNT_KEY not in inputs:
            raise KeyError(
                f"NTL: the batch has no {NTL_TARGETS_KEY!r}/{NTL_COUNT_KEY!r}; batches must come from "
                "the trainer's _generate_and_score_completions (or pass through self.ntl_annotate)"
            )
        targets = inputs[NTL_TARGETS_KEY]
        if targets.shape != inputs["completion_ids"].shape:
            raise RuntimeError(
                f"NTL: {NTL_TARGETS_KEY} {tuple(targets.shape)} is not aligned with completion_ids "
                f"{tuple(inputs['completion_ids'].shape)}"
            )
        P = inputs["prompt_ids"].shape[1]
        loss, result = self._ntl_capture.run(
            lambda: super(NTLTrainerMixin, self).compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch),
            targets, start=P - 1, transform=self._ntl_transform, grad=cfg.ntl_weight > 0)
        mode = "train" if self.model.training else "eval"
        sums = self.accelerator.reduce(result.sums, reduction="sum")
        for key, val in MetricSums.to_metrics(sums).items():
            self._metrics[mode][key].append(val)
        if cfg.ntl_weight == 0.0:  # metrics only; the update is untouched
            return loss
        term = result.loss_sum / self._ntl_normalizer(inputs, mode).to(result.loss_sum.device)
        if mode == "train" and not self._ntl_trainer_scales_for_ga(num_items_in_batch):
            term = term * self.current_gradient_accumulation_steps  # the HF Trainer divides by G
        return loss + cfg.ntl_weight * term.to(loss.dtype)


class NTLGRPOTrainer(NTLTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with the Number Token Loss; extra argument ``ntl_config``
    (see :class:`NTLTrainerMixin`)."""


class NTLRLOOTrainer(NTLTrainerMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with the Number Token Loss; extra argument ``ntl_config``
    (see :class:`NTLTrainerMixin`)."""
