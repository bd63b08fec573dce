"""NTL as a ``TrainerCallback``: gradient injection for trainers that cannot be subclassed.

A callback sees neither the batch nor the loss, so it cannot add a term to the loss.
Instead, at ``on_train_begin`` it installs two hooks on the policy:

* a forward *pre*-hook on the causal LM that records the call's ``input_ids``,
  ``attention_mask`` and ``labels`` (TRL >= 1.15 passes ``labels`` with ``-100`` outside
  the completion to its fused LM head), and a wrapper around ``generate`` that records
  the prompt width (PPO in TRL <= 1.12 passes no labels; the completion starts after the
  left-padded prompt it generated from);
* a forward hook on the backbone that, in every grad-enabled forward, computes the NTL of
  the targeted rows (:func:`ntl_trl._capture.ntl_sums_from_hidden`: inside the forward, so
  a FSDP2 head's gradient is rank-averaged) and replaces the last hidden state ``h`` with
  ``inject(h)``: the identity in the forward pass, whose backward adds
  ``S * d(ntl_weight * NTL_mb / G)/dh`` to the incoming gradient (and the matching
  gradient to the number-token rows of the LM head). ``NTL_mb`` is the mean over the
  forward's number-token targets, ``G`` the trainer's *current* gradient-accumulation count (a short last
  window divides by its own size), ``S`` the fp16 ``GradScaler``'s current scale (1 without
  one), because every other gradient of that backward carries it.

The callback needs its trainer (the scaler, ``G``, the callback list, tools): it takes the
``transformers.Trainer`` whose ``train()`` calls ``on_train_begin`` (found on the call
stack), or the one given to :meth:`NTLCallback.attach`. It then moves itself to the front
of the trainer's callbacks, so that the ``ntl/*`` metrics it adds to ``logs`` in ``on_log``
reach the reporters (W&B, TensorBoard, MLflow, ... run before user callbacks otherwise).

Refused with a ``ValueError``: a trainer that already adds NTL (``NTLTrainerMixin``) or a
second ``NTLCallback``; tools / environments / a ``rollout_func`` (their ``tool_mask`` never
reaches a forward, so digits inside tool results would get NTL: use the mixin, which
excludes them); fp16 under DeepSpeed (its loss scale is not visible); DeepSpeed ZeRO-3.
Hooks of an earlier callback on the same model (a crashed run never reaches
``on_train_end``) are removed at ``on_train_begin``; ours are removed at ``on_train_end``.

NTL runs over the model's whole number vocabulary (:func:`ntl.vocab_for_tokenizer`: the
digits ``'0'..'9'`` for a digit-level tokenizer such as Qwen2.5's, every number token
``'0'..'999'`` (``K = 1,110``) for Llama-3; an explicit ``tokenizer_or_vocab`` NumberVocab is
used as is). A tokenizer without number tokens is refused at ``on_train_begin``.

Targets are the sampled completion number tokens themselves (``all`` labels, every completion):
the callback never sees the dataset row, so it cannot know the ground truth, which
``final_answer`` targets and the "correct completions only" filter both need. With GRPO and
``steps_per_generation=1`` this gives the same update as ``NTLGRPOTrainer`` with
``NTLConfig(ntl_labels="all", correct_only=False)`` (the mixin normalises over the whole
generation batch, which is the micro-batch there). Metrics (``ntl/loss``,
``ntl/digit_accuracy`` (number-token accuracy), ``ntl/total_digits`` (number-token targets:
Llama-3's ``'123'`` counts once), ``ntl/confidence``, ``ntl/target_prob``; per
forward, summed over processes, then averaged over the forwards since the last log as TRL
averages its own metrics) are added to the training ``logs`` of ``on_log`` and to
``state.log_history[-1]``.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

import ntl
from ntl.checks import check_method, check_ntl_weight
from ntl.methods import Method
from ntl.rl.capture import last_hidden_state

from ._capture import ntl_sums_from_hidden
from ._common import MetricSums, adapter_method, resolve_model_vocab, warn_everywhere
from ._model import LMParts, find_lm_parts, replace_last_hidden_state

__all__ = ["NTLCallback"]

logger = logging.getLogger("ntl")

#: The NTLCallback whose hooks are on a causal LM (weakly keyed by the LM module).
_INSTALLED: weakref.WeakKeyDictionary[torch.nn.Module, NTLCallback] = weakref.WeakKeyDictionary()


def _calling_trainer() -> Any:
    """The nearest ``transformers.Trainer`` up the call stack (the one whose ``train()``
    is running the callback event), or None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


class _InjectLossGrad(torch.autograd.Function):
    """``y = h`` forward; backward sends ``grad_y`` to ``h`` and ``S`` (the loss scale of
    this backward) to the scalar ``aux``, so autograd also backpropagates ``S * aux``
    (built from ``h`` and the LM head) at that point."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, aux: torch.Tensor,
                loss_scale: Callable[[], float] | None) -> torch.Tensor:
        ctx.loss_scale = loss_scale
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # pyright: ignore[reportIncompatibleMethodOverride]
        s = 1.0 if ctx.loss_scale is None else float(ctx.loss_scale())
        return grad_h, torch.full((), s, dtype=torch.float32, device=grad_h.device), None


class NTLCallback(TrainerCallback):
    """Adds ``ntl_weight * NTL`` over the sampled completion number tokens by gradient injection.

    Works with HF-``Trainer``-based trainers: TRL's ``GRPOTrainer``/``RLOOTrainer`` (1.16)
    and ``trl.experimental.ppo.PPOTrainer`` (TRL <= 1.12). ``all`` labels only (see the
    module docstring: no ground truths reach a callback).

    Args:
        ntl_weight: weight of the NTL term (``>= 0``; ``0`` logs the metrics only).
        ntl_method: a registered :mod:`ntl.methods` name (``"wasserstein"``, ``"mse"``,
            ``"del"``, ``"dist2"``, ...) or a method object with its parameters
            (``ntl.methods.DIST2(tau=2.0)``, ``ntl.methods.DEL(place_weights=False)``).
        tokenizer_or_vocab: tokenizer (NTL then uses its whole number vocabulary,
            :func:`ntl.vocab_for_tokenizer`) or an :class:`ntl.NumberVocab` (used as is);
            default: the trainer's ``processing_class``.
        temperature: divides the digit logits; default ``args.temperature`` (1.0 if the
            trainer's args have none), as the trainers' log-probs do.
    """

    def __init__(self, ntl_weight: float = 0.1, ntl_method: str | Method = "wasserstein", *,
                 tokenizer_or_vocab: Any = None, temperature: float | None = None) -> None:
        ntl_weight = check_ntl_weight(ntl_weight)
        ntl_method = check_method(ntl_method, "ntl_method")
        if temperature is not None and (isinstance(temperature, bool)
                                        or not isinstance(temperature, (int, float))
                                        or not temperature > 0):
            raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
        self.ntl_weight = ntl_weight
        self.ntl_method = ntl_method
        self.tokenizer_or_vocab = tokenizer_or_vocab
        self.temperature = temperature
        self._method: Method | str = ntl_method  # bound to the tokenizer's '.' at train begin
        self._trainer: Any = None
        self._handles: list[Any] = []
        self._parts: LMParts | None = None
        self._vocab: ntl.NumberVocab | None = None
        self._transform: Any = None
        self._call: dict[str, Any] = {}
        self._prompt_len: int | None = None
        self._loss_scale: Callable[[], float] | None = None
        self._pending: list[torch.Tensor] = []
        self._logged_once = False
        self._patched_generate = False

    def attach(self, trainer: Any) -> NTLCallback:
        """Register with ``trainer`` as its first callback (explicit alternative to
        ``callbacks=[NTLCallback(...)]``); returns ``self``."""
        cbs = trainer.callback_handler.callbacks
        if self in cbs:
            cbs.remove(self)
        cbs.insert(0, self)
        self._trainer = trainer
        return self

    # -- lifecycle ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       processing_class: Any = None, **kwargs: Any) -> None:
        trainer = _calling_trainer() or self._trainer
        if trainer is None:
            raise RuntimeError(
                "NTLCallback.on_train_begin must be called by a transformers Trainer's train() "
                "(it needs the trainer's loss scaler, accumulation count and callbacks); register "
                "it with callbacks=[...] or NTLCallback(...).attach(trainer)"
            )
        self._trainer = trainer
        model = model if model is not None else trainer.model
        if model is None:
            raise ValueError("NTLCallback.on_train_begin got no model from the trainer")
        self._check_trainer(trainer, args)
        self._first_among_callbacks(trainer)
        self._remove_hooks()
        parts = find_lm_parts(model)
        earlier = _INSTALLED.get(parts.lm)
        if earlier is not None and earlier is not self:
            logger.warning("NTLCallback: removing the hooks an earlier NTLCallback left on %s "
                           "(its run did not reach on_train_end)", type(parts.lm).__name__)
            earlier._remove_hooks()
        self._parts = parts
        tok = self.tokenizer_or_vocab if self.tokenizer_or_vocab is not None else (
            processing_class if processing_class is not None else kwargs.get("tokenizer"))
        self._vocab = resolve_model_vocab(tok, parts.vocab_size)
        self._method = adapter_method(self.ntl_method, tok, self._vocab)
        t = self.temperature if self.temperature is not None else getattr(args, "temperature", 1.0)
        self._transform = parts.logit_transform(float(t))
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        enabled = getattr(scaler, "is_enabled", None)
        self._loss_scale = scaler.get_scale if scaler is not None and (
            enabled is None or enabled()) else None
        self._pending = []
        self._logged_once = False
        self._handles.append(parts.lm.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if model is not parts.lm:  # PEFT calls the LM's forward directly, bypassing its hooks
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(parts.backbone.register_forward_hook(self._inject_hook))
        lm: Any = parts.lm  # a Hugging Face model: generate() is not nn.Module's
        if callable(getattr(lm, "generate", None)) and "generate" not in vars(lm):
            original = lm.generate

            @functools.wraps(original)
            def generate(*a: Any, **kw: Any) -> Any:
                ids = kw.get("input_ids", a[0] if a else None)
                if isinstance(ids, torch.Tensor):
                    self._prompt_len = int(ids.shape[-1])
                return original(*a, **kw)

            lm.generate = generate
            self._patched_generate = True
        _INSTALLED[lm] = self
        logger.info("NTLCallback: weight=%g method=%s logits %s on %s (loss scale: %s)",
                    self.ntl_weight, self.ntl_method, self._transform, type(lm).__name__,
                    "GradScaler" if self._loss_scale is not None else "none")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hooks()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is not None and any(str(k).startswith("eval_") for k in logs):
            return  # the injection only runs in training forwards
        if not self._pending:
            return
        rows = [MetricSums.to_metrics(s) for s in self._pending]
        metrics = MetricSums.average(rows)
        total = sum(r["ntl/total_digits"] for r in rows)
        self._pending = []
        if logs is not None:
            logs.update(metrics)
        if state is not None and state.log_history:
            state.log_history[-1].update(metrics)
        if not self._logged_once and total == 0 and self.ntl_weight > 0:
            warn_everywhere(
                f"NTLCallback: no completion digit (number token) in the first {len(rows)} training "
                f"forward(s), so the NTL term is 0 (ntl_weight={self.ntl_weight:g}); check that the "
                "policy writes numbers. Watch ntl/total_digits."
            )
        self._logged_once = True

    # -- checks -------------------------------------------------------------------------
    def _check_trainer(self, trainer: Any, args: Any) -> None:
        name = type(trainer).__name__
        if hasattr(trainer, "_ntl_capture"):
            raise ValueError(f"{name} already adds NTL (NTLTrainerMixin); an NTLCallback would add it "
                             "twice. Drop the callback")
        handler = getattr(trainer, "callback_handler", None)
        others = [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, NTLCallback)
                  and cb is not self]
        if others:
            raise ValueError(f"{name} has {len(others) + 1} NTLCallbacks; each would inject NTL. "
                             "Keep one")
        for attr in ("tools", "environment_factories", "rollout_func"):
            val = getattr(trainer, attr, None)
            if attr == "environment_factories" and isinstance(val, dict):
                val = {k: v for k, v in val.items() if v is not None}
            if val:
                raise ValueError(
                    f"NTLCallback does not support {name} with {attr}: the tool/environment mask "
                    "(tool_mask, env_mask) never reaches the model's forward, so digits inside tool "
                    "or environment results would get NTL. Use NTLGRPOTrainer, which excludes them"
                )
        if getattr(args, "fp16", False) and getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                "NTLCallback does not support fp16 with DeepSpeed: DeepSpeed scales the loss "
                "internally, so the injected NTL gradient would miss the loss scale. Use bf16, or "
                "NTLGRPOTrainer (its NTL term is part of the scaled loss)"
            )

    def _first_among_callbacks(self, trainer: Any) -> None:
        cbs = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
        if not isinstance(cbs, list) or self not in cbs or cbs[0] is self:
            return
        cbs.remove(self)  # safe inside the handler's loop: the element after us stays next
        cbs.insert(0, self)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._parts is not None:
            if self._patched_generate:
                vars(self._parts.lm).pop("generate", None)
            if _INSTALLED.get(self._parts.lm) is self:
                del _INSTALLED[self._parts.lm]
        self._patched_generate = False
        self._call = {}

    # -- hooks --------------------------------------------------------------------------
    def _pre_hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        self._call = {
            "input_ids": ids,
            "attention_mask": kwargs.get("attention_mask"),
            "labels": kwargs.get("labels"),
            "shift_labels": kwargs.get("shift_labels"),
        }

    def _targets(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden rows, targets) with the causal shift: the state at ``t-1`` scores token ``t``."""
        c = self._call
        if c.get("shift_labels") is not None:
            return hidden, c["shift_labels"]
        if c.get("labels") is not None:
            return hidden[:, :-1], c["labels"][:, 1:]
        ids = c.get("input_ids")
        if not isinstance(ids, torch.Tensor) or self._prompt_len is None:
            raise RuntimeError(
                "NTLCallback cannot tell completion tokens from prompt tokens: the forward got no "
                "labels and no generate() call recorded the prompt width"
            )
        if ids.shape[:2] != hidden.shape[:2]:
            raise RuntimeError(
                f"NTLCallback: input_ids {tuple(ids.shape)} and hidden {tuple(hidden.shape)} disagree"
            )
        P = self._prompt_len
        tgt = ids[:, 1:].clone()
        tgt[:, : max(P - 1, 0)] = -100  # token t (t >= P) is predicted at t-1
        am = c.get("attention_mask")
        if isinstance(am, torch.Tensor):
            tgt = tgt.masked_fill(am[:, 1:] == 0, -100)
        return hidden[:, :-1], tgt

    def _accumulation_steps(self) -> int:
        tr = self._trainer
        g = getattr(tr, "current_gradient_accumulation_steps", None)
        if g is None:
            g = getattr(getattr(tr, "args", None), "gradient_accumulation_steps", 1)
        return max(int(g or 1), 1)

    def _inject_hook(self, module: Any, args: Any, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None
        hidden = last_hidden_state(output)
        if not hidden.requires_grad:
            return None
        parts, vocab = self._parts, self._vocab
        assert parts is not None and vocab is not None
        h, tgt = self._targets(hidden)
        self._call = {}
        grad = self.ntl_weight > 0
        with torch.set_grad_enabled(grad):
            loss_sum, sums = ntl_sums_from_hidden(parts, h, tgt.to(h.device), vocab,
                                                  method=self._method, transform=self._transform)
        acc = getattr(self._trainer, "accelerator", None)
        reported = acc.reduce(sums, reduction="sum") if acc is not None and \
            acc.num_processes > 1 else sums
        self._pending.append(reported)
        if not grad:
            return None
        mean = loss_sum / sums[0].clamp(min=1.0)  # this process's micro-batch mean
        aux = (self.ntl_weight / self._accumulation_steps()) * mean
        return replace_last_hidden_state(output, _InjectLossGrad.apply(hidden, aux, self._loss_scale))
