"""NTL inside the model's forward: number-token logits from the backbone's last hidden state.

Shared by every route of the adapter (GRPO/RLOO mixin, gradient-injection callback, and
trainers built on them). For hidden states ``h [B, T, H]`` and number-token targets ``y``
aligned with ``h[:, start:start+L]`` (token ids; ``-100`` or any non-number token where NTL
does not apply), over the vocab's ``K`` number tokens ``ids`` (the ten digits of a
digit-level tokenizer, Llama-3's 1,110 tokens ``'0'..'999'``):

1. only the ``n`` rows with a number-token target are selected, *before* the
   ``[n, H] x [H, K]`` matmul (no fp32 copy of the other rows is made or saved);
2. ``z = f(h_sel @ W[ids].T + b[ids])`` (:func:`ntl.rl.capture.digit_logits_from_head`: the
   model's :class:`~ntl.rl.logit_transform.LogitTransform` ``f``, i.e. logit scale, soft-cap,
   temperature), in fp32 with autocast off, with ``W, b`` read inside the forward (so FSDP2
   reduces their gradient; a sharded head gives its number rows only);
3. ``sum_i NTL_i`` (:func:`ntl.ntl_loss_from_digit_logits`, ``reduction="sum"``) and the
   metric sums from the *same* ``z``.

:class:`HiddenNTLCapture` is a forward hook on the backbone that runs these steps while
armed with the targets of the next forward(s); the caller divides the sum by its
normaliser and adds it to its loss. The hook, the causal shift and the digit logits are
:mod:`ntl.rl.capture`'s (shared with verl's adapter); this module adds the arming, the row
bookkeeping and the loss and metric sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import ntl
from ntl.methods import Method
from ntl.rl.capture import causal_slice, digit_logits_from_head, hook_backbone
from ntl.rl.logit_transform import LogitTransform
from ntl.rl.targets import digit_token_mask

from ._common import ntl_sums_from_digit_logits, place_weights_of
from ._model import LMParts

__all__ = ["CaptureResult", "HiddenNTLCapture", "digit_logits_for_rows", "ntl_sums_from_hidden"]


def digit_logits_for_rows(parts: LMParts, rows: torch.Tensor, vocab: ntl.NumberVocab,
                          transform: LogitTransform) -> torch.Tensor:
    """``f(rows @ W[ids].T + b[ids])``: ``[n, K]`` fp32 for hidden ``rows [n, H]``
    (:func:`ntl.rl.capture.digit_logits_from_head` on ``parts.lm_head``).

    Call inside the model's forward (sharded heads, see :mod:`ntl_trl._model`). Autocast
    is off, so the small matmul runs in fp32 whatever the trainer's mixed precision."""
    return digit_logits_from_head(rows, parts.lm_head, vocab, transform)


def ntl_sums_from_hidden(parts: LMParts, hidden: torch.Tensor, targets: torch.Tensor,
                         vocab: ntl.NumberVocab, *, method: str | Method,
                         transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i NTL_i, metric sums)`` over the positions of ``targets`` that hold a number
    token, for ``hidden [..., H]`` aligned with ``targets [...]`` (module docstring).

    The loss sum is fp32 and connected to the graph (0 with no target, still
    differentiable); the metric sums ``[n, n*loss, n*accuracy, n*confidence,
    n*target_prob]`` are detached (:func:`ntl_trl._common.digit_metric_sums`)."""
    if hidden.shape[:-1] != targets.shape:
        raise RuntimeError(
            f"NTL: hidden states {tuple(hidden.shape)} do not match the number-token targets "
            f"{tuple(targets.shape)}; the trainer's forward changed the sequence"
        )
    sel = digit_token_mask(targets, vocab)
    place = place_weights_of(targets, vocab, method)  # DEL: from the whole rows, before selecting
    rows, tgt = hidden[sel], targets[sel]  # only the targeted rows (one host sync)
    z = digit_logits_for_rows(parts, rows, vocab, transform)
    return ntl_sums_from_digit_logits(z, tgt, vocab, method, None if place is None else place[sel])


@dataclass
class CaptureResult:
    """What an armed :class:`HiddenNTLCapture` computed.

    Attributes:
        loss_sum: ``sum_i NTL_i`` over every targeted position (0-dim fp32; in the graph
            when armed with ``grad=True``).
        sums: ``[n, n*loss, n*accuracy, n*confidence, n*target_prob]`` (this process).
        forwards: backbone forwards seen while armed.
    """

    loss_sum: torch.Tensor
    sums: torch.Tensor
    forwards: int


class HiddenNTLCapture:
    """Forward hook on ``parts.backbone`` computing NTL from the last hidden state while armed.

    ``arm(targets, start)`` declares that the next forward(s) score ``targets [B, L]``
    with ``hidden[:, start:start+L]`` (for a causal LM the state at ``t-1`` predicts token
    ``t``: GRPO's completion token ``t`` sits at ``P+t``, so ``start = P-1``; SFT labels
    ``labels[:, 1:]`` use ``start = 0``). Forwards that split the batch into row chunks are
    consumed in order. ``disarm()`` returns the :class:`CaptureResult` and checks that
    every row was seen. Outside ``arm``/``disarm`` the hook does nothing.

    Two checks are optional (``arm`` keywords): ``seq_len`` requires every armed forward's
    hidden state to have exactly that many positions (SFT: the labels' length, so a forward
    that adds positions, e.g. PEFT prompt tuning's virtual tokens, is an error rather than a
    shifted alignment); ``repeats="skip"`` ignores forwards run *without gradient* after
    every armed row was scored (trainers that re-run the same batch for metrics or logits,
    as TRL's ``SFTTrainer`` does with ``compute_loss_func``, label smoothing and
    ``return_outputs``). A further forward with gradient is always an error.
    """

    def __init__(self, parts: LMParts, vocab: ntl.NumberVocab, *, method: str | Method) -> None:
        self.parts, self.vocab, self.method = parts, vocab, method
        self._plan: dict[str, Any] | None = None
        self.handle = hook_backbone(parts.backbone, self._hook)

    def arm(self, targets: torch.Tensor, *, start: int, transform: LogitTransform,
            grad: bool = True, seq_len: int | None = None, repeats: str = "error") -> None:
        if targets.dim() != 2:
            raise ValueError(f"targets must be [B, L], got shape {tuple(targets.shape)}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if seq_len is not None and seq_len < start + targets.shape[1]:
            raise ValueError(f"seq_len={seq_len} is shorter than start + L = {start + targets.shape[1]}")
        if repeats not in ("error", "skip"):
            raise ValueError(f"repeats must be 'error' or 'skip', got {repeats!r}")
        self._plan = {"targets": targets, "start": start, "transform": transform, "grad": grad,
                      "seq_len": seq_len, "repeats": repeats,
                      "row": 0, "forwards": 0, "loss": [], "sums": []}

    def disarm(self) -> CaptureResult:
        plan, self._plan = self._plan, None
        if plan is None:
            raise RuntimeError("HiddenNTLCapture.disarm() without arm()")
        B = plan["targets"].shape[0]
        if plan["forwards"] == 0:
            raise RuntimeError(
                "NTL: the backbone forward hook did not fire while armed; the trainer did not run "
                f"{type(self.parts.backbone).__name__} (is this a TRL GRPO/RLOO-style trainer?)"
            )
        if plan["row"] != B:
            raise RuntimeError(f"NTL: the armed forwards covered {plan['row']} of {B} rows")
        loss = torch.stack(plan["loss"]).sum() if len(plan["loss"]) > 1 else plan["loss"][0]
        sums = torch.stack(plan["sums"]).sum(0)
        return CaptureResult(loss, sums, plan["forwards"])

    def cancel(self) -> None:
        """Drop an armed plan without a result (the armed step failed)."""
        self._plan = None

    def run(self, call: Callable[[], Any], targets: torch.Tensor, **arm_kwargs: Any) -> tuple[Any, CaptureResult]:
        """``arm(targets, **arm_kwargs)``, ``call()`` (the trainer's own forward), ``disarm()``:
        ``(call's result, the capture's result)``; a failing ``call`` leaves nothing armed."""
        self.arm(targets, **arm_kwargs)
        try:
            out = call()
        except BaseException:
            self.cancel()
            raise
        return out, self.disarm()

    def remove(self) -> None:
        self._plan = None
        self.handle.remove()

    def _hook(self, hidden: torch.Tensor) -> None:
        plan = self._plan
        if plan is None:
            return
        r0, b = plan["row"], hidden.shape[0]
        if r0 == plan["targets"].shape[0] and plan["repeats"] == "skip" and not torch.is_grad_enabled():
            return  # the trainer re-runs the scored batch without gradient (metrics, logits)
        if plan["seq_len"] is not None:
            causal_slice(hidden, 0, 0, seq_len=plan["seq_len"])  # the length check, first
        tg = plan["targets"][r0 : r0 + b]
        if tg.shape[0] != b:
            raise RuntimeError(
                f"NTL: a forward of {b} rows while only {tg.shape[0]} of the armed "
                f"{plan['targets'].shape[0]} rows are left; another forward ran through the backbone"
            )
        h = causal_slice(hidden, plan["start"], tg.shape[1])
        with torch.set_grad_enabled(plan["grad"] and torch.is_grad_enabled()):
            loss, sums = ntl_sums_from_hidden(self.parts, h, tg.to(hidden.device), self.vocab,
                                              method=self.method, transform=plan["transform"])
        plan["loss"].append(loss)
        plan["sums"].append(sums)
        plan["row"] += b
        plan["forwards"] += 1
