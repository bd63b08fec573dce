"""The standalone losses' Triton path (``_ntl_loss_fwd`` + ``_ntl_finalize``, the backward
kernels) vs the PyTorch path, under TRITON_INTERPRET=1 on CPU.

The PyTorch path is itself checked against ``ntloss`` (test_losses_oracle.py) and against
autograd on plain formulas (test_properties.py, test_losses_hand.py); here every kernel
feature is compared with it: the errors (mse / mae / huber), W1 with squashed distances and
soft targets, reweigh (online log-sum-exp over V), weights of every dtype, the three
reductions, fp32/bf16/fp16, shapes that are not multiples of the tiles, strided logits,
``ignore_index``, rows without digits, Qwen's real width, extreme logits.

Tolerances as in test_kernels.py: losses 1e-5 relative to the loss scale; gradients 1e-5
(fp32), 1.6e-2 (bf16), 2e-3 (fp16) relative to the largest entry.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import GRAD_TOL, big_vocab, rel_close  # tests/support

import ntl
from ntl.kernels import ntl_rows_torch

DIGITS = ntl.DigitVocab([3, 9, 12, 20, 21, 30, 33, 40, 41, 49], vocab_size=300)


def batch(N, V, vocab, dtype=torch.float32, seed=0, digit_frac=0.4, ignore_frac=0.1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(N, V, generator=g)
    ids = torch.tensor(vocab.token_ids)
    x[:, ids] += 2.0 * torch.rand(N, 1, generator=g) * scale  # a varied number-token mass
    y = torch.randint(0, V, (N,), generator=g)
    pick = torch.rand(N, generator=g) < digit_frac
    y[pick] = ids[torch.randint(0, vocab.K, (int(pick.sum()),), generator=g)]
    y[torch.rand(N, generator=g) < ignore_frac] = -100
    w = torch.rand(N, generator=g) * 2
    return x.to(dtype), y, w


def weights_of(kind, w):
    mask = (w > 0.6).long() + (w > 1.7).long()
    return {"none": None, "float": w, "half": w.half(), "int": mask, "bool": mask > 0,
            "uint8": mask.to(torch.uint8)}[kind]


def both(fn, x, up_seed=1):
    """(value, grad) of ``fn(x, backend)`` for backend triton and torch."""
    res = []
    for backend in ("triton", "torch"):
        xl = x.detach().clone().requires_grad_(True)
        out = fn(xl, backend)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(up_seed))
        (out * up).sum().backward()
        res.append((out.detach(), xl.grad))
    return res


LOSSES = {
    "mse": lambda x, y, v, b, **kw: ntl.ntl_mse_loss(x, y, v, backend=b, **kw),
    "mae": lambda x, y, v, b, **kw: ntl.ntl_dot_loss(x, y, v, error="mae", backend=b, **kw),
    "huber": lambda x, y, v, b, **kw: ntl.ntl_dot_loss(x, y, v, error="huber", huber_delta=2.0,
                                                       backend=b, **kw),
    "w1": lambda x, y, v, b, **kw: ntl.ntl_wasserstein_loss(x, y, v, backend=b, **kw),
    "w1-squash": lambda x, y, v, b, **kw: ntl.ntl_wasserstein_loss(x, y, v, squash_factor=5.0,
                                                                   backend=b, **kw),
}


@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("vocab_kind", ["digits", "big"])
def test_kernel_matches_torch(vocab_kind, loss, dtype, reweigh):
    V = 300 if vocab_kind == "digits" else 3001
    vocab = DIGITS if vocab_kind == "digits" else big_vocab(V)
    N = 67  # not a multiple of the row tile (64 for K=10, 16 for K=130)
    x, y, w = batch(N, V, vocab, dtype, seed=3)
    fn = LOSSES[loss]
    (a, ga), (b, gb) = both(lambda xl, be: fn(xl, y, vocab, be, reduction="none", weights=w,
                                               reweigh=reweigh), x)
    assert a.dtype == torch.float32 and a.shape == (N,)
    rel_close(a, b, 1e-5)
    assert ga.dtype == dtype
    rel_close(ga, gb, GRAD_TOL[dtype])
    k = vocab.digit_index(y)
    assert torch.all(a[k < 0] == 0) and torch.all(ga[k < 0] == 0)


@pytest.mark.parametrize("weights_kind", ["none", "float", "half", "int", "bool", "uint8"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("reweigh", [False, True])
def test_kernel_reductions_and_weight_dtypes(reduction, weights_kind, reweigh):
    V = 257
    vocab = big_vocab(V, K=10, seed=5)
    x, y, w = batch(3 * 45, V, vocab, seed=6)
    x, y = x.view(3, 45, V), y.view(3, 45)
    wt = weights_of(weights_kind, w.view(3, 45))
    (a, ga), (b, gb) = both(lambda xl, be: ntl.ntl_wasserstein_loss(
        xl, y, vocab, reduction=reduction, weights=wt, reweigh=reweigh, backend=be), x)
    assert a.shape == b.shape == (y.shape if reduction == "none" else ())
    rel_close(a, b, 1e-5)
    rel_close(ga, gb, 1e-5)
    if reduction == "mean" and weights_kind not in ("none", "float", "half"):  # integer mean by hand
        rows = ntl.ntl_wasserstein_loss(x, y, vocab, reduction="none", reweigh=reweigh, backend="torch")
        k = vocab.digit_index(y)
        wf = torch.where(k >= 0, wt.float(), 0.0)
        rel_close(a, (rows * wf).sum() / wf.sum(), 1e-5)


def test_kernel_soft_targets_and_tile_edges():
    V = 120
    vocab = big_vocab(V, K=10, seed=7)
    for N in (1, 63, 64, 65, 129):
        x, y, w = batch(N, V, vocab, seed=N, digit_frac=0.8)
        T = ntl.gaussian_targets(y, vocab, sigma=1.5)
        (a, ga), (b, gb) = both(lambda xl, be, y=y, T=T, w=w: ntl.ntl_wasserstein_loss(
            xl, y, vocab, target_dist=T, weights=w, backend=be), x)
        rel_close(a, b, 1e-5)
        rel_close(ga, gb, 1e-5)


def test_kernel_strided_logits_and_leading_dims():
    V = 300
    vocab = big_vocab(V, K=10, seed=8)
    x, y, _ = batch(40, V, vocab, seed=9)
    wide = torch.zeros(40, 2 * V)
    wide[:, ::2] = x
    views = [wide[:, ::2], x.t().contiguous().t(), torch.cat([x, x], 1)[:, :V]]
    for view in views:  # column-strided; column-major; row stride 2V
        for reweigh in (False, True):
            (a, ga), (b, gb) = both(lambda xl, be, rw=reweigh: ntl.ntl_mse_loss(
                xl, y, vocab, reduction="sum", reweigh=rw, backend=be), view)
            rel_close(a, b, 1e-5)
            rel_close(ga, gb, 1e-5)


def test_kernel_no_number_rows_and_ignore_index():
    V = 100
    vocab = big_vocab(V, K=10, seed=10)
    text = [i for i in range(V) if i not in vocab.token_ids][:30]
    y = torch.tensor(text + [-100] * 5)
    x = torch.randn(35, V)
    for reduction in ("mean", "sum", "none"):
        for reweigh in (False, True):
            (a, ga), _ = both(lambda xl, be, r=reduction, rw=reweigh: ntl.ntl_wasserstein_loss(
                xl, y, vocab, reduction=r, reweigh=rw, backend=be), x)
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(ga) == 0
    # ignore_index equal to a number token id: that label is ignored, the others count
    y2 = torch.tensor([vocab.token_ids[3], vocab.token_ids[5], vocab.token_ids[3]])
    for backend in ("triton", "torch"):
        rows = ntl.ntl_mse_loss(x[:3], y2, vocab, ignore_index=vocab.token_ids[3], reduction="none",
                                backend=backend)
        assert rows[0] == 0 and rows[2] == 0 and rows[1] > 0


def test_kernel_reweigh_real_vocab_width(qwen_tok):
    """The online log-sum-exp over V = 151,936 (37 blocks), few rows, all methods."""
    V = 151_936
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, V, generator=g)
    x[..., 15:25] += torch.tensor([0.0, 9.0, 13.0]).view(1, 3, 1)
    y = torch.tensor([[15, 785, 24], [-100, 20, 151_935]])
    for loss in ("mse", "w1", "huber"):
        (a, ga), (b, gb) = both(lambda xl, be, fn=LOSSES[loss]: fn(xl, y, qwen_tok, be, reweigh=True,
                                                                    reduction="none"), x)
        rel_close(a, b, 1e-5)
        rel_close(ga, gb, 1e-5)


@pytest.mark.parametrize(("dtype", "big"), [(torch.float32, 200.0), (torch.float16, 6e4)])
def test_kernel_extreme_logits(dtype, big):
    """Number logits of +-200 (fp32) / +-6e4 (fp16): finite, equal on both backends."""
    V = 64
    vocab = ntl.DigitVocab(list(range(20, 30)), V)
    x = torch.zeros(4, V)
    x[0, 27] = big  # a point mass on the target
    x[1, :] = -big
    x[1, 22] = 0.0
    x[2, 20:30] = torch.linspace(-big, big, 10)
    x[3, 40] = big  # all the mass on a text token
    x = x.to(dtype)
    y = torch.tensor([27, 22, 29, 25])
    for loss in LOSSES:
        for reweigh in (False, True):
            (a, ga), (b, gb) = both(lambda xl, be, fn=LOSSES[loss], rw=reweigh: fn(
                xl, y, vocab, be, reweigh=rw, reduction="none"), x)
            assert torch.isfinite(a).all() and torch.isfinite(ga.float()).all(), (loss, reweigh)
            rel_close(a, b, 1e-5)
            rel_close(ga, gb, GRAD_TOL[dtype])


def test_kernel_forward_without_grad_and_rows():
    """No grad: the kernel skips dL/dz; the per-row losses (reduction="none") on both backends."""
    V = 300
    vocab = big_vocab(V, K=10, seed=12)
    x, y, _ = batch(50, V, vocab, seed=13)
    with torch.no_grad():
        a = ntl.ntl_wasserstein_loss(x, y, vocab, backend="triton", reweigh=True)
    b = ntl.ntl_wasserstein_loss(x, y, vocab, backend="torch", reweigh=True)
    rel_close(a, b, 1e-5)
    k = vocab.digit_index(y).masked_fill(y == -100, -1)
    for method in ("mse", "wasserstein"):
        for reweigh in (False, True):
            (ra, ga), (rb, gb) = both(lambda xl, be, m=method, rw=reweigh: ntl.ntl_loss(
                xl, y, vocab, method=m, reweigh=rw, reduction="none", backend=be), x)
            rel_close(ra, rb, 1e-5)
            rel_close(ga, gb, 1e-5)
            # against the twin's rows over the number columns (independent of the op)
            ref = ntl_rows_torch(x[:, vocab.ids()].float(), k, vocab.values_on(), method)
            if reweigh:
                p = torch.softmax(x.float(), -1)
                m = p[:, vocab.ids()].sum(-1)
                D = (vocab.values_on().max() - vocab.values_on().min()).item()
                D = 1.01 * (D * D if method == "mse" else D)
                ref = torch.where(k >= 0, m * ref + D * (1 - m), 0.0)
            rel_close(ra, ref, 1e-5)


def test_weights_gradient():
    """d loss / d weights (float weights that require grad), both backends, vs autograd on the
    plain weighted mean of the per-row losses."""
    V = 120
    vocab = big_vocab(V, K=10, seed=14)
    x, y, w = batch(30, V, vocab, seed=15)
    rows = ntl.ntl_wasserstein_loss(x, y, vocab, reduction="none", reweigh=True, backend="torch")
    active = (vocab.digit_index(y) >= 0) & (y != -100)
    for reduction in ("mean", "sum", "none"):
        wl = w.clone().requires_grad_(True)
        plain = torch.where(active, wl, 0.0) * rows
        ref = plain.sum() / torch.where(active, wl, 0.0).sum() if reduction == "mean" else (
            plain.sum() if reduction == "sum" else plain)
        up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(16))
        (gref,) = torch.autograd.grad((ref * up).sum(), wl)
        for backend in ("triton", "torch"):
            wl2 = w.clone().requires_grad_(True)
            out = ntl.ntl_wasserstein_loss(x, y, vocab, reduction=reduction, weights=wl2, reweigh=True,
                                           backend=backend)
            (g,) = torch.autograd.grad((out * up).sum(), wl2)
            rel_close(g, gref, 1e-5)


@pytest.mark.parametrize("reweigh", [False, True])
def test_gpu_launch_configuration_in_the_interpreter(monkeypatch, reweigh):
    """The tiles a GPU launch uses (reweigh: one row per program, BLOCK_V = 4096, 8 warps),
    run in the interpreter: the result must not depend on the tiling."""
    from ntl.kernels import ntl_loss

    V = 5000  # two BLOCK_V blocks, the second partial
    vocab = big_vocab(V, K=10, seed=17)
    x, y, w = batch(21, V, vocab, seed=18)
    want = both(lambda xl, be: ntl.ntl_mse_loss(xl, y, vocab, weights=w, reweigh=reweigh, backend=be), x)
    monkeypatch.setattr(ntl_loss, "interpreting", lambda: False)
    bn, _, bv, warps = ntl_loss.row_blocks(10, V, reweigh)
    assert (bn, bv, warps) == ((1, 4096, 8) if reweigh else (64, 16, 4))
    (a, ga), _ = both(lambda xl, be: ntl.ntl_mse_loss(xl, y, vocab, weights=w, reweigh=reweigh,
                                                       backend=be), x)
    rel_close(a, want[1][0], 1e-5)
    rel_close(ga, want[1][1], 1e-5)
