"""Input validation shared by every public entry point.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, wrong value) with a message naming the argument and the shapes involved.
The data-dependent checks (label range, negative or NaN weights) read a three-element
tensor back to the host once per call (a ``target_dist`` adds one more read, of two flags); :func:`set_strict_checks` turns them off
(e.g. under CUDA graphs). The standalone losses run them inside their custom op,
so they never break a ``torch.compile`` graph.
"""

from __future__ import annotations

from typing import overload

import torch

from . import methods as _methods
from .kernels._triton import BACKENDS as _BACKENDS
from .kernels._triton import check_backend as check_backend
from .kernels.settings import check_label_values
from .vocab import NumberVocab

__all__ = ["set_strict_checks"]

_STRICT = True
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = _BACKENDS  # backend= of every entry point (defined once, beside the kernels)
METHODS = _methods.REGISTRY  # the registered loss methods (name -> ntl.methods.Method class)


def set_strict_checks(enabled: bool) -> None:
    """Enable/disable the data-dependent checks (label range, weight sign; default: enabled).

    Off, no loss reads anything back to the host: the CUDA forward is sync-free and can be
    captured in a CUDA graph, on every device. Out-of-range labels then take no part
    (as text tokens do) instead of raising.

    Args:
        enabled: ``True`` to check (the default state), ``False`` to skip the checks.

    Returns:
        None (a process-wide setting).

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> ntl.set_strict_checks(False)
        >>> ntl.ntl_loss(torch.zeros(2, 12), torch.tensor([3, 99]), vocab)  # 99 >= V: no part
        tensor(2.7000)
        >>> ntl.set_strict_checks(True)
    """
    global _STRICT
    if not isinstance(enabled, bool):
        raise TypeError(f"set_strict_checks takes True or False, got {enabled!r}")
    _STRICT = enabled


def strict_checks() -> bool:
    """Whether the data-dependent checks are on (:func:`set_strict_checks`)."""
    return _STRICT


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


@overload
def check_method(method: str, name: str = "method") -> str: ...
@overload
def check_method(method: _methods.Method, name: str = "method") -> _methods.Method: ...
@overload
def check_method(method: object, name: str = "method") -> str | _methods.Method: ...
def check_method(method: object, name: str = "method") -> str | _methods.Method:
    """A registered loss method (:data:`ntl.methods.REGISTRY`): a name or alias returns the
    canonical name (``"w1"`` -> ``"wasserstein"``), a registered :class:`ntl.methods.Method`
    object returns itself; anything else is a ``ValueError`` naming the choices."""
    if isinstance(method, _methods.Method):
        return _methods.resolve(method, name=name)
    return _methods.canonical_name(method, name)


def check_logits(logits: object, name: str = "logits", dim: str = "V") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., {dim}] with {dim} > 0, got {tuple(logits.shape)}")
    return logits


def check_labels(labels: object, expected_shape: torch.Size, device: torch.device,
                 name: str = "labels", what: str = "logits.shape[:-1]") -> torch.Tensor:
    """``what`` names the tensor the labels must match, e.g. ``"hidden.shape[:-1]"``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(
            f"{name} shape {tuple(labels.shape)} does not match {what} {tuple(expected_shape)}"
        )
    if labels.device != device:
        other = what.split(".")[0]
        verb = "are" if other.endswith("s") else "is"
        raise ValueError(f"{name} is on {labels.device} but {other} {verb} on {device}")
    return labels


def check_vocab_fits(vocab: NumberVocab, V: int) -> None:
    check_ids_fit(max(vocab.token_ids), vocab.vocab_size, V)


def check_ids_fit(max_id: int, vocab_size: int, V: int) -> None:
    """The vocab (largest number id ``max_id``, built for ``vocab_size``) fits ``V`` logits."""
    if max_id >= V:
        raise ValueError(
            f"the number vocab has token id {max_id} but logits have only V={V} "
            "columns (vocab larger than the logits)"
        )
    if vocab_size > V:
        raise ValueError(
            f"the number vocab was built for vocab_size={vocab_size} but logits have "
            f"V={V} columns (vocab larger than the logits)"
        )


def check_weights(weights: object, labels: torch.Tensor) -> torch.Tensor | None:
    """``weights`` shaped like ``labels``: bool, integer (e.g. an attention mask) or float; returned
    as given (consumers read them as fp32)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if weights.shape != labels.shape:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} does not match labels shape {tuple(labels.shape)}"
        )
    if weights.device != labels.device:
        raise ValueError(f"weights are on {weights.device} but labels are on {labels.device}")
    if weights.dtype.is_complex:
        raise TypeError(f"weights must be a real (bool, integer or float) tensor, got {weights.dtype}")
    return weights


def check_bias(bias: object, V: int, hidden: torch.Tensor, same_dtype: bool = False) -> None:
    """``bias`` is ``None`` or a float ``[V]`` tensor on ``hidden``'s device (and dtype)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError("bias must be a float tensor of shape [V] or None, got "
                        + (str(bias.dtype) if isinstance(bias, torch.Tensor) else type(bias).__name__))
    if bias.shape != (V,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be [V={V}]")
    if bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if same_dtype and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")


def check_head(hidden: object, weight: object, bias: object, *, name: str = "weight",
               same_dtype: bool = False) -> int:
    """``hidden [..., H]``, an LM head ``weight [V, H]`` (``V > 0``) on ``hidden``'s device and a
    ``bias`` as :func:`check_bias`; ``same_dtype``: one dtype for all three (``hidden @ weight.T``
    in that dtype). Returns ``V``."""
    hidden = check_logits(hidden, "hidden", dim="H")
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.dim() != 2:
        raise TypeError(f"{name} must be a 2-D float tensor [V, H], got "
                        + (f"{weight.dtype} of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
                           else type(weight).__name__))
    H = hidden.shape[-1]
    if weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"{name} shape {tuple(weight.shape)} does not match hidden size {H} "
                         f"(hidden shape {tuple(hidden.shape)}); expected [V, {H}] with V > 0")
    if weight.device != hidden.device:
        raise ValueError(f"{name} is on {weight.device} but hidden is on {hidden.device}")
    if same_dtype and weight.dtype != hidden.dtype:
        raise TypeError(f"{name} dtype {weight.dtype} differs from hidden dtype {hidden.dtype} "
                        f"(hidden @ {name}.T needs one dtype; cast one of them)")
    check_bias(bias, weight.shape[0], hidden, same_dtype=same_dtype)
    return weight.shape[0]


def check_ntl_weight(w: object, name: str = "ntl_weight") -> float:
    """``ntl_weight``: a finite Python number ``>= 0`` (not a tensor: it is a constant of the graph)."""
    if isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a Python number >= 0, got a tensor ({w!r}); pass float(w)")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0 and w != float("inf")):
        raise ValueError(f"{name} must be a finite non-negative number, got {w!r}")
    return float(w)


def check_ignore_index(ignore_index: object) -> int:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_values(labels: torch.Tensor, V: int | None, ignore_index: int,
                 weights: torch.Tensor | None, where: str = "logits.shape[-1]") -> None:
    """Label range and weight sign: one host read of a 3-element tensor (none with strict checks off).

    ``V`` is the upper bound of the token ids (``None``: unknown, only negatives are errors);
    ``where`` says where ``V`` came from, for the message.
    """
    if not _STRICT:
        return
    check_label_values(labels, V, ignore_index, weights, where)


def check_grad_scale(grad_scale: object, device: torch.device) -> float | torch.Tensor | None:
    """``grad_scale``: ``None``, a finite non-zero number, or a 0-d (or one-element) float tensor
    on ``device`` (its value is checked, one host read, with strict checks on and outside
    ``torch.compile`` only)."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, torch.Tensor):
        if not grad_scale.dtype.is_floating_point or grad_scale.numel() != 1:
            raise TypeError("grad_scale must be a number or a one-element float tensor, got a "
                            f"{grad_scale.dtype} tensor of shape {tuple(grad_scale.shape)}")
        if grad_scale.device != device:
            raise ValueError(f"grad_scale is on {grad_scale.device} but the logits are on {device}")
        gs = grad_scale.detach().reshape(()).float()
        if (strict_checks() and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(gs) & (gs != 0))):
            raise ValueError(f"grad_scale must be finite and non-zero, got {float(gs)}")
        return gs
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not (
            grad_scale != 0 and abs(grad_scale) != float("inf") and grad_scale == grad_scale):
        raise ValueError(f"grad_scale must be a finite non-zero number or a tensor, got {grad_scale!r}")
    return float(grad_scale)
