"""DEL and DIST² (issue 28): hand-computed values, an independent float64 formula with its
autograd gradient, both backends, place weights by hand, and the refusals.

Every expected value is written by hand or computed by the float64 formulas below, which
are written here from the definitions (not from ``ntl.methods``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ntl
from ntl.methods import DEL, DIST2
from ntl.number_level import place_weights

BACKENDS = ["torch", "triton"]
DOT, TEXT = 10, 11  # DIGITS below: id k is digit k, 10 is '.', 11 and 12 are text
DIGITS = ntl.DigitVocab(list(range(10)), vocab_size=13)
DIGITS10 = ntl.DigitVocab(list(range(10)), vocab_size=10)
VALS = torch.arange(10, dtype=torch.float64)


# --------------------------------------------------------------------------- float64 formulas
def del64(z: torch.Tensor, t: torch.Tensor, pw: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row DEL in float64: pw (1/K) sum_k softmax(z)_k BCE(sigmoid(z_k), [k = t])."""
    z = z.double()
    K = z.shape[-1]
    y = F.one_hot(t, K).double()
    p = torch.sigmoid(z)
    bce = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))  # the textbook BCE
    L = (torch.softmax(z, -1) * bce).sum(-1) / K
    return L if pw is None else L * pw.double()


def dist64(z: torch.Tensor, y: torch.Tensor, values: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row KL(t || softmax(z)) in float64, t_k = exp(-(v_k - y)^2 / tau) normalised."""
    t = torch.exp(-(values.double()[None, :] - y.double()[:, None]) ** 2 / tau)
    t = t / t.sum(-1, keepdim=True)
    logq = torch.log(torch.softmax(z.double(), -1))
    return (torch.where(t > 0, t * (torch.log(t) - logq), 0.0)).sum(-1)


def digits_of(text: str) -> list[int]:
    return [int(c) if c.isdigit() else (DOT if c == "." else TEXT) for c in text]


# --------------------------------------------------------------------------- by hand, 3 columns
THREE = ntl.NumberVocab([0, 1, 2], [0.0, 1.0, 2.0], vocab_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_del_three_columns_by_hand(backend):
    # z = (ln 3, 0, -ln 3), target column 0: q = (9, 3, 1) / 13, softplus = (ln 4, ln 2, ln 4/3),
    # b = (ln 4 - ln 3, ln 2, ln 4/3)
    z = torch.tensor([[math.log(3), 0.0, -math.log(3), -5.0]])
    want = (10 / 13 * math.log(4 / 3) + 3 / 13 * math.log(2)) / 3
    got = ntl.ntl_loss(z, torch.tensor([0]), THREE, method=DEL(place_weights=False), backend=backend)
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-7)  # fp32: a small KL
    # z = 0, target 1: q = 1/3, b = ln 2 everywhere, so L = ln 2 / 3 and
    # dL/dz_j = (1/3)(1/3)(1/2 - [j = 1]) (the b_j - S term vanishes)
    x = torch.tensor([[0.0, 0.0, 0.0, 7.0]], requires_grad=True)
    loss = ntl.ntl_loss(x, torch.tensor([1]), THREE, method=DEL(place_weights=False), backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2) / 3, rel=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor([[1 / 18, -1 / 18, 1 / 18, 0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dist2_three_columns_by_hand(backend):
    # values (0, 1, 2), y = 1, tau = 1: t = (1/e, 1, 1/e) / c with c = 1 + 2/e; q = 1/3:
    # KL = ln 3 - ln c - 2 / (e c);  dL/dz = q - t
    c = 1 + 2 / math.e
    x = torch.tensor([[0.0, 0.0, 0.0, 3.0]], requires_grad=True)
    loss = ntl.ntl_loss(x, torch.tensor([1]), THREE, method="dist2", backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(3) - math.log(c) - 2 / (math.e * c), rel=1e-6)
    t = torch.tensor([1 / (math.e * c), 1 / c, 1 / (math.e * c)])
    torch.testing.assert_close(x.grad[0, :3], 1 / 3 - t)
    assert x.grad[0, 3] == 0
    # tau = 2 halves the exponent: t = (e^-1/2, 1, e^-1/2) / (1 + 2 e^-1/2)
    c2 = 1 + 2 * math.exp(-0.5)
    t2 = [math.exp(-0.5) / c2, 1 / c2, math.exp(-0.5) / c2]
    want = sum(ti * math.log(ti * 3) for ti in t2)
    got = ntl.ntl_loss(x.detach(), torch.tensor([1]), THREE, method=DIST2(tau=2.0), backend=backend)
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-7)  # fp32: a small KL


# --------------------------------------------------------------------------- place weights by hand
@pytest.mark.parametrize(("text", "want"), [
    ("123", [6, 4, 2]),
    ("12.5", [4, 2, 1, 1.02 ** -2]),
    ("0.07", [2, 1, 1.02 ** -2, 1.02 ** -3]),
    ("x12 3.25x", [1, 4, 2, 1, 2, 1, 1.02 ** -2, 1.02 ** -3, 1]),  # two numbers packed in one row
    ("12.", [4, 2, 1]),  # a trailing '.' is a full stop
    (".5", [1, 2]),  # so is a leading one
    ("7", [2]),
])
def test_place_weights_by_hand(text, want):
    got = place_weights(torch.tensor(digits_of(text)), DIGITS, DOT, -100)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_place_weights_rows_ignore_and_no_decimal_point():
    lab = torch.tensor([digits_of("12.5"), digits_of("3x45")])
    lab[1, 1] = -100  # ignore_index ends a number too
    got = place_weights(lab, DIGITS, DOT, -100)
    torch.testing.assert_close(got, torch.tensor([[4, 2, 1, 1.02 ** -2], [2, 1, 4, 2]]))
    # without a decimal point id, '12.5' is the integers 12 and 5
    got = place_weights(lab[:1], DIGITS, None, -100)
    torch.testing.assert_close(got, torch.tensor([[4.0, 2.0, 1.0, 2.0]]))


# --------------------------------------------------------------------------- the entry points
def batch(seed: int = 0, B: int = 3, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 13, generator=g) * 2
    lab = torch.randint(0, 13, (B, T), generator=g)
    lab[0, :5] = torch.tensor(digits_of("12.57"))
    lab[1, 0] = -100
    lab[2] = TEXT  # a row with no digits
    return x, lab


def reference(x, lab, method, w=None):
    """(mean, per-position) of the NTL part in float64, from the formulas above."""
    B, T, _ = x.shape
    z = x[..., :10].reshape(-1, 10)
    flat = lab.reshape(-1)
    digit = (flat >= 0) & (flat < 10)
    t = flat.clamp(0, 9)
    if isinstance(method, DEL):
        pw = None
        if method.place_weights:
            pw = place_weights_by_loop(lab, method.decimal_point_id).reshape(-1)
        L = del64(z, t, pw)
    else:
        L = dist64(z, t.double(), VALS, method.tau)
    wt = torch.ones_like(L) if w is None else w.reshape(-1).double()
    rows = torch.where(digit, L * wt, 0.0)
    return rows.sum() / torch.where(digit, wt, 0.0).sum(), rows.view(B, T)


def place_weights_by_loop(lab, dot):
    """The place weights by a plain Python loop over the digits as strings (independent)."""
    out = torch.ones(lab.shape, dtype=torch.float64)
    for r in range(lab.shape[0]):
        row = lab[r].tolist()
        T = len(row)
        t = 0
        while t < T:
            if not 0 <= row[t] < 10:
                t += 1
                continue
            e = t  # the number: digits, and one '.' between digits (the first point counts)
            while e < T and (0 <= row[e] < 10 or (row[e] == dot and e + 1 < T and 0 <= row[e + 1] < 10
                                                  and 0 <= row[e - 1] < 10)):
                e += 1
            text = "".join("." if row[i] == dot else str(row[i]) for i in range(t, e))
            head = text.partition(".")[0]
            for i, pos in enumerate(j for j in range(t, e) if row[j] != dot):
                if i < len(head):
                    out[r, pos] = 2 * (len(head) - 1 - i + 1)
                else:
                    out[r, pos] = 1.02 ** -((i - len(head) + 1) + 1)
            t = e
    return out


# DIGITS is no tokenizer, so DEL() knows no '.': '12.57' is then the integers 12 and 57
METHODS = [DEL(decimal_point_id=DOT), DEL(), DEL(place_weights=False), DIST2(), DIST2(tau=0.3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_ntl_loss_matches_float64(method, backend):
    x, lab = batch()
    w = torch.rand(lab.shape, generator=torch.Generator().manual_seed(3))
    for weights in (None, w):
        xr = x.double().requires_grad_(True)
        want, rows = reference(xr, lab, method, weights)
        want.backward()
        xa = x.clone().requires_grad_(True)
        got = ntl.ntl_loss(xa, lab, DIGITS, method=method, weights=weights, backend=backend)
        got.backward()
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
        none = ntl.ntl_loss(x, lab, DIGITS, method=method, weights=weights, reduction="none",
                            backend=backend)
        torch.testing.assert_close(none.double(), rows.detach(), rtol=1e-5, atol=1e-6)
        total = ntl.ntl_loss(x, lab, DIGITS, method=method, weights=weights, reduction="sum",
                             backend=backend)
        torch.testing.assert_close(total.double(), rows.sum().detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_cross_entropy_with_ntl_matches_float64(method, backend):
    x, lab = batch(1)
    xr = x.double().requires_grad_(True)
    ntl_part, _ = reference(xr, lab, method)
    want = F.cross_entropy(xr.reshape(-1, 13), lab.reshape(-1)) + 0.3 * ntl_part
    want.backward()
    xa = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(xa, lab, DIGITS, method=method, ntl_weight=0.3, backend=backend)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)


def test_del_finite_differences():
    z = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3
    t = torch.tensor([0, 3, 9, 5])
    pw = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: del64(a, t, pw).sum(), (z.requires_grad_(True),))
    # and the library's fp32 analytic gradient against central differences of float64
    x = z.detach().float().requires_grad_(True)
    ntl.ntl_loss(x, t, DIGITS10, method=DEL(place_weights=False), reduction="sum", backend="torch").backward()
    h = 1e-6
    fd = torch.zeros_like(z)
    for i in range(4):
        for j in range(10):
            e = torch.zeros_like(z)
            e[i, j] = h
            fd[i, j] = (del64(z + e, t).sum() - del64(z - e, t).sum()) / (2 * h)
    torch.testing.assert_close(x.grad.double(), fd, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- refusals
def test_parameters_and_refusals():
    x, lab = batch()
    with pytest.raises(ValueError, match="tau must be a positive finite"):
        DIST2(tau=0.0)
    with pytest.raises(ValueError, match="tau must be a positive finite"):
        DIST2(tau=float("inf"))
    with pytest.raises(TypeError, match="tau must be a positive number"):
        DIST2(tau="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="place_weights must be a bool"):
        DEL(place_weights=1)  # type: ignore[arg-type]
    for m in ("del", "dist2"):
        with pytest.raises(ValueError, match=f"method '{m}' is unbounded"):
            ntl.ntl_loss(x, lab, DIGITS, method=m, reweigh=True)
        with pytest.raises(ValueError, match=f"method '{m}' is unbounded"):
            ntl.cross_entropy_with_ntl(x, lab, DIGITS, method=m, reweigh=True)
        with pytest.raises(ValueError, match="target_dist is only supported"):
            ntl.ntl_loss(x, lab, DIGITS, method=m, target_dist=torch.full((*lab.shape, 10), 0.1))
    # a vocab of arbitrary values without texts: the digit widths are unknown
    with pytest.raises(ValueError, match="place weights need the digit width"):
        ntl.ntl_loss(torch.randn(2, 4), torch.tensor([0, 1]), THREE, method="del")
    assert ntl.methods.resolve("dist2") == DIST2(1.0) and ntl.methods.resolve("del") == DEL()


# --------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 20.0))
def test_properties_nonnegative_and_gradient(seed, tau):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 10, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 10, (6,), generator=g)
    for method, ref in ((DEL(place_weights=False), lambda a: del64(a, t)),
                        (DIST2(tau=tau), lambda a: dist64(a, t.double(), VALS, tau))):
        x = z.float().requires_grad_(True)
        got = ntl.ntl_loss(x, t, DIGITS10, method=method, reduction="none", backend="torch")
        assert (got >= 0).all()
        got.sum().backward()
        zr = z.clone().requires_grad_(True)
        want = ref(zr)
        want.sum().backward()
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), zr.grad, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- dtypes, odd shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", [DEL(decimal_point_id=DOT), DIST2(tau=0.7)], ids=str)
def test_triton_dtypes_and_odd_shapes(method, dtype):
    """3 x 37 rows of V = 13 (no multiple of any block) in each float dtype, on the Triton path,
    against the float64 formula of the same (rounded) logits."""
    x, lab = batch(7, B=3, T=37)  # 111 rows
    lab[0, 20:26] = torch.tensor(digits_of("0.0719"))
    x = x.to(dtype)
    xr = x.double().requires_grad_(True)
    want, rows = reference(xr, lab, method)
    want.backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    xa = x.clone().requires_grad_(True)
    got = ntl.ntl_loss(xa, lab, DIGITS, method=method, backend="triton")
    got.backward()
    assert got.dtype == torch.float32 and xa.grad.dtype == dtype
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)  # fp32 math
    torch.testing.assert_close(xa.grad.double(), xr.grad, **tol)
    none = ntl.ntl_loss(x, lab, DIGITS, method=method, reduction="none", backend="triton")
    torch.testing.assert_close(none.double(), rows.detach(), rtol=1e-5, atol=1e-6)
    xb = x.clone().requires_grad_(True)
    fused = ntl.cross_entropy_with_ntl(xb, lab, DIGITS, method=method, ntl_weight=0.5, backend="triton")
    fused.backward()
    xc = x.double().requires_grad_(True)
    ref = F.cross_entropy(xc.reshape(-1, 13), lab.reshape(-1)) + 0.5 * reference(xc, lab, method)[0]
    ref.backward()
    torch.testing.assert_close(fused.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad.double(), xc.grad, **tol)


def test_ignore_index_and_no_digits_give_attached_zero():
    x = torch.randn(2, 5, 13, requires_grad=True)
    lab = torch.full((2, 5), TEXT)
    lab[1, 2] = -100
    for m in ("del", "dist2"):
        for backend in BACKENDS:
            got = ntl.ntl_loss(x, lab, DIGITS, method=m, backend=backend)
            assert got.item() == 0.0 and got.requires_grad
            got.backward()
            assert (x.grad == 0).all()


def test_the_decimal_point_and_the_place_weights_change_the_loss():
    """Positive controls: DEL(decimal_point_id) differs from DEL() (no point known here) and
    from DEL(place_weights=False), and DIST2's tau reaches both backends."""
    x, lab = batch(2)
    vals = {repr(m): ntl.ntl_loss(x, lab, DIGITS, method=m, backend="triton").item()
            for m in (DEL(decimal_point_id=DOT), DEL(), DEL(place_weights=False))}
    assert len({round(v, 6) for v in vals.values()}) == 3, vals
    for backend in BACKENDS:
        a = ntl.ntl_loss(x, lab, DIGITS, method=DIST2(tau=0.3), backend=backend)
        b = ntl.ntl_loss(x, lab, DIGITS, method=DIST2(tau=3.0), backend=backend)
        assert abs(a.item() - b.item()) > 1e-3


# --------------------------------------------------------------------------- real tokenizers
def test_qwen_tokenizer_gives_the_decimal_point(qwen_tok):
    """With the tokenizer itself, DEL takes its '.': the per-position ratio DEL() / DEL(False)
    is the place weight by hand, on every labels-taking entry point of digit logits."""
    ids = qwen_tok.encode("x 12.5 and 0.07 y 3", add_special_tokens=False)
    texts = [qwen_tok.decode([i]) for i in ids]
    assert texts == ["x", " ", "1", "2", ".", "5", " and", " ", "0", ".", "0", "7", " y", " ", "3"]
    lab = torch.tensor(ids)
    pw = {2: 4.0, 3: 2.0, 5: 1.02 ** -2, 8: 2.0, 10: 1.02 ** -2, 11: 1.02 ** -3, 14: 2.0}
    z = torch.randn(len(ids), 10, generator=torch.Generator().manual_seed(0))
    for backend in BACKENDS:
        a = ntl.ntl_loss_from_digit_logits(z, lab, qwen_tok, method="del", reduction="none", backend=backend)
        b = ntl.ntl_loss_from_digit_logits(z, lab, qwen_tok, method=DEL(place_weights=False),
                                           reduction="none", backend=backend)
        assert set(torch.nonzero(b).flatten().tolist()) == set(pw)
        for t, w in pw.items():
            assert a[t].item() == pytest.approx(w * b[t].item(), rel=1e-6)
    # the module binds the tokenizer's '.' at construction (it keeps a resolved vocab)
    crit = ntl.NumberTokenLoss(qwen_tok, method="del")
    assert crit.loss_method == DEL(decimal_point_id=qwen_tok.get_vocab()["."])


def test_llama3_multi_digit_tokens(llama3_tok):
    """Llama-3 writes '123' '4' and '123' '45' '.' '678': a token takes its lowest place."""
    text = "x = 1234 and 12345.678 or 0.07"
    ids = llama3_tok.encode(text, add_special_tokens=False)
    texts = [llama3_tok.decode([i]) for i in ids]
    assert texts == ["x", " =", " ", "123", "4", " and", " ", "123", "45", ".", "678", " or", " ",
                     "0", ".", "07"]
    vocab = ntl.vocab_for_tokenizer(llama3_tok)
    dot = llama3_tok.get_vocab()["."]
    want = {3: 4.0, 4: 2.0, 7: 6.0, 8: 2.0, 10: 1.02 ** -4, 13: 2.0, 15: 1.02 ** -3}
    got = place_weights(torch.tensor(ids), vocab, dot, -100)
    assert {t: pytest.approx(w) for t, w in want.items()} == {t: got[t].item() for t in want}
    assert all(got[t] == 1 for t in range(len(ids)) if t not in want)
    # through ntl_loss on the K = 1,110 number logits, both backends, against the float64 formula
    lab = torch.tensor(ids)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(len(ids), vocab.K, generator=g) * 3
    kt = vocab.digit_index(lab)
    rows = [t for t in range(len(ids)) if kt[t] >= 0]
    pwt = torch.tensor([want[t] for t in rows], dtype=torch.float64)
    zr = z.double().requires_grad_(True)
    ref = del64(zr[rows], kt[rows], pwt).sum() / len(rows)
    ref.backward()
    for backend in BACKENDS:
        za = z.clone().requires_grad_(True)
        got = ntl.ntl_loss_from_digit_logits(za, lab, vocab, method=DEL(decimal_point_id=dot),
                                             backend=backend)
        got.backward()
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(za.grad.double(), zr.grad, rtol=1e-4, atol=1e-8)


def test_torch_compile_fullgraph():
    """Under torch.compile the place weights are traced and reach the custom ops (``scale``)."""
    x, lab = batch(4)

    def f(z, m):
        return (ntl.ntl_loss(z, lab, DIGITS, method=m, backend="torch")
                + ntl.cross_entropy_with_ntl(z, lab, DIGITS, method=m, backend="torch"))

    for m in (DEL(decimal_point_id=DOT), DIST2(tau=0.5)):
        xa = x.clone().requires_grad_(True)
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(xa, m)
        got.backward()
        xr = x.clone().requires_grad_(True)
        ref = f(xr, m)
        ref.backward()
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(xa.grad, xr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_del_with_a_masked_number_column(backend):
    """A number column at -inf (a masked token) off the target: q = 0 there, DEL stays finite
    and equals the formula over the other columns (softplus(-inf) = 0)."""
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(8))
    x[:, 4] = float("-inf")
    t = torch.tensor([0, 7, 9])
    xa = x.clone().requires_grad_(True)
    got = ntl.ntl_loss(xa, t, DIGITS, method=DEL(place_weights=False), reduction="none", backend=backend)
    got.sum().backward()
    keep = [c for c in range(10) if c != 4]
    z = x[:, keep].double()
    q = torch.softmax(z, -1)
    y = F.one_hot(torch.tensor([0, 6, 8]), 9).double()  # the target columns among the 9 kept
    want = (q * (F.softplus(z) - y * z)).sum(-1) / 10
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(xa.grad).all() and (xa.grad[:, 4] == 0).all()
