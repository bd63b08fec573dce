"""Number-token logits from a causal LM's last hidden state, inside the model's forward.

The one capture every adapter uses (TRL's :class:`ntl_trl._capture.HiddenNTLCapture`, verl's
fused-kernel hook in :mod:`ntl_verl.engine`). For the backbone's last hidden state ``h`` (what
the LM head multiplies), the head's weight ``W`` / bias ``b`` and the vocab's ``K`` number
tokens ``ids``::

    z = f(h @ W[ids].T + b[ids])        [..., K], fp32

with ``f`` the model's logit map (:class:`ntl.rl.logit_transform.LogitTransform`: logit scale,
final-logit soft-cap, then the sampling temperature), so ``z`` *is* the digit columns of the
model's own logits divided by the temperature, whichever path computed them. Pieces:

* :func:`hook_backbone` - a forward hook on the backbone handing each forward's last hidden
  state (:func:`last_hidden_state`) to a callback; ``W`` and ``b`` are read there, inside the
  forward, where FSDP has gathered the root unit's parameters;
* :func:`causal_slice` - the causal shift: targets ``y [B, L]`` scored by
  ``h[:, start:start+L]`` (the state at ``t - 1`` predicts token ``t``);
* :func:`digit_logits_from_head` - ``z`` above for the selected rows only (select rows
  *before* calling it: the ``[n, H] x [H, K]`` matmul runs on them alone), fp32 with autocast
  off;
* :func:`number_rows_of_param` - ``W[ids]`` of a plain or a sharded (FSDP2 ``DTensor``) head:
  only the ``K`` rows travel, the gradient is the rank average (what FSDP2's reduce-scatter
  gives every other parameter, and DDP's all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ntl  # its public digit_logits_from_hidden, looked up at call time

from ..vocab import NumberVocab
from .logit_transform import LogitTransform

__all__ = [
    "causal_slice",
    "digit_logits_from_head",
    "hook_backbone",
    "is_dtensor",
    "last_hidden_state",
    "number_rows_of_param",
]


def last_hidden_state(output: Any) -> torch.Tensor:
    """The backbone's last hidden state from its forward output (ModelOutput or tuple).

    Args:
        output: the backbone's forward output: a ``ModelOutput`` with ``last_hidden_state``,
            or a tuple whose first item is it.

    Returns:
        The ``[B, T, H]`` tensor.

    Raises:
        RuntimeError: no tensor found there.

    Example:
        >>> import torch
        >>> from ntl.rl.capture import last_hidden_state
        >>> h = torch.zeros(1, 4, 8)
        >>> last_hidden_state((h, None)) is h
        True
    """
    h = getattr(output, "last_hidden_state", None)
    if h is None and isinstance(output, (tuple, list)) and output:
        h = output[0]
    if not isinstance(h, torch.Tensor):
        raise RuntimeError(
            f"cannot read the last hidden state from a backbone output of type {type(output).__name__}"
        )
    return h


def hook_backbone(backbone: nn.Module, on_hidden: Callable[[torch.Tensor], None]) -> Any:
    """Register a forward hook on ``backbone`` calling ``on_hidden(last hidden state)`` after
    each forward (the output is left as it is).

    Args:
        backbone: the model's backbone module (what the LM head follows).
        on_hidden: called with the last hidden state (:func:`last_hidden_state`).

    Returns:
        The hook's handle (``.remove()`` it when done).

    Raises:
        TypeError: ``backbone`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ntl.rl.capture import hook_backbone
        >>> class Backbone(nn.Module):
        ...     def forward(self, x):
        ...         return (x * 2,)
        >>> backbone, seen = Backbone(), []
        >>> handle = hook_backbone(backbone, seen.append)
        >>> _ = backbone(torch.ones(1, 3, 4))
        >>> handle.remove(); seen[0].shape
        torch.Size([1, 3, 4])
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")

    def hook(_module: Any, _args: Any, output: Any) -> None:
        on_hidden(last_hidden_state(output))

    return backbone.register_forward_hook(hook)


def causal_slice(hidden: torch.Tensor, start: int, length: int, *,
                 seq_len: int | None = None) -> torch.Tensor:
    """``hidden[:, start:start+length]``: the states that score targets ``[B, length]``.

    For a causal LM the state at ``t - 1`` predicts token ``t``: targets of the completion
    tokens at positions ``P..P+L-1`` use ``start = P - 1``; SFT labels ``labels[:, 1:]``
    use ``start = 0``. ``seq_len``: the number of positions the hidden state must have (a
    forward that added or removed positions, e.g. PEFT prompt tuning's virtual tokens, would
    shift the alignment); ``RuntimeError`` otherwise, and when fewer than
    ``start + length`` positions exist.

    Args:
        hidden: ``[B, T, H]`` hidden states.
        start: the position of the state that scores the first target.
        length: ``L``, the number of targets.
        seq_len: the number of positions ``hidden`` must have (``None``: not checked).

    Returns:
        The ``[B, L, H]`` view.

    Raises:
        RuntimeError: a ``hidden`` of the wrong length (see above).

    Example:
        >>> import torch
        >>> from ntl.rl.capture import causal_slice
        >>> h = torch.arange(6.0).view(1, 6, 1)  # prompt of 4 tokens, completion of 2
        >>> causal_slice(h, start=3, length=2, seq_len=6).flatten()
        tensor([3., 4.])
    """
    if seq_len is not None and hidden.shape[1] != seq_len:
        raise RuntimeError(
            f"NTL: the backbone returned {hidden.shape[1]} positions for labels of length "
            f"{seq_len}; the forward added or removed positions (PEFT prompt learning?), "
            "so hidden states and labels no longer line up"
        )
    if start < 0 or hidden.shape[1] < start + length:
        raise RuntimeError(
            f"NTL: hidden states of {hidden.shape[1]} positions do not match {length} targets "
            f"from position {start} (start + L = {start + length})"
        )
    return hidden[:, start : start + length]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded parameter).

    Args:
        t: any object.

    Returns:
        ``True`` for a ``DTensor``.

    Example:
        >>> import torch
        >>> from ntl.rl.capture import is_dtensor
        >>> is_dtensor(torch.zeros(2)), is_dtensor(None)
        (False, False)
    """
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class _ShardedRows(torch.autograd.Function):
    """``W[ids]`` of a parameter sharded by rows (``Shard(0)`` on a 1-D mesh), all ranks alike.

    Forward: each rank writes the rows of ``ids`` it holds (``torch.chunk`` layout: rank ``r``
    holds rows ``[r c, r c + n_r)``, ``c = ceil(V / N)``) into a zero ``[K, ...]`` tensor, and one
    ``all_reduce(SUM)`` over the mesh's group completes it (each row lives on exactly one rank).
    Backward: ``g_r`` is rank ``r``'s gradient of the ``K`` rows; the local shard's gradient is
    ``(1/N) sum_r g_r`` at its own rows (one ``all_reduce(SUM)`` of ``[K, ...]``, divided by ``N``),
    zero elsewhere -- the rank average, as FSDP2's reduce-scatter gives every other parameter.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, ids: torch.Tensor, group: Any, n_rows: int,
                device: torch.device) -> torch.Tensor:
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        chunk = -(-n_rows // world)
        start = rank * chunk
        n_local = max(0, min(chunk, n_rows - start))
        if local.shape[0] != n_local:
            raise RuntimeError(
                f"NTL: the LM head's local shard has {local.shape[0]} rows, expected {n_local} (rank {rank} "
                f"of {world}, {n_rows} rows, torch.chunk layout); cannot locate the number-token rows"
            )
        ids = ids.to(device)
        owned = (ids >= start) & (ids < start + n_local)
        rel = (ids - start)[owned]
        out = torch.zeros((ids.numel(), *local.shape[1:]), dtype=local.dtype, device=device)
        out[owned] = local.detach().index_select(0, rel.to(local.device)).to(device, out.dtype)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
        ctx.save_for_backward(owned, rel)
        ctx.group, ctx.world, ctx.n_local, ctx.local_device = group, world, n_local, local.device
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        (g,) = grads
        owned, rel = ctx.saved_tensors
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM, group=ctx.group)
        g = g / ctx.world
        grad_local = torch.zeros((ctx.n_local, *g.shape[1:]), dtype=g.dtype, device=g.device)
        grad_local.index_add_(0, rel, g[owned])
        return grad_local.to(ctx.local_device), None, None, None, None


def number_rows_of_param(param: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``param[ids]`` (the LM head's number-token rows, ``[K, ...]``) on ``device``, inside the forward.

    A plain tensor is indexed. A DTensor -- a head that FSDP2 wraps as its own unit and that a
    fused LM-head forward never calls, so it is still sharded inside the model's forward -- is
    read without materialising the ``[V, H]`` weight:

    * ``Shard(0)`` on a 1-D mesh (FSDP2's layout): only the ``K`` rows travel, one
      ``all_reduce`` of ``[K, H]`` forward and one backward (:class:`_ShardedRows`);
    * any other layout: ``full_tensor(grad_placements=[Partial("avg")])`` then index (all of ``W``).

    The gradient that reaches the shard is the **average over the mesh's ranks** of each rank's
    gradient, ``(1/N) sum_r dL_r/dW[ids]``: what FSDP2's reduce-scatter does to every other
    parameter (and what the head gets when it is called as a module). A sum would make the
    head's number rows ``N`` times larger than the rest of the gradient.

    Args:
        param: the LM head's ``[V, ...]`` weight or bias (a tensor or a ``DTensor``).
        ids: ``[K]`` the number-token ids.
        device: where the rows go.

    Returns:
        ``[K, ...]`` rows, differentiable into ``param``.

    Raises:
        RuntimeError: a row-sharded local shard whose size does not fit ``torch.chunk``'s layout.

    Example:
        >>> import torch
        >>> from ntl.rl.capture import number_rows_of_param
        >>> w = torch.arange(12.0).view(6, 2)
        >>> number_rows_of_param(w, torch.tensor([4, 1]), torch.device("cpu"))
        tensor([[8., 9.],
                [2., 3.]])
    """
    if not is_dtensor(param):
        return param.index_select(0, ids.to(param.device)).to(device)
    from torch.distributed.tensor import DTensor, Partial, Shard

    assert isinstance(param, DTensor)
    mesh = param.device_mesh
    if mesh.ndim == 1 and tuple(param.placements) == (Shard(0),):
        local = param.to_local()  # differentiable: the shard's gradient comes back as Shard(0)
        return _ShardedRows.apply(local, ids, mesh.get_group(), int(param.shape[0]), device)
    full = param.full_tensor(grad_placements=[Partial("avg")] * len(param.placements))
    return full.index_select(0, ids.to(full.device)).to(device)


def digit_logits_from_head(hidden: torch.Tensor, head: nn.Module, vocab: NumberVocab,
                           transform: LogitTransform) -> torch.Tensor:
    """``f(hidden @ W[ids].T + b[ids])``: ``[..., K]`` fp32 for ``hidden [..., H]``.

    ``head`` is the LM head module (``W = head.weight``, ``b = head.bias`` if any), read now:
    call this inside the model's forward (a sharded ``DTensor`` head gives only its ``K``
    number rows, :func:`number_rows_of_param`). Autocast is off, so the small matmul runs in
    fp32 whatever the trainer's mixed precision; ``f`` is ``transform``
    (:meth:`LogitTransform.for_config` gives the model's own map). Gradients reach
    ``hidden`` and the ``K`` rows of ``W`` (and ``b``).

    Args:
        hidden: ``[..., H]`` selected hidden states.
        head: the LM head module (with ``weight`` and maybe ``bias``).
        vocab: the :class:`ntl.NumberVocab` of the number tokens.
        transform: the logit map ``f`` (:class:`ntl.rl.logit_transform.LogitTransform`).

    Returns:
        ``[..., K]`` fp32 number-token logits.

    Raises:
        TypeError: a head without a weight tensor.

    Example:
        >>> import torch, ntl
        >>> from ntl.rl.capture import digit_logits_from_head
        >>> from ntl.rl.logit_transform import LogitTransform
        >>> head = torch.nn.Linear(8, 12, bias=False)
        >>> h = torch.randn(3, 8)
        >>> vocab = ntl.DigitVocab(range(10), 12)
        >>> z = digit_logits_from_head(h, head, vocab, LogitTransform(temperature=2.0))
        >>> z.shape, torch.allclose(z, head(h)[:, :10] / 2.0, atol=1e-5)
        (torch.Size([3, 10]), True)
    """
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the LM head {type(head).__name__} has no weight tensor")
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    with torch.autocast(hidden.device.type, enabled=False):
        if is_dtensor(weight) or is_dtensor(bias):
            ids = vocab.ids(hidden.device)
            w = number_rows_of_param(weight, ids, hidden.device).float()
            b = number_rows_of_param(bias, ids, hidden.device).float() if bias is not None else None
            z = F.linear(hidden.float(), w, b)
        else:
            z = ntl.digit_logits_from_hidden(hidden.to(weight.device), weight, vocab, bias=bias)
        return transform(z)
