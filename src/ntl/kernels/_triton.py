"""Triton availability, interpreter detection and launch heuristics."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    # Kernels are Triton's DSL, which Triton's annotations do not describe to a type checker:
    # ``tl.constexpr`` parameters take ints and bools, ``kernel[grid]`` is typed as the
    # kernel's own signature (no ``num_warps``), ``x[:, None]`` as a constexpr index. The
    # checker sees ``triton`` and ``tl`` as dynamic (``_tl.pyi``); the kernels are tested by
    # running them (Triton's CPU interpreter, tests/kernels/test_gpu.py on a GPU).
    from . import _tl as tl  # pyright: ignore[reportMissingModuleSource] (a stub only)

    triton: Any
    HAS_TRITON: bool
else:
    try:  # Triton is a Linux-only dependency; everything else works without it.
        import triton
        import triton.language as tl

        HAS_TRITON = True
    except ImportError:  # pragma: no cover - depends on the platform
        triton = None
        tl = None
        HAS_TRITON = False

#: ``backend=`` of every entry point: Triton on CUDA (``"auto"``), or forced.
BACKENDS = ("auto", "torch", "triton")

__all__ = ["BACKENDS", "HAS_TRITON", "check_backend", "interpreting", "next_pow2", "no_double_backward",
           "require_triton", "resolve_backend", "tl", "triton"]


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:
        return False


def triton_before(version: tuple[int, int]) -> bool:
    """The installed triton is older than ``version`` (``(major, minor)``); False without
    triton or for a development build whose version does not parse."""
    if not HAS_TRITON:
        return False
    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:  # a development build: assume current
        return False
    return (major, minor) < version


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the Triton backend cannot run on these tensors."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the `triton` package (Linux only); use backend='torch'")
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and not interpreting():
        devs = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {devs}); on CPU set TRITON_INTERPRET=1 "
            "before importing ntl, or use backend='torch'"
        )


def check_backend(backend: object) -> str:
    """``backend`` is one of :data:`BACKENDS` (else a ``ValueError`` naming them)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def resolve_backend(backend: object, *tensors: torch.Tensor, method: Any = None) -> bool:
    """The one backend choice of every entry point: whether the Triton kernels run on these
    tensors. ``"auto"``: Triton on CUDA, else PyTorch; ``"torch"``: PyTorch; ``"triton"``: Triton
    (a clear ``RuntimeError`` where it cannot run). A ``method`` (:mod:`ntl.methods`) without a
    Triton branch (``code is None``) runs on PyTorch under ``"auto"`` and is a ``ValueError``
    with ``"triton"``."""
    check_backend(backend)
    if backend == "torch":
        return False
    kernel = method is None or type(method).code is not None
    if backend == "auto":
        return kernel and HAS_TRITON and all(t.is_cuda for t in tensors)
    if not kernel:
        raise ValueError(f"method {method!r} has no Triton kernel (no branch in "
                         "ntl.kernels.ntl_loss.ntl_row_math); use backend='torch' or 'auto'")
    require_triton(*tensors)
    return True


def no_double_backward(name: str) -> None:
    """Raise inside a custom ``backward`` run with ``create_graph=True`` (grad mode is on only
    then): these Functions compute first derivatives only, and silently returning a gradient
    without a graph would drop the second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: second derivatives are not supported "
                           "(backward was called with create_graph=True)")


def backward_once(ctx: Any, name: str, why: str, label: str | None = None) -> None:
    """The prologue of a backward that consumes its forward's buffers in place: first
    derivatives only (:func:`no_double_backward`) and one backward per forward
    (``RuntimeError`` naming ``label or name`` and ``why`` on a second call)."""
    no_double_backward(name)
    if getattr(ctx, "consumed", False):
        raise RuntimeError(f"{label or name}: backward can run only once per forward ({why})")
    ctx.consumed = True
