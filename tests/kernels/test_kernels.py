"""Triton kernels vs their plain-PyTorch twins, under TRITON_INTERPRET=1 on CPU.

Tolerances: fp32 1e-5 (relative to the loss scale); bf16/fp16 inputs are
upcast identically by both paths, so losses agree to 1e-5 as well, while
gradients are rounded to the input dtype (bf16: 2^-8 relative, fp16: 2^-11)
at different points, so they are compared to 1.6e-2 (bf16) / 2e-3 (fp16)
relative to the largest gradient entry.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import GRAD_TOL, big_vocab, loss_and_grad, make_batch, rel_close  # tests/support

import ntl
from ntl.kernels import digit_gather, digit_gather_torch, ntl_rows_torch

DIGITS = ntl.DigitVocab([3, 9, 12, 20, 21, 30, 33, 40, 41, 49], vocab_size=50)


# ---------------------------------------------------------------- number columns (digit gather)
@pytest.mark.parametrize("V", [50, 257, 4000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_digit_gather_matches_torch(V, dtype):
    ids = torch.tensor(big_vocab(V, K=10 if V == 50 else 130).token_ids)
    logits, _ = make_batch(37, V, big_vocab(V, K=10 if V == 50 else 130), dtype)
    a, ga = loss_and_grad(lambda x: digit_gather(x, ids, backend="triton"), logits)
    b, gb = loss_and_grad(lambda x: digit_gather_torch(x, ids), logits)
    assert a.dtype == dtype and a.shape == (37, ids.numel())
    assert torch.equal(a, b)  # a gather is exact
    assert torch.equal(ga, gb)  # so is the scatter of the same values


def test_digit_gather_leading_shape_and_row_stride():
    base = torch.randn(3, 5, 200)
    view = base[:, :, :100]  # row stride 200, unit column stride
    ids = torch.tensor([5, 17, 99, 0])
    out = digit_gather(view, ids, backend="triton")
    assert torch.equal(out, view[..., ids])
    strided = torch.randn(4, 200)[:, ::2]  # column stride 2: copied first
    assert torch.equal(digit_gather(strided, ids, backend="triton"), strided[:, ids])


def test_digit_gather_bad_input():
    x = torch.randn(4, 20)
    with pytest.raises(TypeError, match="ids must be a 1-D int64/int32"):
        digit_gather(x, torch.tensor([1.0, 2.0]), backend="triton")
    with pytest.raises(ValueError, match="ids is empty"):
        digit_gather(x, torch.tensor([], dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, V=20\)"):
        digit_gather(x, torch.tensor([3, 20]), backend="triton")
    with pytest.raises(ValueError, match="unique"):
        digit_gather(x, torch.tensor([3, 3]), backend="triton")
    with pytest.raises(ValueError, match="ids are on meta"):
        digit_gather(x, torch.tensor([3, 4], device="meta"), backend="triton")
    with pytest.raises(TypeError, match="floating-point"):
        digit_gather(torch.ones(4, 20, dtype=torch.long), torch.tensor([1]), backend="triton")


# ---------------------------------------------------------------- standalone loss rows (ntl_loss)
@pytest.mark.parametrize("method,soft", [("mse", False), ("wasserstein", False), ("wasserstein", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab_kind", ["digits", "big"])
def test_rows_kernel_matches_twin(method, soft, dtype, vocab_kind):
    V = 50 if vocab_kind == "digits" else 3001
    vocab = DIGITS if vocab_kind == "digits" else big_vocab(V)
    N = 67  # not a multiple of the row tile (64 for K=10, 16 for K=130 -> BLOCK_K=256)
    logits, labels = make_batch(N, V, vocab, dtype)
    k = vocab.digit_index(labels, V)
    ids, vals = vocab.ids(), vocab.values_on()
    S = torch.softmax(torch.randn(N, vocab.K), -1) if soft else None
    # the per-row loss through the public entry point (the Triton op; its rows, reduction="none")
    a, ga = loss_and_grad(lambda x: ntl.ntl_loss(x, labels, vocab, method=method, reduction="none",
                                                 target_dist=S, backend="triton"), logits)
    b, gb = loss_and_grad(lambda x: ntl_rows_torch(digit_gather_torch(x, ids), k, vals, method, S), logits)
    assert a.dtype == torch.float32
    rel_close(a, b, 1e-5)
    rel_close(ga, gb, GRAD_TOL[dtype])
    assert torch.all(a[k < 0] == 0) and torch.all(ga[k < 0] == 0)


REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", ["mse", "wasserstein"])
@pytest.mark.parametrize("reweigh", [False, True])
def test_public_losses_triton_vs_torch(reduction, method, reweigh):
    V = 257
    vocab = big_vocab(V, K=10)
    logits, labels = make_batch(3 * 45, V, vocab, seed=3)
    logits, labels = logits.view(3, 45, V), labels.view(3, 45)
    w = torch.rand(3, 45)

    def run(backend):
        return lambda x: ntl.ntl_loss(x, labels, vocab, method=method, reduction=reduction,
                                      weights=w, reweigh=reweigh, backend=backend)

    a, ga = loss_and_grad(run("triton"), logits)
    b, gb = loss_and_grad(run("torch"), logits)
    rel_close(a, b, 1e-5)
    rel_close(ga, gb, 1e-5)


def test_non_contiguous_logits_and_duplicate_rows():
    V = 300
    vocab = big_vocab(V, K=10, seed=4)
    logits, labels = make_batch(40, V, vocab, seed=5)
    logits = torch.cat([logits, logits[:7]])  # duplicate rows must give duplicate results
    labels = torch.cat([labels, labels[:7]])
    wide = torch.zeros(47, 2 * V)
    wide[:, ::2] = logits  # column stride 2
    for x in (wide[:, ::2], logits.t().contiguous().t()):  # column-strided; column-major
        assert not x.is_contiguous()
        for method in ("mse", "wasserstein"):
            a = ntl.ntl_loss(x, labels, vocab, method=method, reduction="none", backend="triton")
            b = ntl.ntl_loss(logits, labels, vocab, method=method, reduction="none", backend="torch")
            rel_close(a, b, 1e-5)
            assert torch.equal(a[40:], a[:7])


def test_all_text_batch_is_zero_and_connected():
    V = 100
    vocab = big_vocab(V, K=10, seed=6)
    text = [i for i in range(V) if i not in vocab.token_ids][:30]
    labels = torch.tensor(text + [-100] * 5)
    x = torch.randn(35, V, requires_grad=True)
    for method in ("mse", "wasserstein"):
        loss = ntl.ntl_loss(x, labels, vocab, method=method, backend="triton")
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, x)
        assert torch.count_nonzero(g) == 0


def test_custom_ignore_index():
    V = 64
    vocab = ntl.DigitVocab(list(range(10)), V)
    labels = torch.tensor([3, 7, 0, 5])  # token 0 is the digit '0', but it is also ignore_index
    x = torch.randn(4, V)
    for backend in ("triton", "torch"):
        rows = ntl.ntl_wasserstein_loss(x, labels, vocab, ignore_index=0, reduction="none", backend=backend)
        assert rows[2] == 0  # ignored, as in ntloss and F.cross_entropy
        assert torch.all(rows[[0, 1, 3]] > 0)
        mean = ntl.ntl_wasserstein_loss(x, labels, vocab, ignore_index=0, backend=backend)
        rel_close(mean, rows[[0, 1, 3]].mean(), 1e-6)
    fused = ntl.cross_entropy_with_ntl(x, labels, vocab, ignore_index=0, backend="triton")
    ref = (torch.nn.functional.cross_entropy(x, labels, ignore_index=0)
           + 0.3 * ntl.ntl_wasserstein_loss(x, labels, vocab, ignore_index=0, backend="torch"))
    rel_close(fused, ref, 1e-5)


def test_soft_targets_public_api_and_point_mass():
    V = 120
    vocab = big_vocab(V, K=10, seed=7)
    logits, labels = make_batch(50, V, vocab, seed=8, digit_frac=0.8)
    T = ntl.gaussian_targets(labels, vocab, sigma=1.5)
    assert torch.allclose(T.sum(-1), torch.ones(50))
    a, ga = loss_and_grad(lambda x: ntl.ntl_wasserstein_loss(x, labels, vocab, target_dist=T, backend="triton"), logits)
    b, gb = loss_and_grad(lambda x: ntl.ntl_wasserstein_loss(x, labels, vocab, target_dist=T, backend="torch"), logits)
    rel_close(a, b, 1e-5)
    rel_close(ga, gb, 1e-5)
    # a one-hot soft target reproduces the hard-target loss (CDF form == sum_k q_k |v_k - y|)
    k = vocab.digit_index(labels)
    onehot = torch.nn.functional.one_hot(k.clamp_min(0), vocab.K).float()
    soft = ntl.ntl_wasserstein_loss(logits, labels, vocab, target_dist=onehot, backend="triton")
    hard = ntl.ntl_wasserstein_loss(logits, labels, vocab, backend="torch")
    rel_close(soft, hard, 1e-5)


def test_real_vocab_width_few_rows(qwen_tok):
    V = 151_936
    logits = torch.randn(2, 3, V)
    labels = torch.tensor([[15, 785, 24], [-100, 20, 151_935]])
    for fn in (ntl.ntl_mse_loss, ntl.ntl_wasserstein_loss):
        a, ga = loss_and_grad(lambda x, fn=fn: fn(x, labels, qwen_tok, backend="triton"), logits)
        b, gb = loss_and_grad(lambda x, fn=fn: fn(x, labels, qwen_tok, backend="torch"), logits)
        rel_close(a, b, 1e-5)
        rel_close(ga, gb, 1e-5)


def test_rows_bad_input():
    x = torch.randn(4, 20)
    labels = torch.tensor([1, 2, 3, 4])
    with pytest.raises(TypeError, match="integer tensor"):
        ntl.ntl_mse_loss(x, labels.float(), list(range(10)), backend="triton")
    with pytest.raises(ValueError, match="empty"):
        ntl.ntl_mse_loss(x, labels, [], backend="triton")
    with pytest.raises(ValueError, match="labels is on meta"):
        ntl.ntl_mse_loss(x, labels.to("meta"), list(range(10)), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ntl.ntl_mse_loss(x, labels, list(range(10)), backend="cuda")


# ---------------------------------------------------------------- fused CE + NTL (ce_ntl)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", ["mse", "wasserstein"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_matches_unfused(reduction, method, inplace, dtype):
    V = 1000
    vocab = big_vocab(V, K=10, seed=9)
    logits, labels = make_batch(23, V, vocab, dtype, seed=10)

    def ref(x):
        ce = torch.nn.functional.cross_entropy(x.float(), labels, reduction=reduction)
        return ce + 0.3 * ntl.ntl_loss(x, labels, vocab, method=method, reduction=reduction, backend="torch")

    def fused(x):
        inp = x * 1 if inplace else x  # in place overwrites its input: give it a private copy
        return ntl.cross_entropy_with_ntl(inp, labels, vocab, method=method, reduction=reduction,
                                          inplace=inplace, backend="triton")

    a, ga = loss_and_grad(fused, logits)
    b, gb = loss_and_grad(ref, logits)
    rel_close(a, b, 1e-5)
    rel_close(ga, gb, GRAD_TOL[dtype])


@pytest.mark.parametrize("method", ["mse", "wasserstein"])
def test_fused_kernel_reweigh_and_number_vocab(method):
    V = 3001
    vocab = big_vocab(V, K=130, seed=11)
    logits, labels = make_batch(9, V, vocab, seed=12, digit_frac=0.7)
    for reweigh in (False, True):
        def ref(x, reweigh=reweigh):
            return (torch.nn.functional.cross_entropy(x, labels)
                    + 0.5 * ntl.ntl_loss(x, labels, vocab, method=method, reweigh=reweigh, backend="torch"))

        a, ga = loss_and_grad(lambda x, reweigh=reweigh: ntl.cross_entropy_with_ntl(
            x, labels, vocab, ntl_weight=0.5, method=method, reweigh=reweigh, backend="triton"), logits)
        b, gb = loss_and_grad(ref, logits)
        rel_close(a, b, 1e-5)
        rel_close(ga, gb, 1e-5)


def test_fused_kernel_real_vocab_width(qwen_tok):
    V = 151_936
    logits = torch.randn(3, V)
    labels = torch.tensor([17, 785, -100])
    a, ga = loss_and_grad(lambda x: ntl.cross_entropy_with_ntl(x, labels, qwen_tok, backend="triton"), logits)
    b, gb = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, labels)
                          + 0.3 * ntl.ntl_wasserstein_loss(x, labels, qwen_tok, backend="torch"), logits)
    rel_close(a, b, 1e-5)
    rel_close(ga, gb, 1e-5)


# ---------------------------------------------------------------- kernel 5: from hidden
@pytest.mark.parametrize("method", ["mse", "wasserstein"])
def test_from_hidden_triton_vs_plain(method):
    g = torch.Generator().manual_seed(13)
    N, H, V = 70, 32, 500
    vocab = big_vocab(V, K=10, seed=14)
    hidden = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) / 4
    bias = torch.randn(V, generator=g)
    _, labels = make_batch(N, V, vocab, seed=15)
    h1, W1 = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    a = ntl.ntl_loss_from_hidden(h1, W1, labels, vocab, method=method, temperature=0.7, bias=bias,
                                 backend="triton")
    a.backward()
    h2, W2 = hidden.clone().requires_grad_(), W.clone().requires_grad_()
    b = ntl.ntl_loss(((h2 @ W2.T) + bias) / 0.7, labels, vocab, method=method, backend="torch")
    b.backward()
    rel_close(a, b, 1e-5)
    rel_close(h1.grad, h2.grad, 1e-5)
    rel_close(W1.grad, W2.grad, 1e-5)


# ---------------------------------------------------------------- real GPU: tests/kernels/test_gpu.py


def test_masked_digit_logits_on_rows_taking_no_part():
    """-inf number logits (e.g. constrained decoding) on a row that takes no part: finite, zero grad."""
    V = 64
    vocab = ntl.DigitVocab(list(range(10)), V)
    x0 = torch.randn(3, V)
    x0[1, :10] = float("-inf")
    labels = torch.tensor([3, 40, 7])
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        ntl.ntl_wasserstein_loss(x, labels, vocab, backend=backend).backward()
        assert torch.isfinite(x.grad).all() and torch.all(x.grad[1] == 0)
        x = x0.clone().requires_grad_()
        fused = ntl.cross_entropy_with_ntl(x, labels, vocab, backend=backend)
        fused.backward()
        xr = x0.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(xr, labels) + 0.3 * ntl.ntl_wasserstein_loss(
            xr, labels, vocab, backend="torch")
        ref.backward()
        rel_close(fused, ref, 1e-5)
        assert torch.isfinite(x.grad).all()
        rel_close(x.grad, xr.grad, 1e-5)


def test_inplace_triton_bumps_the_version_counter():
    """Another node that saved the logits must see the in-place write and refuse to backward."""
    V = 100
    vocab = ntl.DigitVocab(list(range(10)), V)
    h = torch.randn(4, V, requires_grad=True)
    logits = h * 1.0
    aux = (logits**2).sum()  # pow saves logits for its backward
    loss = ntl.cross_entropy_with_ntl(logits, torch.tensor([1, 50, 3, 9]), vocab, inplace=True,
                                      backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()


def test_kernels_refuse_double_backward():
    x = torch.randn(5, 40, requires_grad=True)
    ids = torch.arange(10)
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(digit_gather(x, ids, backend="triton").sum(), x, create_graph=True)
    labels = torch.tensor([1, 2, 30, 4, 5])
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(ntl.ntl_mse_loss(x, labels, ids.tolist(), backend="triton"), x, create_graph=True)
