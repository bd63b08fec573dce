"""Finding the pieces of a causal LM that NTL needs: its backbone and its LM head.

NTL from hidden states needs the backbone's last hidden state ``h`` (what the LM
head multiplies) and the head's weight ``W`` / bias ``b``: the digit logits are
``(h @ W[ids].T + b[ids]) / T``. This module only locates modules and reads
their outputs; the math is :func:`ntl.ntl_loss_from_hidden`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "LMParts",
    "find_lm_parts",
    "last_hidden_state",
    "replace_last_hidden_state",
]


class LMParts:
    """The causal LM (``lm``), its backbone module (``backbone``) and ``lm_head``."""

    def __init__(self, lm: nn.Module, backbone: nn.Module, lm_head: nn.Module) -> None:
        self.lm, self.backbone, self.lm_head = lm, backbone, lm_head

    @property
    def weight(self) -> torch.Tensor:
        w = self.lm_head.weight
        full = getattr(w, "full_tensor", None)  # FSDP2 DTensor
        return full() if callable(full) else w

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.lm_head, "bias", None)
        full = getattr(b, "full_tensor", None)
        return full() if callable(full) else b


def _is_causal_lm(m: nn.Module) -> bool:
    get = getattr(m, "get_output_embeddings", None)
    if not callable(get):
        return False
    try:
        head = get()
    except (AttributeError, NotImplementedError):
        return False
    return isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor)


def find_lm_parts(model: nn.Module) -> LMParts:
    """Locate the causal LM inside ``model`` (PEFT, DDP and TRL's PPO policy/value wrapper
    included), its backbone (``lm.base_model``) and its LM head (``get_output_embeddings()``).

    Raises ``TypeError`` for a model without an LM head, and ``ValueError`` when the
    head's logits are not ``h @ W.T + b`` (final-logit soft-capping or a logit scale),
    since NTL from hidden states would then disagree with the trainer's log-probs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lm = None
    for m in model.modules():  # outermost first; PPO's wrapper holds .policy before .value_model
        if _is_causal_lm(m):
            lm = m
            break
    if lm is None:
        raise TypeError(
            f"{type(model).__name__} has no causal LM head (no submodule whose "
            "get_output_embeddings() returns a module with a weight)"
        )
    get_base = getattr(lm, "get_base_model", None)  # PEFT
    if callable(get_base):
        lm = get_base()
    backbone = getattr(lm, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is lm:
        raise TypeError(
            f"{type(lm).__name__} exposes no backbone (its base_model is the model itself); "
            "NTL needs the module whose output is the last hidden state"
        )
    cfg = getattr(lm, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        val = getattr(text_cfg, name, None)
        if val is not None and not (name != "final_logit_softcapping" and float(val) == 1.0):
            raise ValueError(
                f"{type(lm).__name__} has config.{name}={val!r}: its logits are not h @ W.T + b, "
                "which NTL from hidden states assumes"
            )
    head = lm.get_output_embeddings()
    if hasattr(head, "base_layer"):  # PEFT adapter on the LM head: W alone is not the head
        raise ValueError(
            "the LM head carries a PEFT adapter (lm_head in target_modules); NTL from hidden "
            "states reads lm_head.weight and would ignore it. Leave lm_head out of the adapter"
        )
    return LMParts(lm, backbone, head)


def last_hidden_state(output: Any) -> torch.Tensor:
    """The backbone's last hidden state from its forward output (ModelOutput or tuple)."""
    h = getattr(output, "last_hidden_state", None)
    if h is None and isinstance(output, (tuple, list)) and output:
        h = output[0]
    if not isinstance(h, torch.Tensor):
        raise RuntimeError(
            f"cannot read the last hidden state from a backbone output of type {type(output).__name__}"
        )
    return h


def replace_last_hidden_state(output: Any, new: torch.Tensor) -> Any:
    """Return the backbone output with its last hidden state replaced by ``new``."""
    if getattr(output, "last_hidden_state", None) is not None:
        output.last_hidden_state = new  # ModelOutput keeps attribute and key in sync
        return output
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise RuntimeError(f"cannot replace the last hidden state of a {type(output).__name__}")
