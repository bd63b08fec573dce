"""What every op takes besides tensors: one settings record, and the strict data checks.

:class:`OpSettings` is the one record of an op call's constants (Python scalars: hashable, and
a ``torch.compile`` constant), built by keyword by the front end for both ops (the standalone
loss, :mod:`.ntl_loss`; cross-entropy + NTL, :mod:`.ce_ntl`); each op reads the fields it
needs. The custom ops spread it into their schema (``*settings``) and rebuild it with
:meth:`OpSettings._make`.

:func:`check_label_values` is the data check the ops run inside themselves when
``settings.check`` is set (so strict checks never break a compiled graph); the front end's
``ntl._checks.check_values`` is the same check behind the strict-checks switch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["OpSettings", "check_label_values"]


class OpSettings(NamedTuple):
    """The constants of one op call (build it by keyword; every field has a default)."""

    method: str = "mse"  # a name registered in ntl.methods (the twin's formula, the kernel's code)
    reduction: str = "none"  # none | sum | mean
    ignore_index: int = -100
    reweigh: bool = False
    dmax: float = 0.0  # reweigh ceiling D
    sq_a: float = 0.0  # W1 distances d > 0 become sq_a + sq_b d ((0, 1): unchanged)
    sq_b: float = 1.0
    delta: float = 1.0  # the method's third scalar (Huber delta, DIST2 tau)
    ntl_weight: float = 1.0  # weight of the NTL term (cross-entropy + NTL only)
    use_triton: bool = False
    check: bool = False  # run the data checks (strict)
    hi: int = -1  # labels must be < hi (-1: no upper bound)
    hi_what: str = "logits.shape[-1]"  # where hi came from (error message)
    need_dz: bool = True  # keep dL/dz for backward (standalone loss only)

    @property
    def squash(self) -> tuple[float, float] | None:
        """``(sq_a, sq_b)``, or ``None`` where they leave the distances unchanged."""
        return None if (self.sq_a, self.sq_b) == (0.0, 1.0) else (self.sq_a, self.sq_b)


def check_label_values(labels: torch.Tensor, V: int | None, ignore_index: int,
                       weights: torch.Tensor | None, where: str = "logits.shape[-1]") -> None:
    """Label range and weight sign: one host read of a 3-element tensor.

    ``V`` is the upper bound of the token ids (``None``: unknown, only negatives are errors);
    ``where`` says where ``V`` came from, for the message.
    """
    if labels.numel() == 0:
        return
    inside = labels.clamp(0, V - 1) if V is not None else labels.clamp_min(0)
    bad_label = ((inside != labels) & (labels != ignore_index)).any()
    if weights is not None and weights.dtype != torch.bool:
        bad_label, negw = torch.stack([bad_label, (~(weights >= 0)).any()]).tolist()  # NaN too
    else:
        bad_label, negw = bool(bad_label), False
    if bad_label:  # report the range of the offending labels only
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V if V is not None else False))
        lo, hi = (int(t) for t in torch.aminmax(labels[bad]))
        if V is None:
            raise ValueError(
                f"labels must be token ids >= 0 or ignore_index={ignore_index}; got values in "
                f"[{lo}, {hi}] outside that"
            )
        raise ValueError(
            f"labels must be token ids in [0, V={V}) or ignore_index={ignore_index}; "
            f"got values in [{lo}, {hi}] outside that (V is {where})"
        )
    if negw:
        raise ValueError("weights must be >= 0 (and not NaN)")
