"""cross_entropy_with_ntl (PyTorch path) == F.cross_entropy + w * ntl_*_loss, values and gradients.

The reference is the plain, unfused sum computed by autograd:
``F.cross_entropy(x.view(-1, V), y.view(-1), ignore_index=..., reduction=...) + w * ntl_loss(...)``.
Tolerances: fp32 1e-5. bf16 logits: the loss equals the fp32 reference on the upcast
bf16 logits to 1e-5 (math is fp32); the gradient is stored in bf16, so it matches to
bf16 rounding: ``|g - g_ref| <= 1e-2 * max|g_ref|`` (2^-8 relative per element).

Triton-interpreter variants of these tests (``backend="triton"`` under
``TRITON_INTERPRET=1``) live in tests/kernels/test_kernels.py
(test_fused_kernel_matches_unfused, test_fused_kernel_reweigh_and_number_vocab).
"""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ntl

V = 50
IDS = [7, 33, 2, 41, 19, 25, 11, 48, 30, 14]  # '0'..'9' at scattered ids
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)
TEXT = [0, 1, 5, 20, 49]
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
REDUCTIONS = ["mean", "sum", "none"]
METHODS = ["wasserstein", "mse"]


def make(seed, B=3, T=7, digit_rows=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g) * 2.0
    x[..., IDS] += torch.randn(B, T, 1, generator=g) * 4.0
    y = torch.tensor(TEXT)[torch.randint(0, len(TEXT), (B, T), generator=g)]
    if digit_rows:
        d = torch.tensor(IDS)[torch.randint(0, 10, (B, T), generator=g)]
        y = torch.where(torch.rand(B, T, generator=g) < 0.5, d, y)
        y[0, 0] = IDS[4]
    y[0, 1] = -100
    y[-1, -1] = -100
    return x.to(dtype), y


def reference(x, y, *, w=0.3, method="wasserstein", reduction="mean", ignore_index=-100,
              reweigh=False, vocab=VOCAB):
    Vx = x.shape[-1]
    ce = F.cross_entropy(x.reshape(-1, Vx).float(), y.reshape(-1), ignore_index=ignore_index,
                         reduction=reduction)
    if reduction == "none":
        ce = ce.view(y.shape)
    nt = ntl.ntl_loss(x, y, vocab, method=method, reduction=reduction, ignore_index=ignore_index,
                      reweigh=reweigh)
    return ce + w * nt, ce, nt


def both(x, y, up=None, **kw):
    """(fused loss, fused grad, ref loss, ref grad) with upstream ``up`` for reduction='none'."""
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    vocab = kw.pop("vocab", VOCAB)
    got = ntl.cross_entropy_with_ntl(a, y, vocab, **kw)
    kw.pop("inplace", None)
    ref = reference(b, y, w=kw.pop("ntl_weight", 0.3), vocab=vocab, **kw)[0]
    u = torch.ones(()) if up is None else up
    (got * u).sum().backward()
    (ref * u).sum().backward()
    return got, a.grad, ref, b.grad


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_unfused_sum(method, reduction, reweigh, inplace):
    x, y = make(0)
    up = torch.rand(y.shape, generator=torch.Generator().manual_seed(9)) if reduction == "none" else None
    got, g_got, ref, g_ref = both(x, y, up, method=method, reduction=reduction, reweigh=reweigh,
                                  inplace=inplace, ntl_weight=0.7)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(g_got, g_ref, **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_rows_without_digits_and_custom_ignore_index(method, reduction):
    x, y = make(1, digit_rows=False)  # text and ignored only: NTL part is 0, loss is CE
    got, g_got, ref, g_ref = both(x, y, method=method, reduction=reduction)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(g_got, g_ref, **TOL)
    ce_only = F.cross_entropy(x.view(-1, V), y.view(-1), reduction=reduction)
    torch.testing.assert_close(got.detach().reshape(-1) if reduction == "none" else got.detach(),
                               ce_only, **TOL)
    # ignore_index = a text id (e.g. the pad id), and = a digit id (then that digit is ignored by both)
    for ign in (TEXT[2], IDS[4]):
        x, y = make(2)
        y = torch.where(y == -100, torch.full_like(y, ign), y)
        y[1, :3] = ign
        got, g_got, ref, g_ref = both(x, y, method=method, reduction=reduction, ignore_index=ign)
        torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
        torch.testing.assert_close(g_got, g_ref, **TOL)


def test_all_ignored_is_zero_not_nan():
    """Documented deviation: F.cross_entropy's mean of nothing is NaN; the fused loss is 0."""
    x = torch.randn(4, V, requires_grad=True)
    y = torch.full((4,), -100)
    assert torch.isnan(F.cross_entropy(x, y))
    for reduction in REDUCTIONS:
        loss = ntl.cross_entropy_with_ntl(x, y, VOCAB, reduction=reduction)
        assert torch.equal(loss.detach(), torch.zeros(loss.shape))
        loss.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


def test_return_parts():
    x, y = make(3)
    xa = x.clone().requires_grad_(True)
    loss, ce, nt = ntl.cross_entropy_with_ntl(xa, y, VOCAB, ntl_weight=0.25, return_parts=True)
    ref, ref_ce, ref_nt = reference(x, y, w=0.25)
    torch.testing.assert_close(ce, ref_ce, **TOL)
    torch.testing.assert_close(nt, ref_nt, **TOL)
    torch.testing.assert_close(loss.detach(), ref, **TOL)
    assert not ce.requires_grad and not nt.requires_grad and loss.requires_grad
    parts = ntl.cross_entropy_with_ntl(x, y, VOCAB, reduction="none", return_parts=True,
                                       method="mse", ntl_weight=1.5)
    r = reference(x, y, w=1.5, method="mse", reduction="none")
    for p, q in zip(parts, r, strict=True):
        assert p.shape == y.shape
        torch.testing.assert_close(p.detach(), q, **TOL)


def test_weight_zero_is_plain_cross_entropy_and_upstream_scale():
    x, y = make(4)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    (ntl.cross_entropy_with_ntl(a, y, VOCAB, ntl_weight=0.0) * 2.5).backward()
    (F.cross_entropy(b.view(-1, V), y.view(-1)) * 2.5).backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_backward_twice_raises():
    x, y = make(5)
    x.requires_grad_(True)
    loss = ntl.cross_entropy_with_ntl(x, y, VOCAB)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


# --------------------------------------------------------------------------- inplace
def test_inplace_overwrites_logits_with_the_gradient():
    """inplace=True: afterwards ``logits`` holds d(loss)/d(logits), not the logits."""
    x, y = make(6)
    _, g_ref = both(x, y)[2:]
    leaf = x.clone().requires_grad_(True)
    loss = ntl.cross_entropy_with_ntl(leaf, y, VOCAB, inplace=True)
    torch.testing.assert_close(loss.detach(), reference(x, y)[0], **TOL)
    torch.testing.assert_close(leaf.detach(), g_ref, **TOL)  # the consequence, before backward
    loss.backward()
    torch.testing.assert_close(leaf.grad, g_ref, **TOL)
    # and without inplace the logits are untouched
    keep = x.clone().requires_grad_(True)
    ntl.cross_entropy_with_ntl(keep, y, VOCAB).backward()
    assert torch.equal(keep.detach(), x)


def test_inplace_after_lm_head_gives_correct_parameter_gradients():
    """Typical use: logits straight from the LM head (matmul saves h and W, not the logits)."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(3, 7, 16, generator=g)
    W = torch.randn(V, 16, generator=g) * 0.5
    _, y = make(7)
    grads = []
    for inplace in (False, True, None):
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        logits = hh @ WW.T
        if inplace is None:
            loss = reference(logits, y, method="mse", reduction="sum")[0]
        else:
            loss = ntl.cross_entropy_with_ntl(logits, y, VOCAB, method="mse", reduction="sum",
                                              inplace=inplace)
        loss.backward()
        grads.append((hh.grad, WW.grad))
    for gh, gw in grads[:2]:
        torch.testing.assert_close(gh, grads[2][0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gw, grads[2][1], rtol=1e-5, atol=1e-4)


def test_inplace_when_logits_are_saved_elsewhere_raises():
    """Documented: autograd raises if another node saved the logits (they were overwritten)."""
    x, y = make(8)
    base = x.clone().requires_grad_(True)
    logits = base.exp()  # ExpBackward saves its output, i.e. the logits tensor
    loss = ntl.cross_entropy_with_ntl(logits, y, VOCAB, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_noncontiguous_logits_causal_shift():
    """logits[:, :-1] with labels[:, 1:] (the causal shift) works; inplace needs a view, so it refuses."""
    g = torch.Generator().manual_seed(10)
    full = torch.randn(2, 9, V, generator=g)
    labels = torch.tensor(IDS + TEXT + [-100, IDS[0], IDS[9]])[torch.randint(0, 18, (2, 9), generator=g)]
    a = full.clone().requires_grad_(True)
    b = full.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(a[:, :-1], labels[:, 1:], VOCAB, method="mse")
    ref = reference(b[:, :-1], labels[:, 1:], method="mse")[0]
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    got.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    with pytest.raises(ValueError, match="inplace=True needs logits that can be viewed as"):
        ntl.cross_entropy_with_ntl(full[:, :-1], labels[:, 1:], VOCAB, inplace=True)


# --------------------------------------------------------------------------- dtypes / real vocab
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_logits(method, inplace):
    x, y = make(11, dtype=torch.bfloat16)
    a = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(a, y, VOCAB, method=method, inplace=inplace)
    got.backward()
    assert got.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    b = x.float().requires_grad_(True)  # fp32 reference on the upcast bf16 logits
    ref = reference(b, y, method=method)[0]
    ref.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    err = (a.grad.float() - b.grad.float()).abs().max().item()
    assert err <= 1e-2 * b.grad.abs().max().item()


def test_qwen_padded_vocab(qwen_tok):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 151_936, generator=g)
    x[..., 15:25] += 8.0
    y = torch.tensor([[15, 24, 785], [-100, 19, 151_900]])
    for method in METHODS:
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = ntl.cross_entropy_with_ntl(a, y, qwen_tok, method=method, reweigh=True)
        ref = reference(b, y, method=method, reweigh=True, vocab=qwen_tok)[0]
        torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
        got.backward()
        ref.backward()
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_int32_labels_match_int64():
    x, y = make(12)
    a = ntl.cross_entropy_with_ntl(x, y.to(torch.int32), VOCAB, reduction="none")
    b = ntl.cross_entropy_with_ntl(x, y, VOCAB, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_on_column_slice_of_padded_logits():
    """inplace=True on logits[:, :V] (a strided 2-D view, e.g. dropping padded vocab columns)."""
    full = torch.randn(6, V + 6, generator=torch.Generator().manual_seed(13))
    y = torch.tensor([IDS[0], IDS[5], 0, 5, -100, IDS[9]])
    a, b = full.clone().requires_grad_(True), full.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(a[:, :V], y, VOCAB, inplace=True)
    ref = reference(b[:, :V], y)[0]
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    got.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert torch.equal(a.grad[:, V:], torch.zeros(6, 6))


@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_general_number_vocab_non_unit_gaps_and_ties(method, reweigh):
    """K != 10, non-unit gaps and tied values (like Llama-3's "7" / "07" / "007")."""
    vocab = ntl.NumberVocab([3, 44, 9, 27, 15, 38, 21], [0.0, 7.0, 7.0, 12.0, 100.0, 2.5, -3.0],
                            vocab_size=V)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(4, 5, V, generator=g) * 2.0
    x[..., list(vocab.token_ids)] += 2.0
    y = torch.tensor([*vocab.token_ids, 0, 1, -100])[torch.randint(0, 10, (4, 5), generator=g)]
    got, g_got, ref, g_ref = both(x, y, method=method, reweigh=reweigh, vocab=vocab,
                                  reduction="sum")
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-3)  # |L| ~ 1e4
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-3)


def test_ignore_index_outside_vocab():
    x, y = make(15)
    y = torch.where(y == -100, torch.full_like(y, V + 3), y)
    got, g_got, _, _ = both(x, y, ignore_index=V + 3, method="mse")
    b = x.clone().requires_grad_(True)
    ref = (F.cross_entropy(b.view(-1, V), y.view(-1), ignore_index=V + 3)
           + 0.3 * ntl.ntl_mse_loss(b, y, VOCAB, ignore_index=V + 3))
    ref.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(g_got, b.grad, **TOL)


@pytest.mark.parametrize("reweigh", [False, True])
def test_masked_digit_logits_in_rows_without_digits(reweigh):
    """A row whose digit logits are all -inf (constrained decoding) and whose label is text or
    ignored: finite loss, gradient equal to plain cross-entropy's there (no NaN)."""
    x, y = make(16)
    x[1, 2, IDS] = float("-inf")
    y[1, 2] = TEXT[0]
    x[2, 3, IDS] = float("-inf")
    y[2, 3] = -100
    got, g_got, ref, g_ref = both(x, y, reweigh=reweigh, method="mse")
    assert torch.isfinite(got) and torch.isfinite(g_got).all()
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(g_got, g_ref, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_grad_leaves_logits_untouched_and_matches_reference(reduction):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(9, 70, generator=g)
    labels = torch.tensor([1, 2, 3, 40, -100, 7, 9, 60, 0])
    ids = list(range(10))
    ref = (torch.nn.functional.cross_entropy(x, labels, reduction=reduction)
           + 0.3 * ntl.ntl_wasserstein_loss(x, labels, ids, reduction=reduction))
    with torch.no_grad():
        x2 = x.clone()
        got = ntl.cross_entropy_with_ntl(x2, labels, ids, reduction=reduction, inplace=True)
    assert torch.equal(x2, x)  # evaluation never writes a gradient over the logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fp16_backward_with_gradscaler_sized_scale_stays_finite():
    """A GradScaler scale of 2^16 multiplies the fp16 gradient in fp32 (2^16 is inf in fp16)."""
    x0 = torch.randn(5, V, generator=torch.Generator().manual_seed(31)).half()
    y = torch.tensor([IDS[0], IDS[3], 1, -100, IDS[9]])
    x = x0.clone().requires_grad_(True)
    (ntl.cross_entropy_with_ntl(x, y, VOCAB) * 65536.0).backward()
    xr = x0.float().requires_grad_(True)
    ((F.cross_entropy(xr, y) + 0.3 * ntl.ntl_wasserstein_loss(xr, y, VOCAB)) * 65536.0).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=2e-3, atol=2e-3 * xr.grad.abs().max().item())


def test_no_double_backward():
    x = torch.randn(4, V, requires_grad=True)
    y = torch.tensor([IDS[0], 1, IDS[2], IDS[3]])
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(ntl.cross_entropy_with_ntl(x, y, VOCAB), x, create_graph=True)


# --------------------------------------------------------------------------- both backends
# backend="triton" runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).
from kernel_probe import BigOps, count_launches  # noqa: E402

BACKENDS = ["torch", "triton"]


def mixed_batch(N, Vx, seed, dtype=torch.float32, digit_frac=0.3, ignore_frac=0.05, ids=None):
    """``[N, Vx]`` logits ~ N(0, 2^2) and labels: digits, text and ``-100``."""
    ids = torch.tensor(IDS if ids is None else ids)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Vx, generator=g) * 2.0
    y = torch.randint(0, Vx, (N,), generator=g)
    y = torch.where(torch.isin(y, ids), (y + 1) % Vx, y)
    y = torch.where(torch.isin(y, ids), (y + 1) % Vx, y)
    u = torch.rand(N, generator=g)
    y = torch.where(u < digit_frac, ids[torch.randint(0, len(ids), (N,), generator=g)], y)
    y = torch.where(u > 1 - ignore_frac, torch.full_like(y, -100), y)
    return x.to(dtype), y


def fp32_reference_grad(x, y, vocab, scale, **kw):
    """d(scale * (CE + 0.3 NTL))/dx in fp32 on the (upcast) logits, by autograd."""
    xr = x.detach().float().clone().requires_grad_(True)  # (.float() of fp32 is x itself)
    (reference(xr, y, vocab=vocab, **kw)[0] * scale).backward()
    return xr.grad


def flush_and_error(got, ref32):
    """(share of the nonzero reference entries that are 0 in ``got``, relative L2 error)."""
    nz = ref32 != 0
    flushed = (got[nz] == 0).float().mean().item()
    err = ((got.float() - ref32).norm() / ref32.norm()).item()
    return flushed, err


@pytest.mark.parametrize("backend,N", [("torch", 2048), ("torch", 16384), ("triton", 2048)])
def test_fp16_gradients_survive_gradscaler_scales(backend, N):
    """fp16 logits, V = 1,000: the fused gradient matches the fp32 gradient cast to fp16 once.
    GradScaler scale 2^16: <= 1% of the nonzero entries flushed to 0 (measured: none; the
    gradient stored pre-scaled by 1/n had flushed 33% at N = 2,048 and 72% at N = 16,384 of
    this batch); no scale: as many as the cast flushes itself (a third of them are below
    fp16's range then). Relative L2 error <= 1.2x the cast's (measured: equal)."""
    Vx = 1000
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(N, Vx, seed=N, dtype=torch.float16)
    for scale in (2.0**16, 1.0):
        ref32 = fp32_reference_grad(x, y, vocab, scale)
        cast_flushed, cast_err = flush_and_error(ref32.half(), ref32)
        xh = x.clone().requires_grad_(True)
        (ntl.cross_entropy_with_ntl(xh, y, vocab, backend=backend) * scale).backward()
        assert xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad).all()
        flushed, err = flush_and_error(xh.grad, ref32)
        assert flushed <= (0.01 if scale > 1 else cast_flushed + 0.002), (scale, flushed, cast_flushed)
        assert err <= 1.2 * cast_err, (scale, err, cast_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,reweigh,reduction", [("mse", True, "sum"), ("wasserstein", False, "none")])
def test_fp16_gradients_other_options(backend, method, reweigh, reduction):
    """The per-row fp16 scaling with reweigh, MSE, sum and none. Upstream gradients that are
    powers of two (GradScaler's) cost no extra rounding: within 1.2x of the cast-once error;
    any other upstream value rounds the stored fp16 gradient once more: within 2x."""
    Vx = 300
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(70, Vx, seed=3, dtype=torch.float16)
    g = torch.Generator().manual_seed(4)
    pow2 = 2.0 ** torch.randint(0, 17, (70,), generator=g).float()
    for up, bound in ((pow2, 1.2), (torch.rand(70, generator=g) * 2.0**12, 2.0)):
        if reduction != "none":
            up = up[0]
        kw = {"method": method, "reweigh": reweigh, "reduction": reduction}
        xr = x.float().requires_grad_(True)  # x is fp16: a copy
        ref = reference(xr, y, vocab=vocab, **kw)[0]
        (ref * up).sum().backward()
        xh = x.clone().requires_grad_(True)
        got = ntl.cross_entropy_with_ntl(xh, y, vocab, backend=backend, **kw)
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-4)
        (got * up).sum().backward()
        _, err = flush_and_error(xh.grad, xr.grad)
        _, cast_err = flush_and_error(xr.grad.half(), xr.grad)
        assert err <= bound * cast_err, (bound, err, cast_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inplace_holds_the_gradient_times_a_power_of_two_per_row(backend):
    """Documented: with fp16 and inplace=True the logits hold each row's gradient times a
    power of two until backward, which applies the inverse; bf16/fp32 hold the gradient."""
    Vx = 200
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(40, Vx, seed=5, dtype=torch.float16)
    ref32 = fp32_reference_grad(x, y, vocab, 1.0)
    leaf = x.clone().requires_grad_(True)
    loss = ntl.cross_entropy_with_ntl(leaf, y, vocab, inplace=True, backend=backend)
    held = leaf.detach().float().clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad.float(), ref32, rtol=2e-3, atol=2e-3 * ref32.abs().max().item())
    live = y != -100
    ratio = held[live].abs().amax(1) / ref32[live].abs().amax(1)
    log2 = torch.log2(ratio)
    assert torch.all((log2 - log2.round()).abs() < 0.01) and torch.all(log2.round() >= 1)
    assert torch.equal(held[~live], torch.zeros_like(held[~live]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2.5, 2.0**16])
def test_backward_scales_only_when_the_upstream_gradient_is_not_one(backend, dtype, scale):
    """grad_out == 1: backward runs no N x V op (Triton: one launch that skips every row) and
    reads no tensor value on the host; otherwise it scales, in fp32."""
    N, Vx = 64, 5000
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(N, Vx, seed=6, dtype=dtype)
    leaf = x.clone().requires_grad_(True)
    loss = ntl.cross_entropy_with_ntl(leaf, y, vocab, backend=backend) * scale
    ops = BigOps(N * Vx)
    with count_launches() as launches, ops:
        loss.backward()
    ref32 = fp32_reference_grad(x, y, vocab, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(leaf.grad.float(), ref32, rtol=tol, atol=tol * ref32.abs().max().item())
    if scale == 1.0:
        assert ops.big == []
    else:
        assert [n for n, _ in ops.big] == ([] if backend == "triton" else ["mul_"])
    if backend == "triton":
        assert dict(launches) == {"_scale_rows": 1}
        assert ops.host_reads == []  # the "is it 1?" test happens on the device
    else:
        assert dict(launches) == {}


def tricky_rows(Vx, dtype):
    """Rows that take part in neither loss (label -100) holding NaN, +inf, all -inf, huge
    values; number and text rows around them, and a whole 16-row tile of ignored rows."""
    x, y = mixed_batch(53, Vx, seed=7, dtype=torch.float32)
    idle = [1, 5, 6, *range(16, 32), 40]
    y[idle] = -100
    x[1] = float("nan")
    x[5] = float("inf")
    x[6] = float("-inf")
    x[20] = 3e4
    x[40, ::2] = float("-inf")
    return x.to(dtype), y, torch.tensor(idle)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reweigh", [False, True])
def test_rows_in_neither_loss_get_zeros_without_being_read(inplace, reweigh):
    """Triton: such a row is never read, so even NaN / inf logits give a zero gradient row and
    leave the loss equal to the reference on the other rows (where these rows hold zeros)."""
    Vx = 700
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    for dtype in (torch.float32, torch.float16):
        x, y, idle = tricky_rows(Vx, dtype)
        clean = x.clone()
        clean[idle] = 0
        ref = reference(clean.float(), y, vocab=vocab, method="mse", reweigh=reweigh)[0]
        ref32 = fp32_reference_grad(clean, y, vocab, 1.0, method="mse", reweigh=reweigh)
        leaf = x.clone().requires_grad_(True)
        got = ntl.cross_entropy_with_ntl(leaf * 1 if inplace else leaf, y, vocab, method="mse",
                                         reweigh=reweigh, inplace=inplace, backend="triton")
        got.backward()
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(leaf.grad[idle], torch.zeros_like(leaf.grad[idle]))
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(leaf.grad.float(), ref32, rtol=tol, atol=tol * ref32.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_minus_inf_rows_in_neither_loss_are_finite(backend):
    """Both backends: an all -inf row that takes part in neither loss has a zero gradient."""
    Vx = 120
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(20, Vx, seed=8)
    x[[3, 11]] = float("-inf")
    y[[3, 11]] = -100
    for reweigh, method in ((False, "wasserstein"), (True, "mse")):
        leaf = x.clone().requires_grad_(True)
        loss = ntl.cross_entropy_with_ntl(leaf, y, vocab, reweigh=reweigh, method=method, backend=backend)
        loss.backward()
        clean = x.clone()
        clean[[3, 11]] = 0
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
        assert torch.equal(leaf.grad[[3, 11]], torch.zeros(2, Vx))
        torch.testing.assert_close(loss.detach(), reference(clean, y, vocab=vocab, reweigh=reweigh,
                                                            method=method)[0], **TOL)


@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_is_one_read_only_launch(reduction, reweigh):
    """Evaluation on the Triton path: exactly one kernel launch, no ATen op on N x V data,
    the logits untouched; values equal the unfused reference."""
    N, Vx = 45, 3000
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(N, Vx, seed=9)
    ref = reference(x, y, vocab=vocab, reduction=reduction, reweigh=reweigh)
    keep = x.clone()
    ops = BigOps(N * Vx)
    with torch.no_grad(), count_launches() as launches, ops:
        loss, ce, nt = ntl.cross_entropy_with_ntl(x, y, vocab, reduction=reduction, reweigh=reweigh,
                                                  inplace=True, return_parts=True, backend="triton")
    assert dict(launches) == {"_ce_ntl_fwd": 1}
    assert ops.big == []
    assert torch.equal(x, keep)
    for got, want in zip((loss, ce, nt), ref, strict=True):
        torch.testing.assert_close(got, want.detach(), **TOL)


def test_training_forward_is_one_launch_and_no_NxV_op():
    """Training forward on the Triton path: one launch; the only N x V op allocates the buffer."""
    N, Vx = 45, 3000
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(N, Vx, seed=10)
    for inplace in (False, True):
        leaf = x.clone().requires_grad_(True)
        ops = BigOps(N * Vx)
        with count_launches() as launches, ops:
            loss = ntl.cross_entropy_with_ntl(leaf * 1 if inplace else leaf, y, vocab,
                                              inplace=inplace, backend="triton")
        assert dict(launches) == {"_ce_ntl_fwd": 1}
        assert [n for n, _ in ops.big] == (["mul"] if inplace else ["empty"])  # (leaf * 1: the test's copy)
        loss.backward()
        torch.testing.assert_close(leaf.grad, fp32_reference_grad(x, y, vocab, 1.0), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_tiling_one_row_per_program_in_the_interpreter(dtype, monkeypatch):
    """The GPU launches one row per program (``BLOCK_N = 1``); the interpreter tiles 16 rows.
    Both tilings give the same loss and gradient (and the GPU one equals the reference)."""
    from ntl.kernels import ce_ntl

    Vx = 700
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y, idle = tricky_rows(Vx, dtype)
    x[idle] = 0  # finite everywhere: compare with the torch path too

    def run(backend):
        leaf = x.clone().requires_grad_(True)
        loss = ntl.cross_entropy_with_ntl(leaf, y, vocab, reweigh=True, backend=backend)
        (loss * 3.0).backward()
        return loss.detach(), leaf.grad

    tiled = run("triton")
    for cfg in ("fwd_config", "scale_config"):
        orig = getattr(ce_ntl, cfg)
        monkeypatch.setattr(ce_ntl, cfg, lambda *a, orig=orig: {**orig(*a), "BLOCK_N": 1})
    per_row = run("triton")
    torch_path = run("torch")
    assert ce_ntl.fwd_config(Vx, 10)["BLOCK_N"] == 1
    torch.testing.assert_close(per_row[0], tiled[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_row[1], tiled[1], rtol=0, atol=0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(per_row[0], torch_path[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_row[1].float(), torch_path[1].float(), rtol=tol,
                               atol=tol * torch_path[1].float().abs().max().item())


# --------------------------------------------------------------------------- squash_factor (issue 12.2)
SQUASH_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reweigh", [False, True])
def test_squash_factor_matches_unfused_sum(backend, dtype, reweigh):
    """``squash_factor=s`` equals ``F.cross_entropy + w * ntl_wasserstein_loss(..., squash_factor=s)``
    (itself equal to ``ntloss.NTLoss(squash_factor=s)``: tests/test_losses_oracle.py), every
    reduction, values (1e-5, on the upcast logits) and gradients (to the gradient dtype's
    rounding); reweigh uses ``D = 1.01 s``."""
    Vx = 300
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(53, Vx, seed=40, dtype=dtype, digit_frac=0.5)
    up_rows = torch.rand(53, generator=torch.Generator().manual_seed(41)) * 3.0
    for reduction in REDUCTIONS:
        up = up_rows if reduction == "none" else torch.tensor(1.5)
        xr = x.float().clone().requires_grad_(True)
        ref = (F.cross_entropy(xr, y, reduction=reduction)
               + 0.7 * ntl.ntl_wasserstein_loss(xr, y, vocab, squash_factor=3.5, reweigh=reweigh,
                                                reduction=reduction))
        (ref * up).sum().backward()
        xh = x.clone().requires_grad_(True)
        got = ntl.cross_entropy_with_ntl(xh, y, vocab, ntl_weight=0.7, squash_factor=3.5,
                                         reweigh=reweigh, reduction=reduction, backend=backend)
        (got * up).sum().backward()
        torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
        tol = SQUASH_TOL[dtype]
        assert xh.grad.dtype == dtype
        torch.testing.assert_close(xh.grad.float(), xr.grad, rtol=tol, atol=tol * xr.grad.abs().max().item())
        with torch.no_grad():  # evaluation: no gradient buffer, same value
            ev = ntl.cross_entropy_with_ntl(x, y, vocab, ntl_weight=0.7, squash_factor=3.5,
                                            reweigh=reweigh, reduction=reduction, backend=backend)
        torch.testing.assert_close(ev, ref.detach(), **TOL)
    # the squash changes the loss (it is not ignored): s = 3.5 on digits costs 1 + (d - 1) 2.5 / 8
    # (per row: the rows with a digit target differ)
    with torch.no_grad():
        rows = ntl.cross_entropy_with_ntl(x, y, vocab, ntl_weight=0.7, squash_factor=3.5,
                                          reweigh=reweigh, reduction="none", backend=backend)
        plain = ntl.cross_entropy_with_ntl(x, y, vocab, ntl_weight=0.7, reweigh=reweigh,
                                           reduction="none", backend=backend)
    assert (rows - plain).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_squash_factor_inplace(backend):
    """inplace=True with squash_factor: the logits end up holding the reference gradient."""
    Vx = 200
    vocab = ntl.DigitVocab(IDS, vocab_size=Vx)
    x, y = mixed_batch(37, Vx, seed=42)
    xr = x.clone().requires_grad_(True)
    ref = F.cross_entropy(xr, y) + 0.3 * ntl.ntl_wasserstein_loss(xr, y, vocab, squash_factor=9.0,
                                                                  reweigh=True)
    ref.backward()
    leaf = x.clone().requires_grad_(True)
    loss = ntl.cross_entropy_with_ntl(leaf * 1, y, vocab, squash_factor=9.0, reweigh=True,
                                      inplace=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(leaf.grad, xr.grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("tokenizer", ["qwen", "synthetic"])
def test_squash_factor_matches_ntloss(qwen_tok, tokenizer, reweigh, backend):
    """Through to the oracle: ``F.cross_entropy + w * ntloss.NTLoss(squash_factor=s)`` on Qwen2.5's
    tokenizer (V = 151,936) and a word-level digit tokenizer with scattered digit ids; values and
    gradients, fp32, 1e-5 (with reweigh ntloss runs in float64: its fp32 softmax mass over
    151,936 logits is off by up to ~5e-5)."""
    import ntloss
    from toy_tokenizers import DIGIT_IDS, synthetic_tokenizer

    if tokenizer == "qwen":
        tok, Vx, digits, text = qwen_tok, 151_936, list(range(15, 25)), [785, 4226, 151_643, 151_700]
    else:
        tok, Vx = synthetic_tokenizer(), 40
        digits = [DIGIT_IDS[str(d)] for d in range(10)]
        text = [i for i in range(36) if i not in digits][:5]
    n = len(tok)
    crit = ntloss.NTLoss(tok, vocab_size=Vx, digit_level=True, reweigh=reweigh, squash_factor=4.0)
    assert len(tok) == n  # ntloss added no token
    g = torch.Generator().manual_seed(43)
    x = torch.randn(2, 6, Vx, generator=g) * 1.5
    x[..., digits] += torch.tensor([0.0, 6.0, 12.0])[torch.randint(0, 3, (2, 6), generator=g)][..., None]
    y = torch.tensor(digits + text + [-100])[torch.randint(0, 15, (2, 6), generator=g)]
    y[0, 0], y[1, 1], y[1, 2] = digits[7], text[0], -100
    dt = torch.float64 if reweigh else torch.float32
    xr = x.to(dt).clone().requires_grad_(True)
    ref = F.cross_entropy(xr.view(-1, Vx), y.view(-1)) + 0.4 * crit(xr, y)
    ref.backward()
    xh = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(xh, y, tok, ntl_weight=0.4, squash_factor=4.0, reweigh=reweigh,
                                     backend=backend)
    got.backward()
    torch.testing.assert_close(got.detach().double(), ref.detach().double(), **TOL)
    torch.testing.assert_close(xh.grad.double(), xr.grad.double(), **TOL)


@pytest.mark.parametrize(("kw", "err", "match"), [
    ({"squash_factor": 1}, ValueError, r"squash_factor must be a finite number > 1 \(1 would be cross-entropy\)"),
    ({"squash_factor": 0.5}, ValueError, r"squash_factor must be a finite number > 1"),
    ({"squash_factor": float("inf")}, ValueError, r"squash_factor must be a finite number > 1"),
    ({"squash_factor": "3"}, TypeError, r"squash_factor must be a number > 1 or None, got str"),
    ({"squash_factor": 3.0, "method": "mse"}, ValueError,
     r"squash_factor applies to the Wasserstein loss only, not method='mse'"),
])
def test_squash_factor_bad_values(kw, err, match):
    x, y = make(44)
    with pytest.raises(err, match=match):
        ntl.cross_entropy_with_ntl(x, y, VOCAB, **kw)
    with pytest.raises(ValueError, match="at least two different nonzero distances"):
        ntl.cross_entropy_with_ntl(x, y, ntl.NumberVocab([1, 2], [0.0, 5.0], V), squash_factor=3.0)
