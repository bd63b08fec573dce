"""Inputs and comparisons shared by the kernel tests (tests/kernels): a wide vocab, a mixed
batch, the gradient tolerances per dtype, and a relative closeness check.

Tolerances: losses 1e-5 relative to the loss scale; gradients (rounded to the input dtype at
different points by the two paths) 1e-5 (fp32), 1.6e-2 (bf16: 2^-8), 2e-3 (fp16: 2^-11)
relative to the largest entry.
"""

from __future__ import annotations

import torch

import ntl

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def big_vocab(V: int, K: int = 130, seed: int = 0) -> ntl.NumberVocab:
    """A NumberVocab with K > 100 tokens, tied values and uneven gaps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(V, generator=g)[:K].tolist()
    vals = sorted(torch.randint(0, 400, (K,), generator=g).tolist())
    vals[1] = vals[0]  # a tie: zero gap
    return ntl.NumberVocab(ids, vals, V)


def make_batch(N: int, V: int, vocab: ntl.NumberVocab, dtype=torch.float32, seed: int = 0,
               digit_frac: float = 0.4, ignore_frac: float = 0.1):
    """``[N, V]`` logits ~ N(0, 3^2) in ``dtype`` and labels: number tokens, text and -100."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    ids = torch.tensor(vocab.token_ids)
    pick = torch.rand(N, generator=g) < digit_frac
    labels[pick] = ids[torch.randint(0, vocab.K, (int(pick.sum()),), generator=g)]
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    return logits, labels


def rel_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """``max|a - b| <= tol * max(max|b|, 1)`` (empty tensors agree)."""
    a, b = a.float(), b.float()
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} x scale {scale:.3g}"


def loss_and_grad(fn, logits: torch.Tensor, seed: int = 1):
    """``fn(logits)`` and its gradient for a random upstream gradient (1 for a scalar)."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)) if out.dim() else None
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad
