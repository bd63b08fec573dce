"""NTL as a ``TrainerCallback``: gradient injection for trainers that cannot be subclassed.

A callback sees neither the batch nor the loss, so it cannot add a term to the loss.
Instead, at ``on_train_begin`` it installs two hooks on the policy:

* a forward *pre*-hook on the causal LM that records the call's ``input_ids``,
  ``attention_mask`` and ``labels`` (TRL >= 1.15 passes ``labels`` with ``-100`` outside
  the completion to its fused LM head), and a wrapper around ``generate`` that records
  the prompt width (PPO in TRL <= 1.12 passes no labels; the completion starts after the
  left-padded prompt it generated from);
* a forward hook on the backbone that, in every grad-enabled forward, replaces the last
  hidden state ``h`` with ``inject(h)``: the identity in the forward pass, whose backward
  adds ``d(ntl_weight * NTL / G)/dh`` to the incoming gradient (and the matching gradient
  to the digit rows of the LM head), ``G = args.gradient_accumulation_steps``.

Targets are the sampled completion digits themselves (``all`` labels, every completion):
the callback never sees the dataset row, so it cannot know the ground truth, which
``final_answer`` targets and the "correct completions only" filter both need. With
GRPO this gives the same update as ``NTLGRPOTrainer`` with
``NTLConfig(ntl_labels="all", correct_only=False)``. Hooks are removed at ``on_train_end``.
Metrics (``ntl/loss``, ``ntl/digit_accuracy``, ``ntl/total_digits``, ``ntl/confidence``,
``ntl/target_prob``; per forward, then averaged over the forwards since the last log as
TRL averages its own metrics) are added to the ``logs`` of ``on_log`` and to
``state.log_history[-1]``. They are per process (not reduced across ranks).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import TrainerCallback

import ntl

from ._common import MetricSums, digit_metric_sums, resolve_model_vocab
from ._model import LMParts, find_lm_parts, last_hidden_state, replace_last_hidden_state
from .config import NTL_METHODS

__all__ = ["NTLCallback"]

logger = logging.getLogger("ntl")


class _InjectLossGrad(torch.autograd.Function):
    """``y = h`` forward; backward sends ``grad_y`` to ``h`` and 1 to the scalar ``aux``,
    so autograd also backpropagates ``aux`` (built from ``h`` and the LM head) at that point."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_h, torch.ones((), dtype=torch.float32, device=grad_h.device)


class NTLCallback(TrainerCallback):
    """Adds ``ntl_weight * NTL`` over the sampled completion digits by gradient injection.

    Works with any HF-``Trainer``-style trainer that calls ``on_train_begin`` /
    ``on_train_end``: TRL's ``GRPOTrainer``/``RLOOTrainer`` (1.16) and
    ``trl.experimental.ppo.PPOTrainer`` (TRL <= 1.12). ``all`` labels only (see the
    module docstring: no ground truths reach a callback).

    Args:
        ntl_weight: weight of the NTL term (``>= 0``).
        ntl_method: ``"wasserstein"`` or ``"mse"``.
        tokenizer_or_vocab: tokenizer or :class:`ntl.NumberVocab`; default: the trainer's
            ``processing_class``.
        temperature: divides the digit logits; default ``args.temperature`` (1.0 if the
            trainer's args have none), as the trainers' log-probs do.
    """

    def __init__(self, ntl_weight: float = 0.1, ntl_method: str = "wasserstein", *,
                 tokenizer_or_vocab: Any = None, temperature: float | None = None) -> None:
        if isinstance(ntl_weight, bool) or not isinstance(ntl_weight, (int, float)) \
                or not ntl_weight >= 0 or ntl_weight == float("inf"):
            raise ValueError(f"ntl_weight must be a finite number >= 0, got {ntl_weight!r}")
        if ntl_method not in NTL_METHODS:
            raise ValueError(f"ntl_method must be one of {NTL_METHODS}, got {ntl_method!r}")
        if temperature is not None and (isinstance(temperature, bool)
                                        or not isinstance(temperature, (int, float))
                                        or not temperature > 0):
            raise ValueError(f"temperature must be a positive number or None, got {temperature!r}")
        self.ntl_weight = float(ntl_weight)
        self.ntl_method = ntl_method
        self.tokenizer_or_vocab = tokenizer_or_vocab
        self.temperature = temperature
        self._handles: list[Any] = []
        self._parts: LMParts | None = None
        self._vocab: ntl.NumberVocab | None = None
        self._call: dict[str, Any] = {}
        self._prompt_len: int | None = None
        self._scale = 1.0
        self._T = 1.0
        self._pending: list[torch.Tensor] = []
        self._patched_generate = False

    # -- lifecycle ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       processing_class: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("NTLCallback.on_train_begin got no model from the trainer")
        self._remove_hooks()
        parts = find_lm_parts(model)
        self._parts = parts
        tok = self.tokenizer_or_vocab if self.tokenizer_or_vocab is not None else (
            processing_class if processing_class is not None else kwargs.get("tokenizer"))
        self._vocab = resolve_model_vocab(tok, parts.weight.shape[0])
        ga = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        self._scale = self.ntl_weight / ga
        t = self.temperature if self.temperature is not None else getattr(args, "temperature", 1.0)
        self._T = float(t)
        self._handles.append(parts.lm.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if model is not parts.lm:  # PEFT calls the LM's forward directly, bypassing its hooks
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(parts.backbone.register_forward_hook(self._inject_hook))
        lm = parts.lm
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
        logger.info("NTLCallback: weight=%g method=%s temperature=%g on %s", self.ntl_weight,
                    self.ntl_method, self._T, type(lm).__name__)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hooks()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not self._pending:
            return
        metrics = MetricSums.average([MetricSums.to_metrics(s) for s in self._pending])
        self._pending = []
        if logs is not None:
            logs.update(metrics)
        if state is not None and state.log_history:
            state.log_history[-1].update(metrics)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._patched_generate and self._parts is not None:
            vars(self._parts.lm).pop("generate", None)
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
        weight, bias = parts.weight, parts.bias
        loss = ntl.ntl_loss_from_hidden(h, weight, tgt, vocab, method=self.ntl_method,
                                        temperature=self._T, bias=bias)
        with torch.no_grad():
            z = ntl.digit_logits_from_hidden(h.detach(), weight.detach(), vocab, temperature=self._T,
                                             bias=None if bias is None else bias.detach())
            self._pending.append(digit_metric_sums(z, tgt, vocab, self.ntl_method))
        if self._scale == 0.0:
            return None
        return replace_last_hidden_state(output, _InjectLossGrad.apply(hidden, self._scale * loss))
