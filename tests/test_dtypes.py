"""bf16 / fp16 logits: fp32 losses, math in fp32, within a documented tolerance of fp32.

Tolerances (measured on logits ~ N(0, 2^2) + 3 on the digits, then ~2.5x margin). The
only error source is the rounding of the *inputs* (bf16 keeps 8 mantissa bits, fp16 11):

==========  =====================================  ===============================
dtype       per position |L - L32| / (1 + |L32|)   reduced (mean/sum) loss, rtol
==========  =====================================  ===============================
bfloat16    <= 8e-2                                1e-2 (+ atol 1e-2)
float16     <= 1.2e-2                              2e-3 (+ atol 2e-3)
==========  =====================================  ===============================

Gradients (returned in the logits' dtype) obey the per-position bound relative to
``1 + max|grad32|``. And since the math is fp32, the half-precision result equals the
fp32 computation on the *upcast half-precision logits* to 1e-5.
"""

import pytest
import torch

import ntl

V = 64
IDS = list(range(20, 30))
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)
POS_TOL = {torch.bfloat16: 8e-2, torch.float16: 1.2e-2}
RED_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
HALF = [torch.bfloat16, torch.float16]


def case(seed, shape=(8, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=g) * 2.0
    x[..., IDS] += 3.0
    y = torch.tensor(IDS)[torch.randint(0, 10, shape, generator=g)]
    y[..., ::5] = -100
    y[..., 1::7] = 3  # text
    return x, y


@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_logits_per_position(dtype, method, reweigh):
    for seed in range(3):
        x, y = case(seed)
        a = x.clone().requires_grad_(True)
        b = x.to(dtype).requires_grad_(True)
        la = ntl.ntl_loss(a, y, VOCAB, method=method, reweigh=reweigh, reduction="none")
        lb = ntl.ntl_loss(b, y, VOCAB, method=method, reweigh=reweigh, reduction="none")
        assert lb.dtype == torch.float32
        assert ((lb - la).abs() / (1 + la.abs())).max().item() <= POS_TOL[dtype]
        la.sum().backward()
        lb.sum().backward()
        assert b.grad.dtype == dtype
        gerr = (b.grad.float() - a.grad.float()).abs().max() / (1 + a.grad.abs().max())
        assert gerr.item() <= POS_TOL[dtype]
        # math in fp32: identical (to fp32 rounding) to fp32 on the upcast half logits
        c = x.to(dtype).float()
        lc = ntl.ntl_loss(c, y, VOCAB, method=method, reweigh=reweigh, reduction="none")
        torch.testing.assert_close(lb.detach(), lc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_logits_reduced(dtype, method, reduction):
    x, y = case(11, shape=(4, 64))
    w = torch.rand(y.shape, generator=torch.Generator().manual_seed(1))
    la = ntl.ntl_loss(x, y, VOCAB, method=method, reduction=reduction, weights=w)
    lb = ntl.ntl_loss(x.to(dtype), y, VOCAB, method=method, reduction=reduction, weights=w.to(dtype))
    assert lb.dtype == torch.float32 and lb.dim() == 0
    torch.testing.assert_close(lb, la, rtol=RED_TOL[dtype], atol=RED_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_half_logits_qwen_padded_vocab(qwen_tok, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 151_936, generator=g)
    x[..., 15:25] += 9.0
    y = torch.tensor([[15, 24, 785], [-100, 19, 151_900]])
    for reweigh in (False, True):
        la = ntl.ntl_wasserstein_loss(x, y, qwen_tok, reweigh=reweigh)
        lb = ntl.ntl_wasserstein_loss(x.to(dtype), y, qwen_tok, reweigh=reweigh)
        assert lb.dtype == torch.float32
        torch.testing.assert_close(lb, la, rtol=RED_TOL[dtype], atol=RED_TOL[dtype])


def test_fp16_extreme_logits_stay_finite():
    x = torch.zeros(3, V, dtype=torch.float16)
    x[0, IDS[7]] = 60000.0  # near fp16 max: exp would overflow in fp16
    x[1, :] = -60000.0
    x[1, IDS[2]] = 0.0
    x[2, IDS] = torch.linspace(-30000, 30000, 10).half()
    x.requires_grad_(True)
    y = torch.tensor([IDS[7], IDS[2], IDS[9]])
    for method in ("wasserstein", "mse"):
        for reweigh in (False, True):
            loss = ntl.ntl_loss(x, y, VOCAB, method=method, reweigh=reweigh, reduction="none")
            assert torch.isfinite(loss).all()
            torch.testing.assert_close(loss, torch.zeros(3), atol=1e-4, rtol=0)  # point masses on target
            loss.sum().backward()
            assert torch.isfinite(x.grad).all()
            x.grad = None
