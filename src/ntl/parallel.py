"""Vocab-parallel NTL: the loss of tensor-parallel logit shards with one small collective.

Under tensor parallelism with a vocab-parallel LM head (Megatron's ``ColumnParallelLinear``
output layer) rank ``r`` of the group holds the logit columns ``[s_r, s_r + V_r)`` of the
vocabulary (or the LM-head weight rows ``W[s_r : s_r + V_r]``). NTL's softmax is over the
``K`` number tokens ``i_0 .. i_{K-1}`` (value order) only, so it needs just those ``K``
columns, from whichever shards hold them::

    P_r[n, k] = x_r[n, i_k - s_r]   if s_r <= i_k < s_r + V_r,   else 0      ([N, K] on rank r)
    z         = sum_r P_r                                         (one all_reduce of N x K fp32)
    L         = NTL(z, y)                                         (the same value on every rank)

(from hidden states, ``x_r[n, j] = (h_n . W_r[j] + b_r[j]) / T``, computed for the number
rows only). The backward of the all_reduce is the identity (``z`` and the labels are the
same on every rank, so every rank holds the same ``G = dL/dz``), and each rank scatters
``G`` into its own columns::

    dL/dx_r[n, i_k - s_r] = G[n, k]   for the number tokens rank r holds, 0 for its other columns

so each shard's gradient is exactly the matching columns of the unsharded gradient (their
sum over ranks, zero-padded to ``V``, is the unsharded gradient). From hidden states the
local contribution ``dL/dh |_r = G[:, k in r] W_r[rows] / T`` is returned; its sum over
ranks is the unsharded ``dL/dh`` (see :func:`vocab_parallel_ntl_loss_from_hidden`).

``group=None`` means the default process group when ``torch.distributed`` is initialised,
and a world of one (no collective; the shard must then be the whole vocabulary) when it is
not. See docs/vocab-parallel.md.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import _checks as C
from ._docs import shared_docs
from .hidden import _check_head, ntl_loss_from_digit_logits
from .losses import bind_decimal_point, resolve_method
from .vocab import NumberVocab, VocabLike, resolve_vocab

__all__ = ["vocab_parallel_ntl_loss", "vocab_parallel_ntl_loss_from_hidden"]


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` in forward, the identity in backward (Megatron's
    ``reduce_from_tensor_model_parallel_region``): the summed tensor feeds a loss that every
    rank computes identically, so each rank's partial receives the same ``dL/dz`` unchanged.
    (``torch.distributed.nn.all_reduce`` would all-reduce the gradient too: ``world x`` it.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _world(group: Any) -> tuple[int, int, bool]:
    """``(rank, world size, distributed)`` of ``group`` (see the module docstring for ``None``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                f"group={group!r} was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first, or pass group=None for a world of one")
        return 0, 1, False
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, world, world > 1


def _global_width(vocab_start: Any, V_local: int, vocab_size: Any, rank: int, world: int) -> int:
    """The global vocabulary width (sum of the shard widths), with the local shard checks."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if vocab_size is None:
        if vocab_start != rank * V_local:
            raise ValueError(
                f"rank {rank} of {world} holds V_local={V_local} columns starting at vocab_start="
                f"{vocab_start}, but equal shards (the default, as Megatron pads the vocabulary to a "
                f"multiple of the tensor-parallel size) start at rank * V_local = {rank * V_local}; "
                "for uneven shards pass vocab_size= (the sum of the shard widths)")
        return V_local * world
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int (the sum of the shard widths) or None, "
                         f"got {vocab_size!r}")
    if vocab_start + V_local > vocab_size:
        raise ValueError(
            f"the shard [vocab_start={vocab_start}, {vocab_start + V_local}) ends beyond "
            f"vocab_size={vocab_size} (the sum of the shard widths)")
    if world == 1 and (vocab_start != 0 or V_local != vocab_size):
        raise ValueError(
            f"a world of one must hold the whole vocabulary [0, {vocab_size}), got the shard "
            f"[{vocab_start}, {vocab_start + V_local})")
    return vocab_size


def _resolve(vocab_or_tokenizer: VocabLike, V: int, how: str) -> NumberVocab:
    """The number vocab (as :func:`ntl.ntl_loss` resolves it for ``V`` logits), which must fit ``V``."""
    vocab = resolve_vocab(vocab_or_tokenizer, None, default_size=V)
    max_id = max(vocab.token_ids)
    if max_id >= V:
        raise ValueError(f"the number vocab has token id {max_id} but the shards hold only "
                         f"V={V} columns ({how})")
    if vocab.vocab_size > V:
        raise ValueError(f"the number vocab was built for vocab_size={vocab.vocab_size} but the "
                         f"shards hold only V={V} columns ({how})")
    return vocab


def _how(vocab_size: int | None, V_local: int, world: int) -> str:
    if vocab_size is not None:
        return "vocab_size=, the sum of the shard widths"
    return f"V_local={V_local} x world size {world}, equal shards; pass vocab_size= for uneven ones"


@functools.lru_cache(maxsize=64)
def _local_index(vocab: NumberVocab, start: int, end: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ks, cols, owned)``: the vocab positions ``k`` whose id lies in ``[start, end)``, their
    local columns ``id_k - start``, and the ``[K]`` fp32 row with 1 at those ``k``."""
    ks = [k for k, i in enumerate(vocab.token_ids) if start <= i < end]
    cols = [vocab.token_ids[k] - start for k in ks]
    owned = torch.zeros(vocab.K, dtype=torch.float32, device=device)
    k_t = torch.tensor(ks, dtype=torch.long, device=device)
    owned[k_t] = 1.0
    return k_t, torch.tensor(cols, dtype=torch.long, device=device), owned


def _assemble(z_local: torch.Tensor, ks: torch.Tensor, owned: torch.Tensor, vocab: NumberVocab,
              group: Any, distributed: bool) -> torch.Tensor:
    """``z = sum_r P_r`` from this rank's ``[N, K_local]`` fp32 number logits: one all_reduce of
    ``[N + 1, K]`` (the last row counts the shards holding each number token)."""
    N, K = z_local.shape[0], vocab.K
    part = z_local.new_zeros(N, K).index_copy(1, ks, z_local)
    if not distributed:  # a world of one holds the whole vocabulary (checked by the caller)
        return part
    full = cast(torch.Tensor, _SumOverRanks.apply(torch.cat([part, owned[None]]), group))
    if C.strict_checks() and not torch.compiler.is_compiling():
        count = full[N].detach()
        if bool(count.ne(1).any()):  # the same on every rank: every rank raises, none hangs
            c = count.tolist()
            none = sorted(i for i, n in zip(vocab.token_ids, c, strict=True) if n == 0)
            many = sorted(i for i, n in zip(vocab.token_ids, c, strict=True) if n > 1)
            raise ValueError(
                "the vocab-parallel shards do not hold each number token exactly once: "
                + (f"no shard holds token ids {none[:8]}" if none else "")
                + ("; " if none and many else "")
                + (f"several shards hold token ids {many[:8]}" if many else "")
                + " (each rank's [vocab_start, vocab_start + V_local) must tile [0, V))")
    return full[:N]


@shared_docs
def vocab_parallel_ntl_loss(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    vocab_start: int,
    group: Any = None,
    vocab_size: int | None = None,
    method: str = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    target_dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL of vocab-parallel logits: this rank's columns ``[vocab_start, vocab_start + V_local)``.

    Equals ``ntl.ntl_loss(full_logits, labels, vocab, ...)`` on every rank, where
    ``full_logits`` concatenates the shards of all ranks of ``group``. Each rank gathers the
    number columns it holds into an ``[N, K]`` fp32 buffer (zeros elsewhere); one
    ``all_reduce(SUM)`` of ``(N + 1) x K`` floats (the extra row counts the shards holding each
    number token: with strict checks on, a token held by no shard or by several is a
    ``ValueError`` on every rank) gives the number logits ``z``, then
    :func:`ntl.ntl_loss_from_digit_logits` computes the loss (formulas and reductions as in
    :func:`ntl.ntl_loss`). Backward: no collective; ``dL/dlogits_shard`` is the matching
    columns of the unsharded gradient (zero off the number columns)::

        z[n, k] = sum_r [s_r <= i_k < s_r + V_r] * logits_r[n, i_k - s_r]
        dL/dlogits_r[n, i_k - s_r] = dL/dz[n, k]

    Args:
        logits_shard: ``[..., V_local]`` this rank's logit columns (fp32/bf16/fp16).
        labels: ``[...]`` global token ids, the same on every rank (as Megatron has them).
        vocab_or_tokenizer: the number vocab (global ids), as for :func:`ntl.ntl_loss`.
        {vocab_start}
        group: the tensor-parallel process group; ``None``: the default group when
            ``torch.distributed`` is initialised, else a world of one (the shard is then the
            whole vocabulary).
        vocab_size: the global width ``V`` (sum of the shard widths). ``None``: equal shards
            (Megatron's), ``V = V_local * world`` and ``vocab_start`` must be
            ``rank * V_local``.
        {method} The same on every rank (as every argument).
        {ignore_index}
        {reduction}
        {weights}
        {target_dist}
        {backend}

    Returns:
        fp32 loss (scalar, or ``labels``-shaped for ``reduction="none"``), the same on every rank.

    Raises:
        ValueError: only local checks raise before the collective (a rank that raises there
            leaves its peers waiting in the all_reduce, as any collective does):
            ``vocab_start`` negative or not ``rank * V_local`` for equal shards, a shard ending
            beyond ``vocab_size``, number ids ``>= V``, a world of one without the whole
            vocabulary; after it, on every rank, a number token held by no shard or by several
            (strict checks).

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.randn(4, 12), torch.tensor([3, 7, 11, 0])
        >>> loss = ntl.vocab_parallel_ntl_loss(logits, labels, vocab, vocab_start=0)  # one rank
        >>> torch.allclose(loss, ntl.ntl_loss(logits, labels, vocab))
        True
    """
    C.check_logits(logits_shard, "logits_shard", dim="V_local")
    labels = C.check_labels(labels, logits_shard.shape[:-1], logits_shard.device,
                            what="logits_shard.shape[:-1]")
    rank, world, distributed = _world(group)
    V_local = logits_shard.shape[-1]
    V = _global_width(vocab_start, V_local, vocab_size, rank, world)
    vocab = _resolve(vocab_or_tokenizer, V, _how(vocab_size, V_local, world))
    ks, cols, owned = _local_index(vocab, vocab_start, vocab_start + V_local, logits_shard.device)
    z_local = logits_shard.reshape(-1, V_local).index_select(1, cols).float()
    z = _assemble(z_local, ks, owned, vocab, group, distributed)
    return ntl_loss_from_digit_logits(
        z.view(*labels.shape, vocab.K), labels, vocab,
        method=bind_decimal_point(resolve_method(method), vocab_or_tokenizer), ignore_index=ignore_index,
        reduction=reduction, weights=weights, target_dist=target_dist, vocab_size=V, backend=backend)


@shared_docs
def vocab_parallel_ntl_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_or_tokenizer: VocabLike,
    *,
    vocab_start: int,
    group: Any = None,
    vocab_size: int | None = None,
    bias_shard: torch.Tensor | None = None,
    temperature: float = 1.0,
    method: str = "wasserstein",
    ignore_index: int = -100,
    reduction: str = "mean",
    weights: torch.Tensor | None = None,
    target_dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTL from hidden states and this rank's rows of a vocab-parallel LM head, no logits at all.

    Equals ``ntl.ntl_loss_from_hidden(hidden, W, labels, vocab, bias=b, temperature=T, ...)``
    on every rank, ``W`` (``b``) being the shards of all ranks concatenated. Each rank computes
    ``(h @ W_shard[rows].T + b_shard[rows]) / T`` for the number rows it holds only
    (``[N, K_local]``, fp32), then as :func:`vocab_parallel_ntl_loss` (one all_reduce of
    ``(N + 1) x K`` floats). Gradients, with ``G = dL/dz``::

        dL/dW_shard[i_k - s] = G[:, k].T @ h / T      (the number rows this rank holds; 0 elsewhere)
        dL/dhidden |_rank    = G[:, k in rank] @ W_shard[rows] / T

    ``hidden.grad`` is this rank's **local contribution**; the sum over the ranks is the
    unsharded ``dL/dhidden``. That is Megatron's convention for the input of a column-parallel
    layer: pass the tensor the LM head consumes inside the tensor-parallel region, e.g.
    ``copy_to_tensor_model_parallel_region(hidden)`` (whose backward all-reduces the input
    gradient) or the output of ``gather_from_sequence_parallel_region`` under sequence
    parallelism (whose backward reduce-scatters it). A ``hidden`` outside such a region gets
    only the local part.

    Args:
        {hidden} The same on every rank.
        lm_head_weight_shard: ``[V_local, H]`` this rank's rows
            ``[vocab_start, vocab_start + V_local)``.
        {labels} Global ids, the same on every rank.
        vocab_or_tokenizer: the number vocab (global ids), as for :func:`ntl.ntl_loss`.
        {vocab_start}
        {group}
        vocab_size: the global width ``V``, as for :func:`vocab_parallel_ntl_loss`.
        bias_shard: optional ``[V_local]`` bias of those rows.
        {temperature}
        {method}
        {ignore_index}
        {reduction}
        {weights}
        {target_dist}
        {backend}

    Returns:
        fp32 loss (scalar, or ``labels``-shaped for ``reduction="none"``), the same on every rank.

    Raises:
        ValueError: as :func:`vocab_parallel_ntl_loss`, and shapes of ``hidden`` and the shard
            that do not match.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> hidden, w = torch.randn(4, 8), torch.randn(12, 8)
        >>> labels = torch.tensor([3, 7, 11, 0])
        >>> loss = ntl.vocab_parallel_ntl_loss_from_hidden(hidden, w, labels, vocab, vocab_start=0)
        >>> torch.allclose(loss, ntl.ntl_loss_from_hidden(hidden, w, labels, vocab), atol=1e-5)
        True
    """
    V_local, t = _check_head(hidden, lm_head_weight_shard, bias_shard, temperature)
    labels = C.check_labels(labels, hidden.shape[:-1], hidden.device, what="hidden.shape[:-1]")
    rank, world, distributed = _world(group)
    V = _global_width(vocab_start, V_local, vocab_size, rank, world)
    vocab = _resolve(vocab_or_tokenizer, V, _how(vocab_size, V_local, world))
    ks, rows, owned = _local_index(vocab, vocab_start, vocab_start + V_local, hidden.device)
    w = lm_head_weight_shard.index_select(0, rows).float()
    b = bias_shard.index_select(0, rows).float() if bias_shard is not None else None
    z_local = F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), w, b)
    if t != 1.0:
        z_local = z_local / t
    z = _assemble(z_local, ks, owned, vocab, group, distributed)
    return ntl_loss_from_digit_logits(
        z.view(*labels.shape, vocab.K), labels, vocab,
        method=bind_decimal_point(resolve_method(method), vocab_or_tokenizer), ignore_index=ignore_index,
        reduction=reduction, weights=weights, target_dist=target_dist, vocab_size=V, backend=backend)
