"""Issue 29 on CPU: out-of-range labels, ``grad_scale=``, gradient precision, unaligned rows.

Both backends (``backend="triton"`` runs the kernels in Triton's interpreter), fused
(:func:`ntl.cross_entropy_with_ntl`) and linear (:func:`ntl.linear_cross_entropy_with_ntl`).
References: ``F.cross_entropy`` + the standalone NTL (``ntl.ntl_loss``) by autograd, and float64.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_probe import BigOps, count_launches

import ntl

BACKENDS = ["torch", "triton"]
IDS = [7, 33, 2, 41, 19, 25, 11, 48, 30, 14]


def vocab(V):
    return ntl.DigitVocab(IDS, vocab_size=V)


def plain(x, y, V, w=0.3, reduction="mean", reweigh=False):
    """``F.cross_entropy + w ntl_loss`` on the rows whose label is in ``[0, V)`` (the others take
    no part), by autograd."""
    keep = (y >= 0) & (y < V)
    yk = torch.where(keep, y, torch.full_like(y, -100))
    ce = F.cross_entropy(x.reshape(-1, V).float(), yk.reshape(-1), reduction=reduction)
    if reduction == "none":
        ce = ce.view(y.shape)
    return ce + w * ntl.ntl_loss(x, yk, vocab(V), reduction=reduction, reweigh=reweigh)


def batch(N=12, V=64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * scale
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = torch.tensor(IDS)[torch.randint(0, 10, (len(y[::3]),), generator=g)]
    y[1] = -100
    return x, y


@pytest.fixture
def lax():
    ntl.set_strict_checks(False)
    yield
    ntl.set_strict_checks(True)


# ------------------------------------------------------------------ labels outside [0, V)
BAD = [64 + 5, 64, -7, -1]  # V + 5 (the case), V, negatives that are not ignore_index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_out_of_range_labels_take_no_part(lax, backend, reduction):
    x, y = batch()
    y[[2, 4, 5, 7]] = torch.tensor(BAD)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(a, y, vocab(64), reduction=reduction, backend=backend)
    ref = plain(b, y, 64, reduction=reduction)
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert (a.grad[[2, 4, 5, 7]] == 0).all()  # no CE against token V - 1 (nor 0)


def test_fused_out_of_range_row_changes_nothing_in_the_sum(lax):
    """The issue's reproduction: a label V + 5 adds nothing to a 6-row sum, on both backends."""
    x, y = batch(N=6)
    y5 = y.clone()
    y5[3] = 64 + 5
    drop = torch.arange(6) != 3
    for backend in BACKENDS:
        got = ntl.cross_entropy_with_ntl(x, y5, vocab(64), reduction="sum", backend=backend)
        want = ntl.cross_entropy_with_ntl(x[drop], y[drop], vocab(64), reduction="sum", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_out_of_range_labels_take_no_part(lax, backend, reduction):
    _, y = batch(N=10)
    y[[2, 4, 5, 7]] = torch.tensor(BAD)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, 16, generator=g)
    W = torch.randn(64, 16, generator=g) * 0.5
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    got = ntl.linear_cross_entropy_with_ntl(h1, W1, y, vocab(64), reduction=reduction, backend=backend,
                                            chunk_size=4)
    ref = plain(h2 @ W2.T, y, 64, reduction=reduction)
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [64 + 5, -7])
def test_out_of_range_labels_raise_with_strict_checks(backend, bad):
    x, y = batch()
    y[2] = bad
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V=64\)"):
        ntl.cross_entropy_with_ntl(x, y, vocab(64), backend=backend)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V=64\)"):
        ntl.linear_cross_entropy_with_ntl(torch.randn(12, 8), torch.randn(64, 8), y, vocab(64),
                                          backend=backend)


# ------------------------------------------------------------------ grad_scale
SCALES = [0.25, 1.0 / 3.0, 2.0**16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("reweigh", [False, True])
def test_grad_scale_value_and_gradient_equal_the_plain_path(backend, scale, as_tensor, reweigh):
    """``(loss * s).backward()`` with ``grad_scale=s``: the loss is unscaled and the gradient is
    ``s`` times the plain one (the plain path: F.cross_entropy + w ntl_loss, by autograd)."""
    x, y = batch(N=16, V=300, seed=1)
    s = torch.tensor(scale) if as_tensor else scale
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(a, y, vocab(300), backend=backend, grad_scale=s, reweigh=reweigh)
    ref = plain(b, y, 300, reweigh=reweigh)
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-6, atol=1e-6)  # not scaled
    (got * s).backward()
    (ref * s).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_matched_backward_has_no_NxV_op_and_no_sync(backend, dtype):
    """Gradient accumulation (``loss / k`` with ``grad_scale=1/k``): backward runs no op over
    ``N x V`` (Triton: one ``_scale_rows`` launch that skips every row, decided on the device)."""
    N, V = 64, 5000
    x, y = batch(N=N, V=V, seed=2)
    x = x.to(dtype)
    k = 4
    leaf = x.clone().requires_grad_(True)
    loss = ntl.cross_entropy_with_ntl(leaf, y, vocab(V), backend=backend, grad_scale=1.0 / k) / k
    ops = BigOps(N * V)
    with count_launches() as launches, ops:
        loss.backward()
    assert ops.big == []
    if backend == "triton":
        assert dict(launches) == {"_scale_rows": 1}
        assert ops.host_reads == []
    ref = x.float().clone().requires_grad_(True)
    (plain(ref, y, V) / k).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(leaf.grad.float(), ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_scale_other_incoming_gradients_still_right(backend, reduction):
    """An incoming gradient other than ``grad_scale`` costs the extra pass and stays correct."""
    x, y = batch(N=16, V=300, seed=4)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(a, y, vocab(300), backend=backend, grad_scale=2.0**10,
                                     reduction=reduction)
    ref = plain(b, y, 300, reduction=reduction)
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(5)) if reduction == "none" else 0.7
    ops = BigOps(16 * 300)
    with ops:
        (got * u).sum().backward()
    (ref * u).sum().backward()
    assert ops.big  # the extra pass over N x V
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_grad_scale_fp16_with_a_gradscaler_sized_scale():
    """fp16 and a GradScaler scale: the row-scaled buffer and ``grad_scale`` compose."""
    x, y = batch(N=32, V=300, seed=6)
    for backend in BACKENDS:
        a = x.half().requires_grad_(True)
        loss = ntl.cross_entropy_with_ntl(a, y, vocab(300), backend=backend, grad_scale=2.0**16)
        (loss * 2.0**16).backward()
        ref = x.half().float().requires_grad_(True)
        (plain(ref, y, 300) * 2.0**16).backward()
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.float(), ref.grad, rtol=2e-3, atol=2e-3 * ref.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_grad_scale(backend, dtype):
    """Linear: value unscaled, gradients of hidden/weight/bias equal the plain path times ``s``;
    ``grad_out == s`` touches no gradient (Triton: ``_scale_rows`` launches that skip, no sync)."""
    g = torch.Generator().manual_seed(7)
    N, H, V = 24, 16, 300
    _, y = batch(N=N, V=V, seed=7)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    s = 0.125
    p1 = [t.clone().requires_grad_(True) for t in (h, W, bias)]
    got = ntl.linear_cross_entropy_with_ntl(p1[0], p1[1], y, vocab(V), bias=p1[2], backend=backend,
                                            grad_scale=s, chunk_size=8)
    p2 = [t.float().clone().requires_grad_(True) for t in (h, W, bias)]
    ref = plain(F.linear(*p2), y, V)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=tol, atol=tol)
    ops = BigOps(min(N, V) * H)
    with count_launches() as launches, ops:
        (got * s).backward()
    (ref * s).backward()
    if dtype == torch.float32:
        assert ops.big == []
    if backend == "triton":
        assert set(launches) <= {"_scale_rows"} and ops.host_reads == []
    for t1, t2 in zip(p1, p2, strict=True):
        torch.testing.assert_close(t1.grad.float(), t2.grad, rtol=tol, atol=tol * t2.grad.abs().max().item())


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), True, "1"])
def test_grad_scale_rejects_bad_values(bad):
    x, y = batch()
    with pytest.raises((ValueError, TypeError), match="grad_scale"):
        ntl.cross_entropy_with_ntl(x, y, vocab(64), grad_scale=bad)
    with pytest.raises((ValueError, TypeError), match="grad_scale"):
        ntl.cross_entropy_with_ntl(x, y, vocab(64), grad_scale=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="grad_scale"):
        ntl.cross_entropy_with_ntl(x, y, vocab(64), grad_scale=torch.tensor(0.0))


def test_grad_scale_under_torch_compile():
    x, y = batch(N=16, V=300, seed=8)
    voc = vocab(300)
    fn = torch.compile(lambda t, s: ntl.cross_entropy_with_ntl(t, y, voc, backend="torch",
                                                              grad_scale=s), backend="eager",
                       fullgraph=True)
    for s in (0.5, torch.tensor(4.0)):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        got = fn(a, s)
        ref = plain(b, y, 300)
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
        (got * 3.0).backward()
        (ref * 3.0).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ precision (Liger's tolerance)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reweigh", [False, True])
def test_fp32_gradient_with_logits_x10_holds_rtol_1e6_against_float64(backend, reweigh):
    """Logits scaled x10 (``|lse|`` ~ 50): ``p = exp(x - m) / s`` keeps the gradient within
    Liger's ``rtol = 1e-6`` of float64 (``exp(x - lse)`` with an fp32 ``lse`` was 2e-6 off)."""
    g = torch.Generator().manual_seed(11)
    N, V = 32, 4096
    x = torch.randn(N, V, generator=g) * 10.0
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = torch.tensor(IDS)[torch.randint(0, 10, (N // 4,), generator=g)]
    a = x.clone().requires_grad_(True)
    w = 0.0 if not reweigh else 0.3
    loss = ntl.cross_entropy_with_ntl(a, y, vocab(V), ntl_weight=w, reweigh=reweigh, backend=backend)
    loss.backward()
    b = x.double().requires_grad_(True)
    ce = F.cross_entropy(b, y)
    if reweigh:
        ce = ce + w * ntl.ntl_loss(b.float(), y, vocab(V), reweigh=True)  # NTL part in fp32 (fp32 only)
    ce.backward()
    torch.testing.assert_close(loss.double(), ce.detach(), rtol=1e-6, atol=0)
    if not reweigh:
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ unaligned rows, any V
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,offset", [(1003, 0), (1003, 3), (1024, 5), (50, 1)])
def test_triton_rows_at_every_alignment_match_the_twin(dtype, V, offset):
    """Odd ``V`` and views that start mid-vector: the kernel's aligned body and masked ends
    cover every element once (Triton == PyTorch twin, in and out of place)."""
    g = torch.Generator().manual_seed(V + offset)
    N = 9
    flat = torch.randn(N * V + offset, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::2] = torch.tensor(IDS)[torch.randint(0, 10, (len(y[::2]),), generator=g)]
    y[3] = -100
    voc = vocab(max(V, 50))
    grads = []
    for backend, inplace in (("torch", False), ("triton", False), ("triton", True)):
        x = flat.clone()[offset:].view(N, V).requires_grad_(not inplace)
        if inplace:
            x = x.detach().requires_grad_(True).clone()  # a non-leaf whose storage may be overwritten
        loss = ntl.cross_entropy_with_ntl(x, y, voc, backend=backend, reweigh=True, inplace=inplace)
        gx = torch.autograd.grad(loss, x)[0]
        grads.append((loss.detach(), gx.float()))
    ref = grads[0]
    for got in grads[1:]:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol * ref[1].abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
def test_standalone_reweigh_gradient_with_logits_x10_against_ntloss_float64(backend, method):
    """The reweighed standalone backward (row max and sum saved, ``p`` formed from them) on
    logits x10, against ntloss evaluated in float64: equal up to fp32 rounding. The gradient is
    a difference of terms, so entries far below the row's largest carry cancellation: the
    bound is absolute, relative to the largest entry (measured: 1.5e-8 / 1.6e-7 absolute for
    W1 / MSE, both backends alike)."""
    import ntloss
    from toy_tokenizers import DIGIT_IDS, synthetic_tokenizer

    tok, V = synthetic_tokenizer(), 40
    ids = [DIGIT_IDS[str(d)] for d in range(10)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, V, generator=g) * 10.0
    y = torch.tensor(ids)[torch.randint(0, 10, (64,), generator=g)]
    cls = ntloss.NTLoss if method == "wasserstein" else ntloss.NTLossDotProduct
    b = x.double().requires_grad_(True)
    ref = cls(tok, vocab_size=V, digit_level=True, reweigh=True)(b[None], y[None])
    try:
        ref.backward()
    except RuntimeError as e:  # torch 2.8 (the floor): ntloss's MSE mixes fp32 targets into
        if "expected Double" not in str(e):  # a float64 mse_loss, whose backward refuses that
            raise
        pytest.skip(f"the float64 reference (ntloss) cannot backpropagate on torch {torch.__version__}: {e}")
    a = x.clone().requires_grad_(True)
    got = ntl.ntl_loss(a, y, tok, method=method, reweigh=True, backend=backend)
    got.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=0)
    assert b.grad is not None and a.grad is not None
    scale = b.grad.abs().max().item()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=2e-6 * scale)
