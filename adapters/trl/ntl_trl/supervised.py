"""NTL in supervised fine-tuning: :class:`NTLSFTMixin`, and :class:`NTLTrainer` for the plain
``transformers.Trainer`` (no TRL needed; TRL's ``SFTTrainer`` is in :mod:`ntl_trl.sft`).

How it plugs in (transformers 5 ``Trainer``; TRL 1.16 ``SFTTrainer``):

* **The labels are the targets.** NTL applies where the trainer's own cross-entropy does:
  the batch's ``labels`` are ``-100`` outside the supervised tokens (the prompt under
  ``completion_only_loss``, non-assistant turns under ``assistant_only_loss``, padding, the
  first token of each packed sequence), so those masks hold for NTL as they are. Every other
  position whose label is a number token of the model's whole number vocabulary
  (:func:`ntl.vocab_for_tokenizer`: ``'0'..'9'`` for a digit-level tokenizer such as Qwen2.5's,
  every number token ``'0'..'999'``, ``K = 1,110``, for Llama-3) takes part, with the token's
  value as target (Llama-3's ``'123'`` is one target of value 123). A causal LM's hidden
  state at ``t`` predicts ``labels[t + 1]``: NTL scores ``labels[:, 1:]`` with
  ``hidden[:, :-1]`` (``shift_labels``, when the collator provides them, with ``hidden``
  unshifted), the shift of TRL's fused head and of HF's ``ForCausalLMLoss``.
* **Same forward, inside it.** ``compute_loss`` arms a forward hook on the backbone
  (:class:`ntl_trl._capture.HiddenNTLCapture`) and calls the trainer's own ``compute_loss``.
  Its one forward (TRL's fused LM head, which never builds logits, or the HF model's own
  forward) yields the backbone's last hidden state, and NTL is computed from the number-token
  rows only while that forward runs: ``z = f(h_sel @ W[ids].T + b[ids])``, ``f`` the model's logit
  scale / soft-cap (:class:`ntl.rl.logit_transform.LogitTransform`). No second forward and no
  ``[N, V]`` tensor for NTL; the CE stays the trainer's own. Forwards the trainer re-runs on
  the same batch without gradient (TRL's metrics forward after ``compute_loss_func`` or
  label smoothing, its ``return_outputs`` logits) are not scored again.
* **Normalisation over the accumulation window.** ``get_batch_samples`` (the HF loop fetches
  the ``G`` micro-batches of an optimizer step there, and counts ``num_items_in_batch``)
  also counts the window's number-token targets ``N``, summed over the ``P`` processes. Each
  micro-batch then adds ``ntl_weight * sum_{i in micro-batch} NTL_i / D`` with
  ``D = max(N, 1) / P`` (:func:`ntl.rl.normalization.accumulation_normalizer`, the window being
  the "generation batch"), times ``G`` when ``training_step`` will divide the loss by ``G``
  (:func:`ntl_trl._common.trainer_scales_loss_for_ga`; SFTTrainer and HF causal LMs
  normalise by ``num_items_in_batch`` and are not divided). After accumulation and the
  data-parallel gradient average, the update is that of ``ntl_weight * sum_{i in window}
  NTL_i / N``: the mean over every number-token target of the window, however they fall on
  micro-batches and processes (the trainer's CE is the same mean over the window's tokens).
  The count is always global, also with ``average_tokens_across_devices=False``.
  A ``compute_loss`` call outside the training loop (no window recorded) uses the
  micro-batch's own mean, divided by ``G`` like a per-micro-batch CE. Evaluation: the mean
  over the batch's number-token targets.
* **Metrics**, weighted by number-token targets over the logging window and reduced over
  processes, are added
  to the trainer's logs (so ``state.log_history`` and every reporter get them; prefixed as
  the evaluation's metrics are): ``ntl/loss`` (unweighted mean NTL), ``ntl/digit_accuracy``
  (number-token accuracy: argmax number token == target), ``ntl/confidence`` (mean max
  number-token probability), ``ntl/target_prob`` and ``ntl/total_digits`` (number-token
  targets per optimizer step, Llama-3's ``'123'`` counting once; in evaluation, over the
  whole evaluation). Means are left out when no number token took part. A warning (``ntl``
  logger and ``transformers.trainer``) says when the first window has no target while
  ``ntl_weight > 0``.

Refused with an error naming the cause: a model without a findable LM head or backbone, a
tokenizer without any number token (NTL could see no target), DeepSpeed ZeRO-3 (:func:`ntl_trl._model.find_lm_parts`),
PEFT prompt learning (virtual tokens shift the positions), encoder-decoder models, tensor /
context / sequence parallelism and ``nn.DataParallel`` (the labels and hidden states a rank
holds would not line up with the counts), an ``NTLCallback`` on the same trainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from ntl.rl.normalization import accumulation_normalizer
from ntl.rl.targets import digit_token_mask

from ._capture import HiddenNTLCapture
from ._common import (
    MetricSums,
    adapter_method,
    resolve_model_vocab,
    trainer_scales_loss_for_ga,
    warn_everywhere,
)
from ._model import find_lm_parts
from .config import NTLConfig, NTLSFTConfig

__all__ = ["NTLSFTMixin", "NTLTrainer", "sft_targets"]

logger = logging.getLogger("ntl")


def sft_targets(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """``(targets, T)``: the labels scored by ``hidden[:, :T-1]`` (``labels[:, 1:]``) or, when the
    batch has ``shift_labels``, by the whole ``hidden[:, :T]``; ``T`` is the sequence length
    the backbone's output must have."""
    shifted = batch.get("shift_labels")
    if shifted is not None:
        if shifted.dim() != 2:
            raise ValueError(f"NTL: shift_labels must be [B, T], got shape {tuple(shifted.shape)}")
        return shifted, int(shifted.shape[1])
    labels = batch.get("labels")
    if labels is None:
        raise KeyError(
            "NTL: the batch has no 'labels' (nor 'shift_labels'); NTL applies to the supervised "
            f"tokens the labels mark (batch keys: {sorted(batch)})"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            "NTL: labels must be a [B, T] tensor of token ids, got "
            + (f"shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__)
        )
    return labels[:, 1:], int(labels.shape[1])


class NTLSFTMixin:
    """Adds ``ntl_weight * NTL`` on the supervised number tokens to a ``transformers.Trainer``'s
    loss, from the hidden states of the trainer's own forward.

    Use as ``class MyTrainer(NTLSFTMixin, SomeTrainer)`` (the mixin first), or take
    :class:`NTLTrainer` (``transformers.Trainer``) / :class:`ntl_trl.NTLSFTTrainer`
    (``trl.SFTTrainer``); pass ``ntl_config=NTLSFTConfig(...)``. Loss per micro-batch::

        loss = trainer_loss + ntl_weight * sum_i NTL_i / D,   D = max(N, 1) / P,
        W1: NTL_i = sum_k q_k |v_k - y_i|   or   MSE: NTL_i = (sum_k q_k v_k - y_i)^2,
        q = softmax_k(f(h_{t_i - 1} W[ids].T + b[ids])),

    over the micro-batch's positions ``t_i`` whose label is a number token (``y_i`` its value,
    ``v_k`` the values of the model's ``K`` number tokens ``ids``); ``N`` the number-token
    targets of the accumulation window over all ``P`` processes, ``f`` the model's
    logit map (module docstring; the term is multiplied by ``G`` when ``training_step``
    divides the loss by the accumulation count). Logs ``ntl/loss``, ``ntl/digit_accuracy``
    (number-token accuracy), ``ntl/total_digits`` (number-token targets),
    ``ntl/confidence``, ``ntl/target_prob``.
    """

    if TYPE_CHECKING:  # the transformers.Trainer attributes this mixin uses
        accelerator: Any
        args: Any
        model: Any

    def __init__(self, *args: Any, ntl_config: NTLSFTConfig | None = None, **kwargs: Any) -> None:
        if ntl_config is None:
            ntl_config = NTLSFTConfig()
        if isinstance(ntl_config, NTLConfig):
            raise TypeError(
                "ntl_config is an NTLConfig, the RL (GRPO/RLOO) options; supervised trainers take "
                "ntl_trl.NTLSFTConfig(ntl_weight=..., ntl_method=...)"
            )
        if not isinstance(ntl_config, NTLSFTConfig):
            raise TypeError(f"ntl_config must be an ntl_trl.NTLSFTConfig, got {type(ntl_config).__name__}")
        self.ntl_config = ntl_config
        super().__init__(*args, **kwargs)
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__}: NTLSFTMixin needs a transformers.Trainer subclass; put the "
                "mixin before the trainer class"
            )
        from .callback import NTLCallback

        if any(isinstance(cb, NTLCallback) for cb in self.callback_handler.callbacks):
            raise ValueError(
                f"{type(self).__name__} already adds NTL; an NTLCallback as well would add it twice. "
                "Drop the callback"
            )
        model = self.accelerator.unwrap_model(self.model)
        self._ntl_parts = find_lm_parts(model)
        self._ntl_check_setup(model)
        self._ntl_vocab = resolve_model_vocab(self.processing_class, self._ntl_parts.vocab_size)
        self._ntl_method = adapter_method(ntl_config.ntl_method, self.processing_class,
                                          self._ntl_vocab)
        self._ntl_capture = HiddenNTLCapture(self._ntl_parts, self._ntl_vocab, method=self._ntl_method)
        self._ntl_transform = self._ntl_parts.logit_transform(1.0)
        self._ntl_window: dict[str, Any] | None = None
        self._ntl_windows_seen = 0
        self._ntl_sums: dict[str, torch.Tensor] = {}
        self._ntl_steps_unlogged = 0  # optimizer steps (windows) since the last training log
        self._ntl_eval_prefix = "eval"
        logger.info(
            "NTL on %s: weight=%g method=%s, %d number tokens, logits %s",
            type(self).__name__, ntl_config.ntl_weight, ntl_config.ntl_method,
            self._ntl_vocab.K, self._ntl_transform,
        )

    def _ntl_check_setup(self, model: Any) -> None:
        name = type(self).__name__
        cfg = getattr(self._ntl_parts.lm, "config", None)
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(
                f"{name}: NTL's causal shift (hidden state t predicts labels[t + 1]) needs a "
                "decoder-only causal LM; this model is encoder-decoder"
            )
        peft_cfg = getattr(model, "active_peft_config", None)
        if getattr(peft_cfg, "is_prompt_learning", False):
            raise ValueError(
                f"{name}: PEFT prompt learning ({type(peft_cfg).__name__}) adds virtual tokens in "
                "front of the sequence, so the backbone's positions no longer line up with the labels; "
                "NTL does not support it (LoRA and other adapters are fine)"
            )
        sizes = {}
        for what, getter in (("tensor", "get_tp_size"), ("context", "get_cp_size"),
                             ("sequence", "get_sp_size")):
            get: Callable[[], int] | None = getattr(self, getter, None)
            sizes[what] = int(get()) if callable(get) else 1
        over = [f"{k} parallel size {v}" for k, v in sizes.items() if v > 1]
        if over:
            raise ValueError(
                f"{name}: NTL does not support {', '.join(over)}: each rank's labels, hidden states "
                "and digit counts would not line up (and a vocabulary-sharded head is not gathered). "
                "Use data parallelism (DDP, FSDP2) or ZeRO-1/2"
            )
        if getattr(self.args, "n_gpu", 1) > 1:
            raise ValueError(
                f"{name}: NTL does not support nn.DataParallel (several GPUs in one process): its "
                "replicas would run the backbone hook concurrently. Launch with torchrun / accelerate "
                "launch, or make one GPU visible"
            )

    # -- the accumulation window ----------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int,
                          device: torch.device) -> tuple[list, Any]:
        """The HF loop's fetch of one optimizer step's micro-batches; also counts their
        number-token targets over all processes (``N`` of the window normaliser)."""
        batch_samples, num_items = super().get_batch_samples(  # type: ignore[misc]
            epoch_iterator, num_batches, device
        )
        count = torch.zeros((), dtype=torch.float32, device=device)
        for batch in batch_samples:
            targets, _ = sft_targets(batch)
            count = count + digit_token_mask(targets.to(device), self._ntl_vocab).sum()
        count = self.accelerator.reduce(count, reduction="sum")
        self._ntl_window = {"count": count, "left": len(batch_samples)}
        first = self._ntl_windows_seen == 0 and self.ntl_config.ntl_weight > 0
        if first and float(count) == 0 and self.accelerator.is_main_process:
            warn_everywhere(
                f"NTL: the first optimizer step's {len(batch_samples)} micro-batch(es) have no "
                "supervised digit token (labels that are number tokens, after the causal shift), "
                f"so the NTL term is 0 (ntl_weight={self.ntl_config.ntl_weight:g}). Check that the "
                "completions contain numbers and that completion_only_loss / assistant_only_loss "
                "keep them. Watch ntl/total_digits."
            )
        self._ntl_windows_seen += 1
        self._ntl_steps_unlogged += 1
        return batch_samples, num_items

    def _ntl_take_window(self) -> torch.Tensor | None:
        w = self._ntl_window
        if w is None or w["left"] <= 0:
            return None
        w["left"] -= 1
        return w["count"]

    # -- the loss -------------------------------------------------------------------------
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        cfg = self.ntl_config
        targets, seq_len = sft_targets(inputs)  # read first: Trainer.compute_loss may pop labels
        mode = "train" if self.model.training else "eval"
        out, result = self._ntl_capture.run(
            lambda: super(NTLSFTMixin, self).compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch),
            targets, start=0, transform=self._ntl_transform, grad=cfg.ntl_weight > 0,
            seq_len=seq_len, repeats="skip")
        sums = self.accelerator.reduce(result.sums, reduction="sum")
        acc = self._ntl_sums.get(mode)
        self._ntl_sums[mode] = sums if acc is None else acc + sums
        window = self._ntl_take_window() if mode == "train" else None
        if cfg.ntl_weight == 0.0:  # metrics only; the update is untouched
            return out
        loss = out[0] if return_outputs else out
        G = int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)
        if window is not None:
            D = accumulation_normalizer(window, num_processes=self.accelerator.num_processes)
            term = result.loss_sum / D.to(result.loss_sum.device)
        else:  # outside the training loop, or evaluation: the micro-batch's own mean
            term = result.loss_sum / result.sums[0].clamp(min=1.0).to(result.loss_sum.device)
            if mode == "train":
                term = term / G
        if mode == "train" and not trainer_scales_loss_for_ga(self, num_items_in_batch):
            term = term * G  # training_step divides the loss by G
        loss = loss + cfg.ntl_weight * term.to(loss.dtype)
        return (loss, *out[1:]) if return_outputs else loss

    # -- metrics --------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        self._ntl_sums.pop("eval", None)
        previous, self._ntl_eval_prefix = self._ntl_eval_prefix, metric_key_prefix
        try:
            return super().evaluate(  # type: ignore[misc]
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        finally:
            self._ntl_eval_prefix = previous

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._ntl_sums.pop(mode, None)
        if sums is not None:
            metrics = MetricSums.to_metrics(sums)
            if mode == "train":
                metrics["ntl/total_digits"] /= max(self._ntl_steps_unlogged, 1)
                self._ntl_steps_unlogged = 0
            prefix = "" if mode == "train" else f"{self._ntl_eval_prefix}_"
            logs.update({prefix + k: v for k, v in metrics.items() if not math.isnan(v)})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class NTLTrainer(NTLSFTMixin, Trainer):
    """``transformers.Trainer`` with the Number Token Loss on the supervised number tokens
    (``labels``); extra argument ``ntl_config`` (see :class:`NTLSFTMixin`). Needs no TRL."""
