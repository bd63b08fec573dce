"""linear_cross_entropy_with_ntl == CE + w * NTL of the plain logits ``hidden @ W.T + bias``.

The reference materialises the ``[N, V]`` logits with ``F.linear``, takes
``F.cross_entropy`` of them and adds ``w *`` an NTL written out here from the paper's
formulas (``q = softmax(z_ids)``; W1 ``sum_k q_k |v_k - y|``, MSE ``(sum_k q_k v_k - y)^2``;
reweigh ``m L + 1.01 D (1 - m)`` with ``m`` the full-softmax mass on the number tokens);
gradients of ``hidden``, ``W`` and ``bias`` come from autograd on that plain graph.

Tolerances: fp32 1e-5 (the weight gradient sums over rows: 1e-4 absolute). bf16: the
logits are rounded to bf16 by both routes, the loss is compared with the fp32 math on
the bf16 reference logits (1e-3 relative: the two GEMMs may round a logit differently by
one bf16 ulp), gradients to 2e-2 of their largest entry (bf16 storage, 2^-8 per element,
accumulated over chunks). fp16 runs in fp32: loss 1e-5, gradients to fp16 rounding.
"""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ntl
from ntl.linear import linear_chunk_rows

V, H = 50, 16
IDS = [7, 33, 2, 41, 19, 25, 11, 48, 30, 14]  # '0'..'9' at scattered ids
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)
TEXT = [0, 1, 5, 20, 49]
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
GTOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-4}
REDUCTIONS = ["mean", "sum", "none"]
METHODS = ["wasserstein", "mse"]


def make(seed, N=37, digit_frac=0.5, dtype=torch.float32, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (N,)
    h = torch.randn(*shape, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.6
    W[IDS] += torch.randn(1, H, generator=g) * 0.5  # digit logits correlated, as in LMs
    b = torch.randn(V, generator=g)
    y = torch.tensor(TEXT)[torch.randint(0, len(TEXT), shape, generator=g)]
    d = torch.tensor(IDS)[torch.randint(0, 10, shape, generator=g)]
    y = torch.where(torch.rand(shape, generator=g) < digit_frac, d, y)
    y.view(-1)[1] = -100
    y.view(-1)[-1] = -100
    return h.to(dtype), W.to(dtype), b.to(dtype), y


def ref_loss(logits, y, *, w=0.3, method="wasserstein", reduction="mean", reweigh=False,
             ignore_index=-100, ids=IDS, values=None):
    """Plain CE + w * NTL on materialised logits (NTL from the formulas, not from ntl)."""
    Vx = logits.shape[-1]
    x = logits.reshape(-1, Vx).float()
    yy = y.reshape(-1)
    ce = F.cross_entropy(x, yy, ignore_index=ignore_index, reduction=reduction)
    ids_t = torch.tensor(ids)
    vals = torch.arange(len(ids), dtype=torch.float32) if values is None else torch.tensor(values)
    lut = torch.full((Vx,), -1)
    lut[ids_t] = torch.arange(len(ids))
    kk = torch.where(yy == ignore_index, -1, lut[yy.clamp(0, Vx - 1)])
    active = kk >= 0
    z = x[:, ids_t]
    q = torch.softmax(z, -1)
    yv = vals[kk.clamp_min(0)]
    if method == "mse":
        rows = (q @ vals - yv) ** 2
        D = 1.01 * float(vals.max() - vals.min()) ** 2
    else:
        rows = (q * (vals[None] - yv[:, None]).abs()).sum(-1)
        D = 1.01 * float(vals.max() - vals.min())
    if reweigh:
        m = torch.exp(torch.logsumexp(z, -1) - torch.logsumexp(x, -1))
        rows = m * rows + D * (1 - m)
    rows = torch.where(active, rows, 0.0)
    if reduction == "none":
        return (ce + w * rows).view(y.shape)
    nt = rows.sum() if reduction == "sum" else rows.sum() / active.sum().clamp_min(1)
    return ce + w * nt


def run_both(h, W, b, y, *, use_bias=True, up=None, vocab=VOCAB, ids=IDS, values=None, **kw):
    """(got, ref, got leaves, ref leaves); ``up``: upstream gradient (reduction='none');
    ``ids``/``values``: the vocab as the reference sees it."""
    la = [t.clone().requires_grad_(True) for t in (h, W, b)]
    lb = [t.clone().requires_grad_(True) for t in (h, W, b)]
    ha, Wa, ba = la
    got = ntl.linear_cross_entropy_with_ntl(ha, Wa, y, vocab, bias=ba if use_bias else None, **kw)
    hb, Wb, bb = lb
    logits = F.linear(hb, Wb, bb if use_bias else None)
    rkw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend")}
    if "ntl_weight" in rkw:
        rkw["w"] = rkw.pop("ntl_weight")
    ref = ref_loss(logits, y, ids=ids, values=values, **rkw)
    u = torch.ones(()) if up is None else up
    (got * u).sum().backward()
    (ref * u).sum().backward()
    if not use_bias:
        la, lb = la[:2], lb[:2]
    return got, ref, la, lb


def assert_grads(la, lb, **tol):
    for name, a, b in zip(("hidden", "weight", "bias"), la, lb, strict=False):
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **(tol or GTOL), msg=name)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_plain_logits(method, reduction, reweigh, use_bias):
    h, W, b, y = make(0)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)) if reduction == "none" else None  # signed
    got, ref, la, lb = run_both(h, W, b, y, use_bias=use_bias, up=up, method=method, reduction=reduction,
                                reweigh=reweigh, ntl_weight=0.7, chunk_size=8)  # 37 rows: 4 full + 1 partial
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    assert_grads(la, lb)


def test_reference_agrees_with_ntl_logits_path():
    """The test's own reference equals ntl.cross_entropy_with_ntl on the same logits."""
    h, W, b, y = make(1)
    logits = F.linear(h, W, b)
    for method in METHODS:
        for reweigh in (False, True):
            torch.testing.assert_close(
                ref_loss(logits, y, method=method, reweigh=reweigh),
                ntl.cross_entropy_with_ntl(logits, y, VOCAB, method=method, reweigh=reweigh), **TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 38, 1000, None])
def test_chunk_sizes_agree(chunk_size):
    h, W, b, y = make(2)
    got, ref, la, lb = run_both(h, W, b, y, chunk_size=chunk_size, reweigh=True)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    assert_grads(la, lb)


def test_chunk_rows_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert linear_chunk_rows(37, H, V, cpu, 5) == 5
    assert linear_chunk_rows(37, H, V, cpu, 1000) == 37
    assert linear_chunk_rows(2048, 896, 151_936, cpu) == 224  # H / 4: a quarter of dL/dW's size
    assert linear_chunk_rows(2048, 3584, 151_936, cpu) == 896
    assert linear_chunk_rows(2048, 100, 151_936, cpu) == 32  # at least 32 rows
    assert linear_chunk_rows(3, 896, 151_936, cpu) == 3
    # CUDA: Liger's rule next_pow2(ceil(N / ceil(V / H)))
    assert linear_chunk_rows(16384, 3584, 151_936, cuda) == 512  # ceil(16384 / 43) = 382 -> 512
    assert linear_chunk_rows(2048, 896, 151_936, cuda) == 16  # ceil(2048 / 170) = 13 -> 16


def test_batched_and_non_contiguous_hidden():
    g = torch.Generator().manual_seed(3)
    h_tb = torch.randn(7, 3, H, generator=g)
    h = h_tb.transpose(0, 1)  # [3, 7, H], not contiguous
    _, W, b, y = make(3, shape=(3, 7))
    assert not h.is_contiguous()
    got, ref, la, lb = run_both(h, W, b, y, chunk_size=4, reduction="none",
                                up=torch.rand(3, 7, generator=g))
    assert got.shape == (3, 7)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    assert_grads(la, lb)
    assert la[0].grad.shape == h.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_rows_without_digits_is_plain_cross_entropy(reduction):
    h, W, b, y = make(4, digit_frac=0.0)
    got, ref, la, lb = run_both(h, W, b, y, reduction=reduction, chunk_size=6)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    assert_grads(la, lb)
    ce = F.cross_entropy(F.linear(h, W, b), y, reduction=reduction)
    torch.testing.assert_close(got.detach(), ce, **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_is_zero_not_nan(reduction):
    h, W, _, _ = make(5, N=9)
    y = torch.full((9,), -100)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss = ntl.linear_cross_entropy_with_ntl(hh, WW, y, VOCAB, reduction=reduction, chunk_size=4)
    assert torch.equal(loss.detach(), torch.zeros(loss.shape))
    loss.sum().backward()
    assert torch.equal(hh.grad, torch.zeros_like(h)) and torch.equal(WW.grad, torch.zeros_like(W))


def test_empty_batch():
    h = torch.zeros(0, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    loss = ntl.linear_cross_entropy_with_ntl(h, W, torch.zeros(0, dtype=torch.long), VOCAB)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert h.grad.shape == (0, H) and torch.equal(W.grad, torch.zeros_like(W))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ignore_index(reduction):
    for ign in (TEXT[2], IDS[4]):  # a text id (pad) and a digit id (then that digit is ignored)
        h, W, b, y = make(6)
        y = torch.where(y == -100, torch.full_like(y, ign), y)
        y[:4] = ign
        up = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
        got, ref, la, lb = run_both(h, W, b, y, reduction=reduction, ignore_index=ign, chunk_size=10, up=up)
        torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
        assert_grads(la, lb)


def test_number_vocab_with_large_values():
    """Non-digit values (Llama-3 style numbers): gaps > 1, MSE scale ~ values^2."""
    ids, vals = [3, 9, 21, 44, 12], [0.0, 7.0, 10.0, 100.0, 999.0]
    vocab = ntl.NumberVocab(ids, vals, vocab_size=V)
    h, W, b, _ = make(7)
    g = torch.Generator().manual_seed(7)
    y = torch.tensor(ids + TEXT)[torch.randint(0, 10, (37,), generator=g)]
    for method in METHODS:
        got, ref, la, lb = run_both(h, W, b, y, vocab=vocab, method=method, reweigh=True, chunk_size=7,
                                    ids=ids, values=vals)
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-3)
        assert_grads(la, lb, rtol=1e-4, atol=1e-3)


def test_tied_embedding_weight():
    """The head weight is the input embedding: both uses reach one gradient."""
    g = torch.Generator().manual_seed(8)
    emb_ref = torch.nn.Embedding(V, H)
    with torch.no_grad():
        emb_ref.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
    emb = torch.nn.Embedding(V, H)
    emb.load_state_dict(emb_ref.state_dict())
    A = torch.randn(H, H, generator=g) * 0.3
    tokens = torch.randint(0, V, (4, 9), generator=g)
    y = torch.roll(tokens, -1, dims=1)
    y[:, -1] = -100
    y[:, ::3] = torch.tensor(IDS)[torch.randint(0, 10, (4, 3), generator=g)]

    hidden = torch.tanh(emb(tokens) @ A)
    loss = ntl.linear_cross_entropy_with_ntl(hidden, emb.weight, y, VOCAB, chunk_size=5)
    loss.backward()
    hidden_r = torch.tanh(emb_ref(tokens) @ A)
    ref = ref_loss(hidden_r @ emb_ref.weight.T, y)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(emb.weight.grad, emb_ref.weight.grad, **GTOL)


def test_only_some_inputs_require_grad():
    h, W, b, y = make(9)
    logits_ref = F.linear(h.clone().requires_grad_(True), W, b)
    # frozen head (LoRA / linear probe): gradient of hidden only
    hh = h.clone().requires_grad_(True)
    ntl.linear_cross_entropy_with_ntl(hh, W, y, VOCAB, bias=b, chunk_size=6).backward()
    hr = h.clone().requires_grad_(True)
    ref_loss(F.linear(hr, W, b), y).backward()
    torch.testing.assert_close(hh.grad, hr.grad, **GTOL)
    # fixed features: gradient of the head (and bias) only
    WW, bb = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ntl.linear_cross_entropy_with_ntl(h, WW, y, VOCAB, bias=bb, chunk_size=6).backward()
    Wr, br = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref_loss(F.linear(h, Wr, br), y).backward()
    torch.testing.assert_close(WW.grad, Wr.grad, **GTOL)
    torch.testing.assert_close(bb.grad, br.grad, **GTOL)
    assert logits_ref.requires_grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_gives_the_value_and_no_graph(reduction):
    h, W, b, y = make(10)
    ref = ref_loss(F.linear(h, W, b), y, reduction=reduction, reweigh=True)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    with torch.no_grad():
        got = ntl.linear_cross_entropy_with_ntl(hh, WW, y, VOCAB, bias=b, reduction=reduction, reweigh=True,
                                                chunk_size=5)
    assert not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got, ref, **TOL)
    got2 = ntl.linear_cross_entropy_with_ntl(h, W, y, VOCAB, bias=b, reduction=reduction, reweigh=True)
    assert not got2.requires_grad  # nothing requires grad: also no graph
    torch.testing.assert_close(got2, ref, **TOL)


def test_return_parts():
    h, W, b, y = make(11)
    hh = h.clone().requires_grad_(True)
    loss, ce, nt = ntl.linear_cross_entropy_with_ntl(hh, W, y, VOCAB, bias=b, ntl_weight=0.25,
                                                     return_parts=True, chunk_size=9)
    logits = F.linear(h, W, b)
    torch.testing.assert_close(ce, F.cross_entropy(logits, y), **TOL)
    torch.testing.assert_close(nt, ref_loss(logits, y, w=1.0) - F.cross_entropy(logits, y), **TOL)
    torch.testing.assert_close(loss.detach(), ce + 0.25 * nt, **TOL)
    assert not ce.requires_grad and not nt.requires_grad and loss.requires_grad
    loss, ce, nt = ntl.linear_cross_entropy_with_ntl(hh, W, y, VOCAB, bias=b, reduction="none",
                                                     return_parts=True)
    assert ce.shape == nt.shape == loss.shape == y.shape
    torch.testing.assert_close(ce, F.cross_entropy(logits, y, reduction="none"), **TOL)


def test_backward_once_and_no_double_backward():
    h, W, _, y = make(12)
    hh = h.clone().requires_grad_(True)
    loss = ntl.linear_cross_entropy_with_ntl(hh, W, y, VOCAB)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    loss = ntl.linear_cross_entropy_with_ntl(hh, W, y, VOCAB)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(loss, hh, create_graph=True)


def test_scaled_upstream_gradient():
    """loss * s backpropagates s * the gradient (backward scales the stored gradients)."""
    h, W, b, y = make(13)
    la = [t.clone().requires_grad_(True) for t in (h, W, b)]
    lb = [t.clone().requires_grad_(True) for t in (h, W, b)]
    (ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, VOCAB, bias=la[2], chunk_size=8) * -2.5).backward()
    (ref_loss(F.linear(*lb), y) * -2.5).backward()
    assert_grads(la, lb)


def test_module_twin():
    h, W, b, y = make(14)
    crit = ntl.LinearCrossEntropyWithNTL(VOCAB, ntl_weight=0.5, method="mse", reduction="sum", chunk_size=6)
    assert "method='mse'" in repr(crit) and "chunk_size=6" in repr(crit)
    got = crit(h, W, y, bias=b)
    torch.testing.assert_close(got, ref_loss(F.linear(h, W, b), y, w=0.5, method="mse", reduction="sum"),
                               **TOL)
    with pytest.raises(ValueError, match="chunk_size"):
        ntl.LinearCrossEntropyWithNTL(VOCAB, chunk_size=0)


def test_qwen_tokenizer_vocab(qwen_tok):
    """Real tokenizer, padded vocabulary (151,936 logits for 151,665 tokens), few rows."""
    Vq = 151_936
    g = torch.Generator().manual_seed(15)
    h = torch.randn(6, 8, generator=g)
    W = torch.randn(Vq, 8, generator=g) * 0.3
    y = torch.tensor([15, 24, 785, -100, 19, 151_900])  # '0', '9', text, ignored, '4', padded id
    vocab = ntl.DigitVocab.from_tokenizer(qwen_tok, vocab_size=Vq)
    got, ref, la, lb = run_both(h, W, torch.zeros(Vq), y, use_bias=False, vocab=vocab, chunk_size=4,
                                ids=list(vocab.token_ids))
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    assert_grads(la, lb)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16(reduction):
    h, W, b, y = make(16, dtype=torch.bfloat16)
    up = torch.rand(y.shape, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    la = [t.clone().requires_grad_(True) for t in (h, W, b)]
    got = ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, VOCAB, bias=la[2], reduction=reduction,
                                            chunk_size=8)
    assert got.dtype == torch.float32
    # value: fp32 math on the bf16 logits (both routes round the logits to bf16)
    ref_bf = ref_loss(F.linear(h, W, b), y, reduction=reduction)
    torch.testing.assert_close(got.detach(), ref_bf, rtol=1e-3, atol=1e-3)
    # gradients: to bf16 rounding of the fp32 gradients on the upcast inputs
    lb = [t.float().requires_grad_(True) for t in (h, W, b)]
    ref = ref_loss(F.linear(*lb), y, reduction=reduction)
    u = torch.ones(()) if up is None else up
    (got * u).sum().backward()
    (ref * u).sum().backward()
    for a, r in zip(la, lb, strict=True):
        assert a.grad.dtype == torch.bfloat16
        assert (a.grad.float() - r.grad.float()).abs().max() <= 2e-2 * r.grad.abs().max()


@pytest.mark.parametrize("scale", [1.0, 2.0 ** 16])
def test_fp16_computes_in_fp32(scale):
    """fp16: value as fp32 math; gradients the fp16 rounding of the fp32 ones, also when a
    GradScaler-size factor (2^16, inf in fp16 arithmetic on small mean gradients) comes in."""
    h, W, b, y = make(17, dtype=torch.float16)
    la = [t.clone().requires_grad_(True) for t in (h, W, b)]
    got = ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, VOCAB, bias=la[2], chunk_size=8)
    lb = [t.float().requires_grad_(True) for t in (h, W, b)]
    ref = ref_loss(F.linear(*lb), y)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    (got * scale).backward()
    (ref * scale).backward()
    for a, r in zip(la, lb, strict=True):
        assert a.grad.dtype == torch.float16 and torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, r.grad.half(), rtol=2e-3, atol=1e-7 * scale)


# --------------------------------------------------------------------------- Triton (interpreter)


@pytest.mark.parametrize(("method", "reduction", "reweigh", "dtype"), [
    ("wasserstein", "mean", False, torch.float32),
    ("mse", "none", True, torch.float32),
    ("wasserstein", "sum", True, torch.float32),
    ("wasserstein", "mean", False, torch.bfloat16),
])
def test_triton_path_matches(method, reduction, reweigh, dtype):
    h, W, b, y = make(18, N=21, dtype=dtype)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)) if reduction == "none" else None  # signed
    la = [t.clone().requires_grad_(True) for t in (h, W, b)]
    got = ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, VOCAB, bias=la[2], method=method,
                                            reduction=reduction, reweigh=reweigh, chunk_size=8,
                                            backend="triton")
    lb = [t.clone().requires_grad_(True) for t in (h, W, b)]
    ref = ntl.linear_cross_entropy_with_ntl(lb[0], lb[1], y, VOCAB, bias=lb[2], method=method,
                                            reduction=reduction, reweigh=reweigh, chunk_size=8,
                                            backend="torch")
    lc = [t.float().requires_grad_(True) for t in (h, W, b)]
    plain = ref_loss(F.linear(*lc), y, method=method, reduction=reduction, reweigh=reweigh)
    u = torch.ones(()) if up is None else up
    for out in (got, ref, plain):
        (out * u).sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(got.detach(), plain.detach(), **TOL)
        for a, c in zip(la, lc, strict=True):
            torch.testing.assert_close(a.grad, c.grad, **GTOL)
    else:  # the same bf16 logits chunks: the two backends agree to bf16 rounding
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
        for a, r in zip(la, lb, strict=True):
            assert a.grad.dtype == torch.bfloat16
            assert (a.grad.float() - r.grad.float()).abs().max() <= 1e-2 * r.grad.float().abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_squash_factor_matches_the_logits_path(backend, reduction, reweigh):
    """``squash_factor`` equals ``F.cross_entropy + w * ntl_wasserstein_loss(squash_factor=...)``
    on the materialised logits (the standalone squash is checked against ntloss)."""
    if backend == "triton":
        pytest.importorskip("triton")
    h, W, b, y = make(21, N=23)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)) if reduction == "none" else None
    la = [t.clone().requires_grad_(True) for t in (h, W, b)]
    got = ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, VOCAB, bias=la[2], reduction=reduction,
                                            reweigh=reweigh, chunk_size=8, backend=backend,
                                            squash_factor=4.0)
    lb = [t.clone().requires_grad_(True) for t in (h, W, b)]
    logits = F.linear(*lb)
    ce = F.cross_entropy(logits, y, reduction=reduction)
    ref = ce + 0.3 * ntl.ntl_wasserstein_loss(logits, y, VOCAB, reduction=reduction, reweigh=reweigh,
                                              squash_factor=4.0, backend="torch")
    u = torch.ones(()) if up is None else up
    (got * u).sum().backward()
    (ref * u).sum().backward()
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    for a, c in zip(la, lb, strict=True):
        torch.testing.assert_close(a.grad, c.grad, **GTOL)
    plain = ntl.linear_cross_entropy_with_ntl(h, W, y, VOCAB, bias=b, reduction=reduction, reweigh=reweigh)
    assert not torch.allclose(plain, got.detach())  # the squash changes the loss
    crit = ntl.LinearCrossEntropyWithNTL(VOCAB, reduction=reduction, reweigh=reweigh, squash_factor=4.0,
                                         backend=backend, chunk_size=8)
    torch.testing.assert_close(crit(h, W, y, bias=b), got.detach(), **TOL)


def test_squash_factor_bad_values():
    h, W, _, y = make(22, N=5)
    with pytest.raises(ValueError, match="squash_factor"):
        ntl.linear_cross_entropy_with_ntl(h, W, y, VOCAB, squash_factor=1.0)
    with pytest.raises(ValueError, match="Wasserstein"):
        ntl.linear_cross_entropy_with_ntl(h, W, y, VOCAB, method="mse", squash_factor=3.0)
    with pytest.raises(TypeError, match="squash_factor"):
        ntl.LinearCrossEntropyWithNTL(VOCAB, squash_factor="2")


# --------------------------------------------------------------------------- properties


@given(N=st.integers(1, 30), Hs=st.integers(1, 9), chunk=st.integers(1, 40), digit_frac=st.floats(0, 1),
       method=st.sampled_from(METHODS), reduction=st.sampled_from(REDUCTIONS), reweigh=st.booleans(),
       use_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_plain_logits(N, Hs, chunk, digit_frac, method, reduction, reweigh, use_bias, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, Hs, generator=g) * 2
    W = torch.randn(V, Hs, generator=g)
    b = torch.randn(V, generator=g)
    d = torch.tensor(IDS)[torch.randint(0, 10, (N,), generator=g)]
    t = torch.randint(0, V, (N,), generator=g)
    y = torch.where(torch.rand(N, generator=g) < digit_frac, d, t)
    y = torch.where(torch.rand(N, generator=g) < 0.1, torch.full_like(y, -100), y)
    if reduction == "mean" and bool((y == -100).all()):
        y[0] = IDS[0]  # F.cross_entropy's mean of nothing is NaN (ours: 0, tested above)
    up = torch.randn(N, generator=g) if reduction == "none" else None
    got, ref, la, lb = run_both(h, W, b, y, use_bias=use_bias, up=up, method=method, reduction=reduction,
                                reweigh=reweigh, chunk_size=chunk)
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-4)
    # fp32 sums over up to 30 rows of gradients up to ~D = 82 (MSE, reweigh): an absolute
    # error ~1e-5 of the largest entry is roundoff on both sides (seen: 2e-4 at max 35)
    for name, a, r in zip(("hidden", "weight", "bias"), la, lb, strict=False):
        assert a.grad is not None and r.grad is not None, name
        scale = float(r.grad.abs().max())
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=max(1e-4, 2e-5 * scale), msg=name)


# --------------------------------------------------------------------------- bad input


def _call(**over):
    h, W, _, y = make(19, N=6)
    kw = {"hidden": h, "weight": W, "labels": y, "vocab_or_tokenizer": VOCAB}
    kw.update(over)
    return lambda: ntl.linear_cross_entropy_with_ntl(**kw)


BAD = [
    (TypeError, "hidden must be a floating-point", _call(hidden=torch.ones(6, H, dtype=torch.long))),
    (TypeError, "hidden must be a torch.Tensor", _call(hidden=[[0.0] * H] * 6)),
    (TypeError, "weight must be a 2-D float tensor", _call(weight=torch.ones(V, H, dtype=torch.int32))),
    (TypeError, "weight must be a 2-D float tensor", _call(weight=torch.ones(V, H, 1))),
    (ValueError, r"weight shape \(50, 15\) does not match hidden size 16", _call(weight=torch.ones(V, 15))),
    (TypeError, "weight dtype torch.float64 differs from hidden dtype", _call(weight=torch.ones(V, H).double())),
    (ValueError, "weight is on meta but hidden is on cpu", _call(weight=torch.ones(V, H, device="meta"))),
    (ValueError, r"bias shape \(49,\) must be \[V=50\]", _call(bias=torch.ones(49))),
    (TypeError, "bias must be a float tensor", _call(bias=torch.ones(V, dtype=torch.long))),
    (TypeError, "bias dtype torch.bfloat16 differs", _call(bias=torch.ones(V, dtype=torch.bfloat16))),
    (ValueError, r"labels shape \(5,\) does not match hidden.shape\[:-1\] \(6,\)",
     _call(labels=torch.zeros(5, dtype=torch.long))),
    (TypeError, "labels must be an integer tensor", _call(labels=torch.zeros(6))),
    (ValueError, r"labels must be token ids in \[0, V=50\)", _call(labels=torch.tensor([0, 1, 2, 3, 4, 50]))),
    (ValueError, "vocab larger than the logits", _call(vocab_or_tokenizer=ntl.DigitVocab(IDS, vocab_size=60))),
    (ValueError, "ntl_weight must be a finite non-negative number", _call(ntl_weight=-0.1)),
    (ValueError, "ntl_weight must be a finite non-negative number", _call(ntl_weight=True)),
    (ValueError, "chunk_size must be a positive int", _call(chunk_size=0)),
    (ValueError, "chunk_size must be a positive int", _call(chunk_size=2.0)),
    (ValueError, "reduction must be one of", _call(reduction="avg")),
    (ValueError, "method must be one of", _call(method="l1")),
    (ValueError, "backend must be one of", _call(backend="cuda")),
    (TypeError, "reweigh must be a bool", _call(reweigh=1)),
    (TypeError, "return_parts must be a bool", _call(return_parts="yes")),
    (TypeError, "ignore_index must be an int", _call(ignore_index=-100.0)),
]


@pytest.mark.parametrize(("exc", "pattern", "thunk"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_raises(exc, pattern, thunk):
    with pytest.raises(exc, match=pattern):
        thunk()


# --------------------------------------------------------------------------- real GPU (compiled kernels)

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_logits_path(dtype, qwen_tok):
    Vq, N, Hq = 151_936, 2048, 896
    vocab = ntl.DigitVocab.from_tokenizer(qwen_tok, vocab_size=Vq)
    g = torch.Generator().manual_seed(20)
    h = torch.randn(N, Hq, generator=g).to("cuda", dtype)
    W = (torch.randn(Vq, Hq, generator=g) * Hq ** -0.5).to("cuda", dtype)
    y = torch.randint(0, 151_665, (N,), generator=g)
    y[::4] = torch.tensor(list(vocab.token_ids))[torch.randint(0, 10, (N // 4,), generator=g)]
    y[1::9] = -100
    y = y.cuda()
    la = [t.clone().requires_grad_(True) for t in (h, W)]
    got = ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, vocab, reweigh=True)  # auto: Triton kernel
    lb = [t.clone().requires_grad_(True) for t in (h, W)]
    ref = ntl.cross_entropy_with_ntl(lb[0] @ lb[1].T, y, vocab, reweigh=True, backend="torch")
    got.backward()
    ref.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                               atol=1e-4)
    for a, b in zip(la, lb, strict=True):
        err = (a.grad.float() - b.grad.float()).abs().max() / b.grad.float().abs().max()
        assert err <= (1e-4 if dtype == torch.float32 else 3e-2), float(err)


@gpu
def test_gpu_memory_and_no_host_sync(qwen_tok):
    Vq, N, Hq = 151_936, 8192, 896
    vocab = ntl.DigitVocab.from_tokenizer(qwen_tok, vocab_size=Vq)
    h = torch.randn(N, Hq, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(Vq, Hq, device="cuda") * Hq ** -0.5).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(15, 25, (N,), device="cuda")
    ntl.linear_cross_entropy_with_ntl(h, W, y, vocab).backward()  # warm-up: compile, caches
    h.grad = W.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ntl.set_strict_checks(False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ntl.linear_cross_entropy_with_ntl(h, W, y, vocab)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        ntl.set_strict_checks(True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    rows = linear_chunk_rows(N, Hq, Vq, h.device)
    need = (N * Hq + Vq * Hq) * 2 + Vq * 4 + rows * Vq * 2  # dL/dh, dL/dW (bf16), fp32 bias/sum, one chunk
    assert peak <= 1.15 * need + (8 << 20), (peak, need)
    assert peak < N * Vq * 2  # not even one bf16 [N, V] tensor
