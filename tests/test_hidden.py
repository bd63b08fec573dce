"""ntl_loss_from_hidden / digit_logits_from_hidden == NTL of (hidden @ W.T + bias) / T computed plainly.

The reference materialises the full ``[N, V]`` logits with ``F.linear`` and calls the
logits-level loss; gradients of ``hidden``, ``W`` and ``bias`` come from autograd on
that plain graph. fp32 tolerance: 1e-5 relative, 1e-5 absolute (a bit more for the
weight gradients, which sum over rows: 1e-4 absolute).
"""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ntl

V, H = 40, 16
IDS = [31, 3, 17, 8, 22, 0, 39, 12, 26, 5]  # '0'..'9'
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)
TEXT = [1, 2, 20, 38]
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
GTOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-4}


def make(seed, shape=(3, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g)
    d = torch.tensor(IDS)[torch.randint(0, 10, shape, generator=g)]
    t = torch.tensor(TEXT)[torch.randint(0, len(TEXT), shape, generator=g)]
    y = torch.where(torch.rand(shape, generator=g) < 0.6, d, t)
    y.view(-1)[1] = -100
    y.view(-1)[0] = IDS[6]
    return h.to(dtype), W.to(dtype), b.to(dtype), y


def run_both(h, W, b, y, *, use_bias, temperature, up=None, **kw):
    leaves_a = [t.clone().requires_grad_(True) for t in (h, W, b)]
    leaves_b = [t.clone().requires_grad_(True) for t in (h, W, b)]
    ha, Wa, ba = leaves_a
    got = ntl.ntl_loss_from_hidden(ha, Wa, y, VOCAB, temperature=temperature,
                                   bias=ba if use_bias else None, **kw)
    hb, Wb, bb = leaves_b
    logits = F.linear(hb, Wb, bb if use_bias else None) / temperature  # plain [..., V] logits
    method = kw.pop("method", "wasserstein")
    ref = ntl.ntl_loss(logits, y, VOCAB, method=method, **kw)
    u = torch.ones(()) if up is None else up
    (got * u).sum().backward()
    (ref * u).sum().backward()
    return got, ref, leaves_a, leaves_b


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
def test_matches_plain_lm_head(method, use_bias, temperature, reduction):
    h, W, b, y = make(0)
    up = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) if reduction == "none" else None
    w = torch.rand(y.shape, generator=torch.Generator().manual_seed(4))
    got, ref, (ha, Wa, ba), (hb, Wb, bb) = run_both(
        h, W, b, y, use_bias=use_bias, temperature=temperature, up=up, method=method,
        reduction=reduction, weights=w)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(ha.grad, hb.grad, **GTOL)
    torch.testing.assert_close(Wa.grad, Wb.grad, **GTOL)
    if use_bias:
        torch.testing.assert_close(ba.grad, bb.grad, **GTOL)
    # only the number-token rows of W (and entries of the bias) receive gradient
    others = torch.ones(V, dtype=torch.bool)
    others[IDS] = False
    assert Wa.grad is not None and torch.count_nonzero(Wa.grad[others]) == 0
    assert torch.count_nonzero(Wa.grad[IDS]) > 0
    if use_bias:
        assert torch.count_nonzero(ba.grad[others]) == 0


def test_plain_reference_touches_only_digit_rows():
    """Sanity of the reference itself: NTL never touches text rows of W either."""
    h, W, _b, y = make(1)
    Wb = W.clone().requires_grad_(True)
    ntl.ntl_mse_loss(F.linear(h, Wb), y, VOCAB).backward()
    others = [i for i in range(V) if i not in IDS]
    assert torch.count_nonzero(Wb.grad[others]) == 0


def test_soft_targets_and_ignore_index():
    h, W, b, y = make(2)
    T = torch.softmax(torch.randn(*y.shape, 10, generator=torch.Generator().manual_seed(5)), -1)
    got, ref, (ha, Wa, _), (hb, Wb, _) = run_both(h, W, b, y, use_bias=True, temperature=1.3,
                                                  target_dist=T)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(ha.grad, hb.grad, **GTOL)
    torch.testing.assert_close(Wa.grad, Wb.grad, **GTOL)
    y2 = torch.where(y == -100, torch.full_like(y, 20), y)  # ignore_index = a text id
    got, ref, (ha, _, _), (hb, _, _) = run_both(h, W, b, y2, use_bias=False, temperature=1.0,
                                                ignore_index=20, method="mse")
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    torch.testing.assert_close(ha.grad, hb.grad, **GTOL)


def test_digit_logits_from_hidden():
    h, W, b, _ = make(3)
    z = ntl.digit_logits_from_hidden(h, W, VOCAB, temperature=0.5, bias=b)
    full = (h @ W.T + b) / 0.5
    assert z.shape == (*h.shape[:-1], 10) and z.dtype == torch.float32
    torch.testing.assert_close(z, full[..., IDS], **TOL)  # value order '0'..'9'
    z1 = ntl.digit_logits_from_hidden(h, W, IDS)
    torch.testing.assert_close(z1, (h @ W.T)[..., IDS], **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_number_labels(reduction):
    h, W, _b, _ = make(4)
    y = torch.full(h.shape[:-1], 20)
    y[0, 0] = -100
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    loss = ntl.ntl_loss_from_hidden(hh, WW, y, VOCAB, reduction=reduction)
    assert torch.equal(loss.detach(), torch.zeros(loss.shape))
    loss.sum().backward()
    assert torch.equal(hh.grad, torch.zeros_like(h)) and torch.equal(WW.grad, torch.zeros_like(W))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hidden(dtype):
    h, W, b, y = make(5)
    ref = ntl.ntl_loss(F.linear(h, W, b), y, VOCAB)
    hh, WW = h.to(dtype).requires_grad_(True), W.to(dtype).requires_grad_(True)
    got = ntl.ntl_loss_from_hidden(hh, WW, y, VOCAB, bias=b.to(dtype))
    assert got.dtype == torch.float32
    # inputs rounded to 8 (bf16) / 11 (fp16) mantissa bits, products accumulated in fp32
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(got.detach(), ref, rtol=tol, atol=tol)
    got.backward()
    assert hh.grad.dtype == dtype and WW.grad.dtype == dtype
    assert torch.isfinite(hh.grad.float()).all()


def test_qwen_sized_head(qwen_tok):
    g = torch.Generator().manual_seed(0)
    Vq, Hq = 151_936, 8
    W = torch.randn(Vq, Hq, generator=g) * 0.1
    W[15:25] *= 20.0
    h = torch.randn(2, 3, Hq, generator=g)
    y = torch.tensor([[15, 24, 785], [-100, 19, 151_900]])
    Wa, Wb = W.clone().requires_grad_(True), W.clone().requires_grad_(True)
    got = ntl.ntl_loss_from_hidden(h, Wa, y, qwen_tok)
    ref = ntl.ntl_wasserstein_loss(h @ Wb.T, y, qwen_tok)
    torch.testing.assert_close(got.detach(), ref.detach(), **TOL)
    got.backward()
    ref.backward()
    torch.testing.assert_close(Wa.grad[15:25], Wb.grad[15:25], **GTOL)
    assert torch.count_nonzero(Wa.grad[:15]) == 0 and torch.count_nonzero(Wa.grad[25:]) == 0


@pytest.mark.parametrize("method", ["mse", "wasserstein"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_from_digit_logits_equals_loss_on_full_logits(method, reduction):
    g = torch.Generator().manual_seed(5)
    V = 40
    vocab = ntl.NumberVocab([30, 3, 17, 8], [0.0, 2.0, 3.0, 7.0], V)  # ids out of order, gaps 2, 1, 4
    logits = torch.randn(3, 5, V, generator=g, requires_grad=True)
    labels = torch.tensor([[3, 17, -100, 8, 1], [30, 30, 2, 8, 17], [5, 6, 7, 9, 3]])
    full = ntl.ntl_loss(logits, labels, vocab, method=method, reduction=reduction)
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    for backend in ("torch", "triton"):
        z = logits[..., list(vocab.token_ids)]  # gathered by hand, value order
        got = ntl.ntl_loss_from_digit_logits(z, labels, vocab, method=method, reduction=reduction,
                                             backend=backend)
        (g_got,) = torch.autograd.grad(got.sum(), logits)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="digit_logits has 5 columns but the vocab has K=4"):
        ntl.ntl_loss_from_digit_logits(torch.randn(2, 5), torch.tensor([3, 8]), vocab)


def test_digit_logits_with_id_list_accept_text_labels_beyond_max_id():
    """Issue 18.10: with a plain id list, V is unknown (not max(id) + 1): ordinary text labels
    such as 50 take no part instead of raising."""
    ids = list(range(10))
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 4, 10, generator=g, requires_grad=True)
    labels = torch.tensor([[3, 50, 9, 151_000], [-100, 7, 12, 0]])
    for backend in ("torch", "triton"):
        got = ntl.ntl_loss_from_digit_logits(z, labels, ids, reduction="none", backend=backend)
        # reference: the same positions with the text labels replaced by -100
        text = labels >= 10
        ref = ntl.ntl_loss_from_digit_logits(z, labels.masked_fill(text, -100), ids, reduction="none",
                                             backend="torch")
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert torch.all(got[text] == 0) and torch.all(got[~text & (labels >= 0)] > 0)
        got.sum().backward()
        assert torch.all(z.grad[text] == 0)
        z.grad = None
    # a dict works the same; negative labels other than ignore_index are still errors
    d = {i: float(i) for i in ids}
    ntl.ntl_loss_from_digit_logits(z, labels, d)
    with pytest.raises(ValueError, match=r"labels must be token ids >= 0 or ignore_index=-100; got values in \[-5,"):
        ntl.ntl_loss_from_digit_logits(z, labels.masked_fill(labels == 50, -5), ids)


def test_digit_logits_vocab_size_bounds_the_labels(qwen_tok):
    """vocab_size= makes labels >= V an error that says where V came from; a tokenizer's own size
    (len(tokenizer)) is the default bound, also named in the message."""
    z = torch.randn(3, 10)
    ids = list(range(15, 25))
    ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 151_000, 151_935]), ids, vocab_size=151_936)
    with pytest.raises(ValueError, match=r"in \[0, V=151936\) .*\(V is vocab_size=151936\)"):
        ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 151_936, 3]), ids, vocab_size=151_936)
    with pytest.raises(ValueError, match=r"in \[0, V=151665\) .*V is the vocab's vocab_size; pass vocab_size="):
        ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 151_700, 3]), qwen_tok)
    got = ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 151_700, 3]), qwen_tok, vocab_size=151_936)
    ref = ntl.ntl_loss_from_digit_logits(z[:1], torch.tensor([15]), qwen_tok)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=20\)"):
        ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 16, 3]), ids, vocab_size=20)
    with pytest.raises(ValueError, match="vocab_size=20 is too small for the vocab's number token id 24"):
        ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 16, 3]), ntl.DigitVocab(ids, 151_936),
                                       vocab_size=20)
    with pytest.raises(ValueError, match="vocab_size must be a positive int or None, got 0"):
        ntl.ntl_loss_from_digit_logits(z, torch.tensor([15, 16, 3]), ids, vocab_size=0)


def test_hidden_labels_beyond_lm_head_name_it():
    h, W, _b, _ = make(7)
    y = torch.full(h.shape[:-1], 3)
    y[0, 0] = V
    with pytest.raises(ValueError, match=r"in \[0, V=40\) .*\(V is lm_head_weight.shape\[0\]\)"):
        ntl.ntl_loss_from_hidden(h, W, y, VOCAB)
