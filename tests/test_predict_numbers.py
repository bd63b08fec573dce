"""``ntl.predict_numbers``: per-position expected number value and number-token mass.

Oracle: ``ntloss.NTLossDotProduct(tok, vocab_size=V).predict_numbers`` (0.3.2), values and
gradients to 1e-5 (fp32) on Qwen2.5's real tokenizer (V = 151,936 padded logits) and a
digit-level word tokenizer; Llama-3's full number vocab against a float64 softmax by hand;
hypothesis bounds; whole numbers with ``labels=`` on digits by hand (multi-digit tokens:
test_number_level_multidigit.py).
"""

from typing import Any

import ntloss
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_probe import count_syncs  # tests/support
from toy_tokenizers import SYN_V, digit_tokenizer  # tests/support

import ntl

QWEN_V = 151_936
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def syn_tok():
    return digit_tokenizer()


def logits_for(V, digit_ids, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=g) * 2.0
    boost = torch.tensor([0.0, 4.0, 9.0, 14.0])[torch.randint(0, 4, shape, generator=g)]
    x[..., torch.tensor(digit_ids)] += boost[..., None]
    return x


def compare(tok, V, x, oracle_dtype=torch.float32):
    xa, xb = x.to(oracle_dtype, copy=True).requires_grad_(True), x.clone().requires_grad_(True)
    yr, mr = ntloss.NTLossDotProduct(tok, vocab_size=V).predict_numbers(xa)
    yr, mr = yr.float(), mr.float()
    yg, mg = ntl.predict_numbers(xb, tok)
    assert yg.dtype == mg.dtype == torch.float32
    assert yg.shape == mg.shape == x.shape[:-1]
    torch.testing.assert_close(yg, yr, **TOL)
    torch.testing.assert_close(mg, mr, **TOL)
    g = torch.Generator().manual_seed(1)
    u, w = torch.randn(yr.shape, generator=g), torch.randn(yr.shape, generator=g)
    ((yr * u).sum() + (mr * w).sum()).backward()
    ((yg * u).sum() + (mg * w).sum()).backward()
    torch.testing.assert_close(xb.grad, xa.grad.float(), **TOL)


def qwen_case():
    x = logits_for(QWEN_V, list(range(15, 25)), (2, 9), seed=0)
    x[0, 0, 151_800] = 30.0  # mass on a padded column (beyond the tokenizer) counts as text
    return x


def test_oracle_qwen(qwen_tok):
    """Against ntloss in float64 (its fp32 mass is less accurate at this width: next test)."""
    compare(qwen_tok, QWEN_V, qwen_case(), oracle_dtype=torch.float64)


def test_oracle_fp32_softmax_is_less_accurate_at_qwen_width(qwen_tok):
    """ntloss's fp32 mass (a full fp32 softmax over 151,936 logits) drifts from float64 by
    more than 1e-5 relative; ntl's fp32 mass (sums relative to the row max) stays within 2e-6."""
    x = qwen_case()
    truth = torch.softmax(x.double(), -1)[..., 15:25].sum(-1)
    _, m_ref = ntloss.NTLossDotProduct(qwen_tok, vocab_size=QWEN_V).predict_numbers(x)
    _, m_ntl = ntl.predict_numbers(x, qwen_tok)
    err_ref = ((m_ref.double() - truth) / truth).abs().max()
    err_ntl = ((m_ntl.double() - truth) / truth).abs().max()
    assert err_ntl < 2e-6 < 1e-5 < err_ref, (err_ntl, err_ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_digit_tokenizer(syn_tok, seed):
    gv = syn_tok.get_vocab()
    compare(syn_tok, SYN_V, logits_for(SYN_V, [gv[str(d)] for d in range(10)], (3, 17), seed))


def test_llama3_number_vocab_by_hand(llama3_tok):
    """With Llama-3's full NumberVocab (1,110 tokens, values 0..999) yhat is sum q_k int(text_k)."""
    vocab = ntl.NumberVocab.from_tokenizer(llama3_tok)
    V = 128_256
    gv = llama3_tok.get_vocab()
    numbers = {i: float(int(t)) for t, i in gv.items() if t.isascii() and t.isdigit()}
    ids = torch.tensor(sorted(numbers))
    vals = torch.tensor([numbers[i] for i in ids.tolist()], dtype=torch.float64)
    x = logits_for(V, ids.tolist()[:50], (2, 3), seed=4)
    yhat, mass = ntl.predict_numbers(x, vocab)
    x64 = x.double()
    want_y = torch.softmax(x64[..., ids], -1) @ vals
    want_m = torch.softmax(x64, -1)[..., ids].sum(-1)
    torch.testing.assert_close(yhat.double(), want_y, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mass.double(), want_m, rtol=1e-5, atol=1e-6)
    # the tokenizer itself resolves to its ten digits, as ntloss's digit_level=True does
    y10, _ = ntl.predict_numbers(x, llama3_tok)
    d = torch.tensor([gv[str(k)] for k in range(10)])
    torch.testing.assert_close(y10.double(), torch.softmax(x64[..., d], -1) @ torch.arange(10.0).double(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(syn_tok, dtype):
    gv = syn_tok.get_vocab()
    x = logits_for(SYN_V, [gv[str(d)] for d in range(10)], (2, 5), seed=3).to(dtype)
    yhat, mass = ntl.predict_numbers(x, syn_tok)
    ref_y, ref_m = ntloss.NTLossDotProduct(syn_tok, vocab_size=SYN_V).predict_numbers(x.float())
    assert yhat.dtype == mass.dtype == torch.float32
    torch.testing.assert_close(yhat, ref_y, **TOL)
    torch.testing.assert_close(mass, ref_m, **TOL)


def test_triton_backend_any_shape_and_stride(syn_tok):
    """backend="triton" (digit-gather kernel, interpreted) on a [2, 3, 5, V] non-contiguous view."""
    gv = syn_tok.get_vocab()
    wide = logits_for(SYN_V + 5, [gv[str(d)] for d in range(10)], (2, 3, 5), seed=6)
    xa, xb = wide.clone().requires_grad_(True), wide.clone().requires_grad_(True)
    ya, ma = ntl.predict_numbers(xa[..., :SYN_V], syn_tok, backend="torch")
    yb, mb = ntl.predict_numbers(xb[..., :SYN_V], syn_tok, backend="triton")
    assert yb.shape == (2, 3, 5)
    torch.testing.assert_close(yb, ya, **TOL)
    torch.testing.assert_close(mb, ma, **TOL)
    (ya.sum() + ma.sum()).backward()
    (yb.sum() + mb.sum()).backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    ref_y, _ = ntloss.NTLossDotProduct(syn_tok, vocab_size=SYN_V).predict_numbers(
        wide[..., :SYN_V].reshape(6, 5, SYN_V))
    torch.testing.assert_close(yb.reshape(6, 5), ref_y, **TOL)


def test_no_host_sync(qwen_tok, monkeypatch):
    x = torch.randn(4, 8, 64)
    vocab = ntl.DigitVocab(list(range(15, 25)), vocab_size=64)
    assert count_syncs(lambda: ntl.predict_numbers(x, vocab), monkeypatch) == 0


@settings(max_examples=40)
@given(data=st.data(), n=st.integers(1, 6), scale=st.sampled_from([0.1, 3.0, 30.0]))
def test_property_bounds(data, n, scale):
    seed = data.draw(st.integers(0, 2**16))
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) * scale
    vocab = ntl.DigitVocab(list(range(10)), vocab_size=16)
    yhat, mass = ntl.predict_numbers(x, vocab)
    assert torch.all((yhat >= 0) & (yhat <= 9 + 1e-5))
    assert torch.all((mass >= 0) & (mass <= 1 + 1e-6))
    # all logits but the digits at -inf: the mass is 1
    x[:, 10:] = float("-inf")
    _, full = ntl.predict_numbers(x, vocab)
    torch.testing.assert_close(full, torch.ones(n))


def test_whole_numbers_with_labels_digit_level():
    """labels= delimit the numbers: each number's sum_t 10^{p_t} e_t at its first digit, against
    a float64 softmax by hand; '.' joins digits at float level; mass stays per position."""
    vocab = ntl.DigitVocab(list(range(10)), vocab_size=16)  # ids 0..9 digits, 10 '.', 11 text
    labels = torch.tensor([[1, 2, 10, 4, 11, 7], [3, -100, 5, 11, 11, 0]])
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5)) * 2
    xg = x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    e = torch.softmax(x64[..., :10], -1) @ torch.arange(10.0, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    want = torch.stack([torch.stack([10 * e[0, 0] + e[0, 1], zero, zero, e[0, 3], zero, e[0, 5]]),
                        torch.stack([e[1, 0], zero, e[1, 2], zero, zero, e[1, 5]])])
    got, mass = ntl.predict_numbers(xg, vocab, labels=labels)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mass.double(), torch.softmax(x.double(), -1)[..., :10].sum(-1), **TOL)
    u = torch.randn(2, 6, generator=torch.Generator().manual_seed(6))
    (got * u).sum().backward()
    (want * u.double()).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    fl, _ = ntl.predict_numbers(x, vocab, labels=labels, float_level=True, decimal_point_id=10)
    want_fl = 100 * e[0, 0] + 10 * e[0, 1] + e[0, 3]  # 12.4 -> 124
    torch.testing.assert_close(fl[0, 0].double(), want_fl.detach(), rtol=1e-6, atol=1e-6)
    assert fl[0, 3] == 0
    # max_number_length counts digits: "12" with 1 -> both at place 0
    short, _ = ntl.predict_numbers(x, vocab, labels=labels, max_number_length=1)
    torch.testing.assert_close(short[0, 0].double(), (e[0, 0] + e[0, 1]).detach(), rtol=1e-6, atol=1e-6)


def test_bad_input():
    vocab = ntl.DigitVocab(list(range(10)), vocab_size=16)
    with pytest.raises(TypeError, match="logits"):
        ntl.predict_numbers(torch.zeros(2, 16, dtype=torch.long), vocab)
    with pytest.raises(ValueError, match="vocab larger than the logits"):
        ntl.predict_numbers(torch.zeros(2, 12), vocab)
    with pytest.raises(ValueError, match="backend"):
        ntl.predict_numbers(torch.zeros(2, 16), vocab, backend="gpu")
    with pytest.raises(TypeError, match="vocab_or_tokenizer"):
        ntl.predict_numbers(torch.zeros(2, 16), "gpt2")
    with pytest.raises(ValueError, match="apply only with labels="):
        ntl.predict_numbers(torch.zeros(2, 16), vocab, float_level=True)
    with pytest.raises(ValueError, match="decimal_point_id is used only with float_level=True"):
        ntl.predict_numbers(torch.zeros(1, 2, 16), vocab, labels=torch.tensor([[1, 2]]), decimal_point_id=10)
    with pytest.raises(TypeError, match="labels"):
        ntl.predict_numbers(torch.zeros(1, 2, 16), vocab, labels=torch.tensor([[1.0, 2.0]]))
