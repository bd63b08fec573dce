"""Finding the pieces of a causal LM that NTL needs: its backbone, its LM head, its logit map.

NTL from hidden states needs the backbone's last hidden state ``h`` (what the LM head
multiplies), the LM head module and the elementwise map ``f`` the model (and TRL's fused head)
applies to its logits: the digit logits are ``f(h @ W[ids].T + b[ids])`` with ``f`` an
:class:`ntl.rl.logit_transform.LogitTransform` (logit scale, soft-capping, temperature). This
module only locates modules and reads the config; the capture itself (hook, causal shift,
the head's number rows, also of a sharded head) is :mod:`ntl.rl.capture`.

Sharded heads: the adapters read ``W`` inside the model's forward (a hook on the backbone),
where FSDP2 has all-gathered the root module's parameters; the gradient then reaches the
unsharded parameter and FSDP reduce-scatters (averages) it with the trainer's own. A head
that is still a sharded ``DTensor`` there (its own FSDP group, never called as a module)
gives only its number rows, with a rank-averaged gradient (what DDP gives):
:func:`ntl.rl.capture.number_rows_of_param`. DeepSpeed ZeRO-3 is refused (see
:func:`find_lm_parts`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ntl.rl.capture import last_hidden_state  # re-exported
from ntl.rl.logit_transform import LogitTransform, logit_map_of  # logit_map_of: re-exported

__all__ = [
    "LMParts",
    "find_lm_parts",
    "last_hidden_state",
    "logit_map_of",
    "replace_last_hidden_state",
]


class LMParts:
    """The causal LM (``lm``), its backbone module, ``lm_head`` and the logit map parameters."""

    def __init__(self, lm: nn.Module, backbone: nn.Module, lm_head: nn.Module, *,
                 logit_scale: float = 1.0, softcap: float | None = None) -> None:
        self.lm, self.backbone, self.lm_head = lm, backbone, lm_head
        self.logit_scale, self.softcap = logit_scale, softcap

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (a DTensor reports its global shape)."""
        return int(cast(torch.Tensor, self.lm_head.weight).shape[0])

    def logit_transform(self, temperature: float = 1.0) -> LogitTransform:
        """The model's elementwise logit map followed by division by ``temperature``."""
        return LogitTransform(scale=self.logit_scale, softcap=self.softcap, temperature=temperature)


def _is_causal_lm(m: nn.Module) -> bool:
    get = getattr(m, "get_output_embeddings", None)
    if not callable(get):
        return False
    try:
        head = get()
    except (AttributeError, NotImplementedError):
        return False
    return isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor)


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers is a dependency of every caller
        return False
    return bool(is_deepspeed_zero3_enabled())


def find_lm_parts(model: nn.Module) -> LMParts:
    """Locate the causal LM inside ``model`` (PEFT, DDP and TRL's PPO policy/value wrapper
    included), its backbone (``lm.base_model``), its LM head (``get_output_embeddings()``)
    and its logit map (:func:`logit_map_of`).

    Raises ``TypeError`` for a model without an LM head, and ``ValueError`` for a PEFT
    adapter on the head (NTL reads ``lm_head.weight`` and would miss it) and for DeepSpeed
    ZeRO-3: there ``lm_head.weight`` has 0 elements outside its module's forward (TRL
    gathers it itself, and a gather of our own would not be reduced); use ZeRO-1/2 or FSDP2.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lm: Any = None  # a Hugging Face / PEFT causal LM: its methods are not nn.Module's
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
    head = lm.get_output_embeddings()
    if hasattr(head, "base_layer"):  # PEFT adapter on the LM head: W alone is not the head
        raise ValueError(
            "the LM head carries a PEFT adapter (lm_head in target_modules); NTL from hidden "
            "states reads lm_head.weight and would ignore it. Leave lm_head out of the adapter"
        )
    w = head.weight
    if _zero3_enabled() or hasattr(w, "ds_id") or w.numel() == 0:
        raise ValueError(
            "NTL does not support DeepSpeed ZeRO-3: lm_head.weight is partitioned "
            f"({w.numel()} elements here) outside its module's forward, which TRL's fused head "
            "bypasses, so NTL could neither read it nor have its gradient reduced. Use ZeRO-1/2, "
            "FSDP2 (accelerate's fsdp_version: 2) or DDP"
        )
    scale, softcap = logit_map_of(getattr(lm, "config", None))
    return LMParts(lm, backbone, head, logit_scale=scale, softcap=softcap)


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
