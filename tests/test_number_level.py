"""Number-level NTL: ``ntl.number_level_loss`` / ``NumberTokenLoss(method="number")``.

References, all independent of the code under test:
* ``ntloss.NumberLevelLoss`` 0.3.2 (the authors' package): values and gradients to 1e-5
  (fp32) on Qwen2.5's real tokenizer (V = 151,936 padded logits) and on a small
  digit-level word tokenizer (digits at scattered ids, a '.' token, padded V), both
  ``float_level`` settings, both ``reweigh`` settings, every reduction, with and without
  weights, numbers longer than ``max_number_length``, ignored labels inside numbers
  and numbers at row boundaries;
* a per-row Python loop over the label strings in float64 (hypothesis-generated cases);
* hand-computed values.
``ntloss`` returns a *detached* zero when no number takes part; ntl's zero is attached.
At Qwen's width (V = 151,936) ntloss runs in float64: its fp32 full-vocabulary softmax
(the number mass of ``reweigh``) is off by up to ~7e-5 relative there, while ntl's fp32 is
within 1e-6 of float64 (test_predict_numbers.py measures both).
"""

import copy
import math
from typing import Any

import ntloss
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_probe import count_syncs  # tests/support
from toy_tokenizers import SYN_V, digit_tokenizer  # tests/support

import ntl
from ntl.number_level import NumberLevelVocab

QWEN_V = 151_936
QWEN_DIGITS = list(range(15, 25))
QWEN_DOT = 13
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
EPS = torch.finfo(torch.float32).eps

@pytest.fixture(scope="module")
def syn_tok():
    return digit_tokenizer()


_ORACLES: dict = {}


def oracle(tok, V, float_level, reweigh, max_number_length=20):
    key = (id(tok), V, float_level, reweigh, max_number_length)
    if key not in _ORACLES:
        n = len(tok)
        _ORACLES[key] = (tok, ntloss.NumberLevelLoss(tok, vocab_size=V, float_level=float_level,
                                                     reweigh=reweigh, max_number_length=max_number_length))
        assert len(tok) == n, "ntloss added tokens to a tokenizer that already had all digits"
    return _ORACLES[key][1]


def make_case(V, digit_ids, dot_id, text_ids, seed, B=2, T=20, long_number=False):
    """Logits with varied digit mass; labels with digit runs, dots (single, double, leading,
    trailing), text, -100 inside numbers and a number across the row boundary."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 1.5
    ids = torch.tensor(digit_ids)
    boost = torch.tensor([0.0, 3.0, 6.0, 10.0])[torch.randint(0, 4, (B, T), generator=g)]
    logits[:, :, ids] += boost[..., None]
    kind = torch.randint(0, 10, (B, T), generator=g)  # 0-5 digit, 6-7 dot, 8 text, 9 ignore
    labels = ids[torch.randint(0, 10, (B, T), generator=g)]
    text = torch.tensor(text_ids)[torch.randint(0, len(text_ids), (B, T), generator=g)]
    labels = torch.where(kind == 6, torch.full_like(labels, dot_id), labels)
    labels = torch.where(kind == 7, torch.full_like(labels, dot_id), labels)
    labels = torch.where(kind == 8, text, labels)
    labels = torch.where(kind == 9, torch.full_like(labels, -100), labels)
    labels[0, -4:] = torch.tensor([text_ids[0], digit_ids[4], digit_ids[0], digit_ids[7]])  # row 0 ends
    labels[1, :4] = torch.tensor([digit_ids[2], digit_ids[9], digit_ids[1], text_ids[0]])  # row 1 starts
    labels[0, 2:5] = torch.tensor([digit_ids[1], dot_id, digit_ids[5]])  # 1.5
    labels[1, 5:9] = torch.tensor([digit_ids[3], -100, digit_ids[2], digit_ids[8]])  # 3 <ign> 28
    if long_number:
        labels[1, 9:] = ids[torch.arange(T - 9) % 10 + 0]  # 11+ digits
        labels[1, 9] = digit_ids[7]
    weights = torch.rand(B, T, generator=g) * 2.0
    weights[0, 2] = 0.0  # the first digit of 1.5 weighs nothing
    return logits, labels, weights


def compare(tok, V, case, float_level, reweigh, reduction, use_weights, seed, max_number_length=20,
            oracle_dtype=torch.float32):
    """ntl in fp32 against ntloss run in ``oracle_dtype`` (float64 at Qwen's width: see
    test_oracle_fp32_softmax_is_less_accurate_at_qwen_width)."""
    logits, labels, weights = case
    w = weights if use_weights else None
    x_ref = logits.to(oracle_dtype, copy=True).requires_grad_(True)
    x_ntl = logits.clone().requires_grad_(True)
    ref = oracle(tok, V, float_level, reweigh, max_number_length)(x_ref, labels, loss_weights=w,
                                                                   reduction=reduction)
    ref = ref.float()
    got = ntl.number_level_loss(x_ntl, labels, tok, float_level=float_level, reweigh=reweigh,
                                reduction=reduction, weights=w, max_number_length=max_number_length)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    (ref * up).sum().backward()
    (got * up).sum().backward()
    torch.testing.assert_close(x_ntl.grad, x_ref.grad.float(), **TOL)
    return got, ref


REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("float_level", [False, True])
def test_oracle_qwen(qwen_tok, float_level, reweigh, reduction, use_weights):
    # text: BPE tokens, <|endoftext|>, '..' (id 496) and a padded id beyond len(tokenizer)
    assert qwen_tok.convert_tokens_to_ids(".") == QWEN_DOT
    text = [785, 4226, 374, 151_643, 496, 151_700]
    case = make_case(QWEN_V, QWEN_DIGITS, QWEN_DOT, text, seed=11, long_number=True)
    got, _ = compare(qwen_tok, QWEN_V, case, float_level, reweigh, reduction, use_weights, seed=11,
                     oracle_dtype=torch.float64)
    if reduction == "none":  # losses sit at the numbers' first digits only
        labels = case[1]
        is_digit = (labels >= 15) & (labels <= 24)
        assert torch.all(got[~is_digit] == 0)
        assert got[0, -3] != 0 and got[1, 0] != 0  # two numbers meet at the row boundary


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("float_level", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_digit_tokenizer(syn_tok, float_level, reweigh, reduction, use_weights, seed):
    gv = syn_tok.get_vocab()
    digit_ids = [gv[str(d)] for d in range(10)]
    text = [gv["the"], gv[".."], gv["[PAD]"], gv["-"], 31]  # 31: padded id >= len(tokenizer)
    case = make_case(SYN_V, digit_ids, gv["."], text, seed, B=3, T=24, long_number=seed == 1)
    compare(syn_tok, SYN_V, case, float_level, reweigh, reduction, use_weights, seed)


@pytest.mark.parametrize("max_number_length", [1, 3, 38])
@pytest.mark.parametrize("float_level", [False, True])
def test_oracle_max_number_length(syn_tok, max_number_length, float_level):
    """Numbers longer than max_number_length: the leading places all count 10^(L-1), as in ntloss."""
    gv = syn_tok.get_vocab()
    digit_ids = [gv[str(d)] for d in range(10)]
    case = make_case(SYN_V, digit_ids, gv["."], [gv["x"]], seed=4, B=2, T=30, long_number=True)
    for reduction in REDUCTIONS:
        compare(syn_tok, SYN_V, case, float_level, True, reduction, True, 4, max_number_length)


def test_oracle_custom_ignore_index_and_batch_shape(syn_tok):
    """ignore_index set to the pad id; B = 5 rows of T = 10 (many row boundaries)."""
    gv = syn_tok.get_vocab()
    pad = gv["[PAD]"]
    logits, labels, w = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [pad], 6, B=5, T=10)
    labels = torch.where(labels == -100, torch.full_like(labels, pad), labels)
    xa, xb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ref = oracle(syn_tok, SYN_V, True, False)(xa, labels, loss_weights=w, ignore_index=pad)
    got = ntl.number_level_loss(xb, labels, syn_tok, float_level=True, ignore_index=pad, weights=w)
    torch.testing.assert_close(got, ref, **TOL)
    ref.backward()
    got.backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_oracle_no_numbers(syn_tok, reduction):
    """ntloss returns a detached 0; ntl an attached 0 whose gradient is 0."""
    gv = syn_tok.get_vocab()
    x = torch.randn(2, 3, SYN_V)
    labels = torch.tensor([[gv["the"], -100, gv["."]], [-100, gv[".."], gv["x"]]])
    ref = oracle(syn_tok, SYN_V, True, True)(x.clone(), labels, reduction=reduction)
    xb = x.clone().requires_grad_(True)
    got = ntl.number_level_loss(xb, labels, syn_tok, float_level=True, reweigh=True, reduction=reduction)
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)
    assert got.requires_grad
    got.sum().backward()
    assert torch.equal(xb.grad, torch.zeros_like(x))


def test_oracle_zero_weights(syn_tok):
    gv = syn_tok.get_vocab()
    logits, labels, _ = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=2)
    w = torch.zeros(labels.shape)
    ref = oracle(syn_tok, SYN_V, False, False)(logits, labels, loss_weights=w)
    x = logits.clone().requires_grad_(True)
    got = ntl.number_level_loss(x, labels, syn_tok, weights=w)
    assert float(ref) == 0.0 and float(got.detach()) == 0.0
    got.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_oracle_llama3_single_digit_labels(llama3_tok):
    """Llama-3 labels that hold only single digits (digits split before tokenizing) match ntloss;
    with the tokenizer (its ten digits) a label holding one of its multi-digit tokens raises
    (ntloss would score it as text)."""
    gv = llama3_tok.get_vocab()
    V = 128_256
    digit_ids = [gv[str(d)] for d in range(10)]
    logits, labels, w = make_case(V, digit_ids, gv["."], [gv["the"], gv[".."]], seed=3, B=2, T=12)
    # ntloss's constructor re-adds '0'..'9' as added tokens, which makes Llama-3 split every
    # number into digits ("123" -> "1" "2" "3", len(tok) unchanged): give it a copy
    ref_tok = copy.deepcopy(llama3_tok)
    for reweigh in (False, True):
        xa, xb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ref = ntloss.NumberLevelLoss(ref_tok, vocab_size=V, float_level=True, reweigh=reweigh)(
            xa, labels, loss_weights=w, reduction="none")
        got = ntl.number_level_loss(xb, labels, llama3_tok, float_level=True, reweigh=reweigh,
                                    weights=w, reduction="none")
        torch.testing.assert_close(got, ref, **TOL)
        ref.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    labels[0, 0] = gv["123"]
    # the tokenizer means its ten digits (as in ntloss); its whole number vocab scores '123' (since
    # issue 25: tests/test_number_level_multidigit.py), which the message names
    with pytest.raises(ValueError, match=r"labels hold multi-digit number tokens \(e.g. id \d+\).*"
                                         r"ntl.vocab_for_tokenizer\(tok\)"):
        ntl.number_level_loss(logits, labels, llama3_tok)
    labels[0, 0] = -100
    ntl.number_level_loss(logits, labels, llama3_tok)  # ignored positions are not checked
    # ntl never touches the tokenizer; ntloss changed its copy's tokenization
    assert llama3_tok.encode("123", add_special_tokens=False) == [gv["123"]]
    assert ref_tok.encode("123", add_special_tokens=False) == [gv["1"], gv["2"], gv["3"]]


# ---------------------------------------------------------------- dtypes, backends, layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_oracle_on_upcast_logits(syn_tok, dtype):
    gv = syn_tok.get_vocab()
    logits, labels, w = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=8)
    low = logits.to(dtype)
    xa = low.float().requires_grad_(True)
    xb = low.clone().requires_grad_(True)
    ref = oracle(syn_tok, SYN_V, True, True)(xa, labels, loss_weights=w, reduction="sum")
    got = ntl.number_level_loss(xb, labels, syn_tok, float_level=True, reweigh=True, weights=w,
                                reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **TOL)  # math is fp32: same inputs, same loss
    ref.backward()
    got.backward()
    assert xb.grad.dtype == dtype
    torch.testing.assert_close(xb.grad.float(), xa.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("reweigh", [False, True])
def test_triton_gather_backend_matches_torch(syn_tok, reweigh):
    """backend="triton" (the digit-gather kernel, interpreted on CPU) on non-contiguous logits."""
    gv = syn_tok.get_vocab()
    logits, labels, w = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=9,
                                  B=3, T=37)
    wide = torch.randn(3, 37, SYN_V + 7)
    wide[..., :SYN_V] = logits
    xa = wide.clone().requires_grad_(True)
    xb = wide.clone().requires_grad_(True)
    args = dict(float_level=True, reweigh=reweigh, weights=w, reduction="none")
    ref = ntl.number_level_loss(xa[..., :SYN_V], labels, syn_tok, backend="torch", **args)
    got = ntl.number_level_loss(xb[..., :SYN_V], labels, syn_tok, backend="triton", **args)
    torch.testing.assert_close(got, ref, **TOL)
    ora = oracle(syn_tok, SYN_V, True, reweigh)(logits, labels, loss_weights=w, reduction="none")
    torch.testing.assert_close(got, ora, **TOL)
    up = torch.randn(ref.shape)
    (ref * up).sum().backward()
    (got * up).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    assert torch.all(xb.grad[..., SYN_V:] == 0)


def test_leading_dims_are_rows(syn_tok):
    """[A, B, T, V] equals the [A*B, T, V] batch: every leading index is its own row."""
    gv = syn_tok.get_vocab()
    logits, labels, w = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=5,
                                  B=6, T=9)
    flat = ntl.number_level_loss(logits, labels, syn_tok, weights=w, reduction="none")
    four = ntl.number_level_loss(logits.view(2, 3, 9, SYN_V), labels.view(2, 3, 9), syn_tok,
                                 weights=w.view(2, 3, 9), reduction="none")
    assert four.shape == (2, 3, 9)
    torch.testing.assert_close(four.reshape(6, 9), flat, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_batch(shape):
    x = torch.randn(*shape, 16, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.long)
    assert ntl.number_level_loss(x, labels, HAND, reduction="none").shape == shape
    loss = ntl.number_level_loss(x, labels, HAND)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert x.grad.shape == x.shape


def test_integer_weights_equal_float_weights(syn_tok):
    """An HF attention_mask (int64) works as weights."""
    gv = syn_tok.get_vocab()
    logits, labels, _ = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=1)
    mask = torch.randint(0, 2, labels.shape, generator=torch.Generator().manual_seed(0))
    a = ntl.number_level_loss(logits, labels, syn_tok, weights=mask)
    b = ntl.number_level_loss(logits, labels, syn_tok, weights=mask.float())
    ref = oracle(syn_tok, SYN_V, False, False)(logits, labels, loss_weights=mask.float())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_integer_weights_are_weights_not_a_mask(syn_tok, reduction, dtype):
    """Integer weights other than 0/1 (3 and 5) weigh each number by its first digit's weight,
    as ntloss does with the same weights; a 0/1 mask of them gives another value."""
    gv = syn_tok.get_vocab()
    logits, labels, _ = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=4)
    g = torch.Generator().manual_seed(5)
    w = torch.tensor([0, 3, 5])[torch.randint(0, 3, labels.shape, generator=g)].to(dtype)
    got = ntl.number_level_loss(logits, labels, syn_tok, weights=w, reduction=reduction)
    ref = oracle(syn_tok, SYN_V, False, False)(logits.double(), labels, loss_weights=w.double(),
                                               reduction=reduction).float()
    torch.testing.assert_close(got, ref, **TOL)
    as_mask = oracle(syn_tok, SYN_V, False, False)(logits.double(), labels, loss_weights=(w != 0).double(),
                                                   reduction=reduction).float()
    assert (got - as_mask).abs().max() > 1e-3  # 100x TOL: the case tells weights from a mask


def test_hand_values_integer_weights_three_and_five():
    # "30" under a uniform digit distribution: yhat = 49.5, L = 19.5 / 79.5; "7" predicted 9: 2 / 16
    labels = torch.tensor([[3, 0, TXT, 7]])
    x = peaked([None, None, None, 9])
    w = torch.tensor([[3, 1, 0, 5]])  # a number takes its first digit's weight (3, not 1)
    l30, l7 = 19.5 / 79.5, 2 / 16
    mean = ntl.number_level_loss(x, labels, HAND, weights=w)
    torch.testing.assert_close(mean, torch.tensor((3 * l30 + 5 * l7) / 8))  # a 0/1 mask: (l30 + l7) / 2
    total = ntl.number_level_loss(x, labels, HAND, weights=w, reduction="sum")
    torch.testing.assert_close(total, torch.tensor(3 * l30 + 5 * l7))
    per = ntl.number_level_loss(x, labels, HAND, weights=w, reduction="none")
    torch.testing.assert_close(per, torch.tensor([[3 * l30, 0.0, 0.0, 5 * l7]]))


# ---------------------------------------------------------------- hand-computed values
def peaked(labels_digits, V=16, margin=60.0):
    """Logits putting all digit mass on the given digit (None: uniform)."""
    x = torch.zeros(1, len(labels_digits), V)
    for t, d in enumerate(labels_digits):
        if d is not None:
            x[0, t, d] = margin
    return x


HAND = ntl.DigitVocab(list(range(10)), vocab_size=16)  # ids 0..9 digits, 10 '.', 11 text
DOT, TXT = 10, 11


def test_hand_values_integer_and_float_level():
    # target "12.4 x 7", prediction "12.5 x 9"
    labels = torch.tensor([[1, 2, DOT, 4, TXT, 7]])
    x = peaked([1, 2, None, 5, None, 9])
    per_int = ntl.number_level_loss(x, labels, HAND, reduction="none")
    want = torch.tensor([[0.0, 0.0, 0.0, 1 / 9, 0.0, 2 / 16]])  # 12 exact, 5 vs 4, 9 vs 7
    torch.testing.assert_close(per_int, want, rtol=1e-6, atol=1e-7)
    per_float = ntl.number_level_loss(x, labels, HAND, reduction="none", float_level=True, decimal_point_id=DOT)
    want = torch.tensor([[1 / 249, 0.0, 0.0, 0.0, 0.0, 2 / 16]])  # 125 vs 124 at the '1'
    torch.testing.assert_close(per_float, want, rtol=1e-6, atol=1e-7)
    mean = ntl.number_level_loss(x, labels, HAND, float_level=True, decimal_point_id=DOT)
    torch.testing.assert_close(mean, torch.tensor((1 / 249 + 2 / 16) / 2))


def test_hand_values_uniform_digits_and_weights():
    # uniform digit distribution: E = 4.5 per digit; "30" -> yhat = 49.5, y = 30
    labels = torch.tensor([[3, 0, TXT, 0]])
    x = peaked([None, None, None, None])
    w = torch.tensor([[2.0, 0.0, 5.0, 0.5]])
    got = ntl.number_level_loss(x, labels, HAND, reduction="none", weights=w)
    l30, l0 = 19.5 / 79.5, 4.5 / (4.5 + EPS)
    torch.testing.assert_close(got, torch.tensor([[2 * l30, 0.0, 0.0, 0.5 * l0]]))
    mean = ntl.number_level_loss(x, labels, HAND, weights=w)
    torch.testing.assert_close(mean, torch.tensor((2 * l30 + 0.5 * l0) / 2.5))


def test_hand_values_max_number_length_clamp_and_zero():
    labels = torch.tensor([[1, 2, 3, TXT, 0, 0]])
    x = peaked([1, 2, 4, None, 0, 0])
    # L = 2: places 2,1,0 -> 1,1,0: y = 10 + 20 + 3 = 33, yhat = 34; "00" vs "00" -> 0/eps = 0
    got = ntl.number_level_loss(x, labels, HAND, reduction="none", max_number_length=2)
    torch.testing.assert_close(got, torch.tensor([[1 / 67, 0, 0, 0, 0, 0]]))
    got = ntl.number_level_loss(x, labels, HAND, reduction="none")
    torch.testing.assert_close(got, torch.tensor([[1 / 247, 0, 0, 0, 0, 0]]))


def test_hand_values_reweigh():
    # the digit mass at the first digit is 1/2 (one text logit as large as the digit's)
    labels = torch.tensor([[5, TXT]])
    x = peaked([7, None])
    x[0, 0, TXT] = 60.0
    got = ntl.number_level_loss(x, labels, HAND, reweigh=True, reduction="sum")
    torch.testing.assert_close(got, torch.tensor(0.5 * (2 / 12) + 1.01 * 0.5))


def test_numbers_do_not_cross_rows_or_ignored_labels():
    labels = torch.tensor([[TXT, 1, 2], [3, -100, 4]])
    x = torch.cat([peaked([None, 1, 2]), peaked([4, None, 5])])
    got = ntl.number_level_loss(x, labels, HAND, reduction="none")
    # row 0: "12" exact; row 1: "3" predicted 4 -> 1/7, then "4" predicted 5 -> 1/9
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 0.0], [1 / 7, 0.0, 1 / 9]]))
    # as one row "x 1 2 3 _ 4" the '12' and '3' merge: 123 predicted 124
    joined = ntl.number_level_loss(x.reshape(1, 6, 16), labels.reshape(1, 6), HAND, reduction="none")
    torch.testing.assert_close(joined, torch.tensor([[0.0, 1 / 247, 0.0, 0.0, 0.0, 1 / 9]]))


# ---------------------------------------------------------------- hypothesis vs a loop reference
def loop_reference(x, labels, dot, float_level, L, reweigh, ignore_index=-100):
    """Per-number losses by walking each row's labels (float64). Digits are ids 0..9."""
    x = x.double()
    out = torch.zeros(labels.shape, dtype=torch.float64)
    e = torch.softmax(x[..., :10], -1) @ torch.arange(10, dtype=torch.float64)
    mass = torch.softmax(x, -1)[..., :10].sum(-1)
    R, T = labels.shape
    for r in range(R):
        lab = [int(v) for v in labels[r]]

        def is_digit(j, lab=lab):
            return 0 <= lab[j] <= 9 and lab[j] != ignore_index

        t = 0
        while t < T:
            if not is_digit(t):
                t += 1
                continue
            pos, j = [t], t + 1
            while j < T:
                if is_digit(j):
                    pos.append(j)
                    j += 1
                elif float_level and lab[j] == dot and j + 1 < T and is_digit(j + 1):
                    j += 1
                else:
                    break
            n = len(pos)
            places = [10.0 ** min(n - 1 - i, L - 1) for i in range(n)]
            y = sum(p * lab[q] for p, q in zip(places, pos, strict=True))
            yh = sum(p * float(e[r, q]) for p, q in zip(places, pos, strict=True))
            loss = abs(yh - y) / (abs(yh) + abs(y) + float(EPS))
            if reweigh:
                loss = loss * float(mass[r, t]) + 1.01 * (1 - float(mass[r, t]))
            out[r, t] = loss
            t = j
    return out


label_tok = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 5, 9, DOT, DOT, TXT, 12, -100])


@settings(max_examples=60)
@given(rows=st.integers(1, 3), cols=st.integers(1, 12), data=st.data(),
       float_level=st.booleans(), reweigh=st.booleans(), L=st.integers(1, 6))
def test_property_matches_loop_reference_and_bounds(rows, cols, data, float_level, reweigh, L):
    labels = torch.tensor(data.draw(st.lists(st.lists(label_tok, min_size=cols, max_size=cols),
                                             min_size=rows, max_size=rows)))
    seed = data.draw(st.integers(0, 2**16))
    scale = data.draw(st.sampled_from([0.5, 3.0, 12.0]))
    x = torch.randn(rows, cols, 16, generator=torch.Generator().manual_seed(seed)) * scale
    got = ntl.number_level_loss(x, labels, HAND, float_level=float_level,
                                decimal_point_id=DOT if float_level else None,
                                max_number_length=L, reweigh=reweigh, reduction="none")
    ref = loop_reference(x, labels, DOT, float_level, L, reweigh)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(got >= 0)
    assert torch.all(got <= (1.01 if reweigh else 1.0))
    starts = ref != 0
    assert torch.all(got[~starts] == 0)


@settings(max_examples=40)
@given(rows=st.integers(1, 3), cols=st.integers(1, 10), data=st.data(),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_property_integer_weights_weigh_each_number(rows, cols, data, reduction):
    """Integer weights 0..9: each number's loss (the float64 loop reference) times its first
    digit's weight; ``mean`` divides by the sum of those weights."""
    labels = torch.tensor(data.draw(st.lists(st.lists(label_tok, min_size=cols, max_size=cols),
                                             min_size=rows, max_size=rows)))
    w = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 9), min_size=cols, max_size=cols),
                                        min_size=rows, max_size=rows)))
    x = torch.randn(rows, cols, 16, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    got = ntl.number_level_loss(x, labels, HAND, weights=w, reduction=reduction)
    per = loop_reference(x, labels, DOT, False, 20, False)
    starts = torch.zeros(labels.shape, dtype=torch.bool)  # first digit of each number
    is_digit = (labels >= 0) & (labels <= 9)
    starts[:, 0] = is_digit[:, 0]
    starts[:, 1:] = is_digit[:, 1:] & ~is_digit[:, :-1]
    ws = torch.where(starts, w.double(), 0.0)
    want = {"none": per * ws, "sum": (per * ws).sum(),
            "mean": (per * ws).sum() / max(float(ws.sum()), float(EPS))}[reduction]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40)
@given(digits=st.lists(st.integers(0, 9), min_size=1, max_size=12), margin=st.floats(40.0, 80.0),
       L=st.integers(1, 20))
def test_property_zero_at_the_target(digits, margin, L):
    labels = torch.tensor([digits])
    x = peaked(digits, margin=margin)
    x[..., TXT] = margin  # half the mass off the digits: reweigh adds 1.01 * (1 - m) only
    assert float(ntl.number_level_loss(x, labels, HAND, max_number_length=L)) <= 1e-6
    rw = ntl.number_level_loss(x, labels, HAND, max_number_length=L, reweigh=True)
    torch.testing.assert_close(rw, torch.tensor(1.01 * 0.5))


@settings(max_examples=30)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_property_symmetric_and_below_one(a, b):
    """Peaked prediction of number a for target b: L = |a - b| / (a + b + eps) (same length)."""
    n = max(len(str(a)), len(str(b)))
    sa, sb = str(a).zfill(n), str(b).zfill(n)
    labels = torch.tensor([[int(c) for c in sb]])
    got = float(ntl.number_level_loss(peaked([int(c) for c in sa]), labels, HAND))
    want = abs(a - b) / (a + b + float(EPS))
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7)
    assert 0.0 <= got <= 1.0


# ---------------------------------------------------------------- module
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_method_number(syn_tok, reduction):
    gv = syn_tok.get_vocab()
    logits, labels, w = make_case(SYN_V, [gv[str(d)] for d in range(10)], gv["."], [gv["x"]], seed=3)
    crit = ntl.NumberTokenLoss(syn_tok, method="number", float_level=True, reweigh=True, reduction=reduction,
                               vocab_size=SYN_V)
    got = crit(logits, labels, w)
    ref = oracle(syn_tok, SYN_V, True, True)(logits, labels, loss_weights=w, reduction=reduction)
    torch.testing.assert_close(got, ref, **TOL)
    assert "number" in repr(crit)


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_argument(syn_tok, llama3_tok):
    x = torch.randn(2, 4, 16)
    lab = torch.tensor([[1, 2, DOT, 3], [4, TXT, 5, 6]])
    f = ntl.number_level_loss
    with pytest.raises(TypeError, match="labels"):
        f(x, lab.float(), HAND)
    with pytest.raises(ValueError, match="labels shape"):
        f(x, lab[:, :3], HAND)
    with pytest.raises(TypeError, match="logits"):
        f(x.long(), lab, HAND)
    with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., T, V\]"):
        f(x[0, 0], lab[0, 0], HAND)
    with pytest.raises(TypeError, match="float_level"):
        f(x, lab, HAND, float_level=1)
    with pytest.raises(TypeError, match="reweigh"):
        f(x, lab, HAND, reweigh="yes")
    for bad in (0, 39):
        with pytest.raises(ValueError, match="max_number_length"):
            f(x, lab, HAND, max_number_length=bad)
    with pytest.raises(TypeError, match="max_number_length"):
        f(x, lab, HAND, max_number_length=3.0)
    with pytest.raises(ValueError, match="decimal_point_id"):  # no tokenizer, no '.' id
        f(x, lab, HAND, float_level=True)
    with pytest.raises(ValueError, match="decimal_point_id=3 is a digit"):
        f(x, lab, HAND, float_level=True, decimal_point_id=3)
    with pytest.raises(ValueError, match="decimal_point_id=16 is not below"):
        f(x, lab, HAND, float_level=True, decimal_point_id=16)
    with pytest.raises(ValueError, match="decimal_point_id=10 equals ignore_index"):
        f(x, lab, HAND, float_level=True, decimal_point_id=DOT, ignore_index=DOT)
    with pytest.raises(TypeError, match="decimal_point_id"):
        f(x, lab, HAND, float_level=True, decimal_point_id="13")
    with pytest.raises(ValueError, match="decimal_point_id is used only with float_level=True"):
        f(x, lab, HAND, decimal_point_id=DOT)
    with pytest.raises(ValueError, match="reduction"):
        f(x, lab, HAND, reduction="avg")
    with pytest.raises(ValueError, match="weights must be >= 0"):
        f(x, lab, HAND, weights=-torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels must be token ids"):
        f(x, lab + 100, HAND)
    # a NumberVocab without texts (token widths unknown) or without every digit is refused; Llama-3's
    # whole number vocab (with texts) is accepted since issue 25 (tests/test_number_level_multidigit.py)
    with pytest.raises(ValueError, match=r"vocab_or_tokenizer: number_level_loss needs the ten digit.*without texts"):
        f(x, lab, ntl.NumberVocab([1, 2, 3], [1.0, 20.0, 300.0], 16))
    with pytest.raises(ValueError, match=r"needs every digit '0'..'9'.*lacks \['0', '2',"):
        f(x, lab, ntl.NumberVocab([1, 2, 3], [1.0, 20.0, 300.0], 16, texts=["1", "20", "300"]))
    assert ntl.number_level.number_level_vocab(ntl.NumberVocab.from_tokenizer(llama3_tok)).digits.K == 1110
    with pytest.raises(ValueError, match="backend"):
        f(x, lab, HAND, backend="cuda")
    with pytest.raises(ValueError, match="apply only to method='number'"):
        ntl.NumberTokenLoss(syn_tok, method="mse", float_level=True)
    with pytest.raises(ValueError, match="decimal_point_id"):
        ntl.NumberTokenLoss(HAND, method="number", float_level=True)
    with pytest.raises(ValueError, match="max_number_length"):
        ntl.NumberTokenLoss(syn_tok, method="number", max_number_length=0)
    with pytest.raises(ValueError, match="decimal_point_id is used only"):
        ntl.NumberTokenLoss(syn_tok, method="number", decimal_point_id=4)
    with pytest.raises(ValueError, match="target_dist"):
        ntl.NumberTokenLoss(HAND, method="number")(x, lab, target_dist=torch.ones(2, 4, 10) / 10)


def test_tokenizer_without_dot_needs_decimal_point_id():
    class Tok:
        def get_vocab(self):
            return {str(d): d for d in range(10)} | {"x": 10}

        def __len__(self):
            return 11

    x = torch.randn(1, 3, 11)
    lab = torch.tensor([[1, 10, 2]])
    with pytest.raises(ValueError, match="decimal_point_id"):
        ntl.number_level_loss(x, lab, Tok(), float_level=True)
    # with an explicit id ('x' as the separator here) the two digits join: 12
    joined = ntl.number_level_loss(x, lab, Tok(), float_level=True, decimal_point_id=10, reduction="none")
    split = ntl.number_level_loss(x, lab, Tok(), reduction="none")
    assert joined[0, 2] == 0 and split[0, 2] != 0


def test_number_level_vocab_is_cached_per_tokenizer(syn_tok, monkeypatch):
    spec = ntl.number_level.number_level_vocab(syn_tok)
    assert isinstance(spec, NumberLevelVocab)
    assert spec.decimal_point_id == syn_tok.get_vocab()["."] and spec.multi_digit_ids == ()
    calls = []
    orig = type(syn_tok).get_vocab
    monkeypatch.setattr(type(syn_tok), "get_vocab", lambda self: calls.append(1) or orig(self))
    for _ in range(3):
        assert ntl.number_level.number_level_vocab(syn_tok) is spec
    assert calls == []


# ---------------------------------------------------------------- no host sync per number
def test_sync_counter_sees_syncs(monkeypatch):
    t = torch.arange(5.0)
    assert count_syncs(lambda: t[t > 2], monkeypatch) == 1
    assert count_syncs(lambda: bool(t.sum() > 0) and t.tolist(), monkeypatch) == 2


@pytest.mark.parametrize("reweigh", [False, True])
def test_host_syncs_do_not_grow_with_numbers(qwen_tok, monkeypatch, reweigh):
    """Forward and backward: the same host syncs (the shared label-range check) for 2 numbers
    as for 200; the backward has none."""
    counts = {}
    for n_numbers in (2, 200):
        T = 3 * n_numbers
        labels = torch.full((2, T), 785)
        labels[:, 0::3] = 16 + torch.arange(T // 3) % 9
        labels[:, 1::3] = QWEN_DOT
        labels[:, 2::3] = 18
        logits = torch.randn(2, T, 64)  # narrow V: the ids used fit; only the sync count matters
        vocab = ntl.DigitVocab(QWEN_DIGITS, vocab_size=64)
        x = logits.requires_grad_(True)
        box = {}

        def fwd(x=x, labels=labels, vocab=vocab, box=box):
            box["loss"] = ntl.number_level_loss(x, labels, vocab, float_level=True, decimal_point_id=QWEN_DOT,
                                                reweigh=reweigh)

        f = count_syncs(fwd, monkeypatch)
        b = count_syncs(lambda box=box: box["loss"].backward(), monkeypatch)
        assert x.grad.abs().sum() > 0
        counts[n_numbers] = (f, b)
    assert counts[2] == counts[200], counts
    # reweigh on a CPU: + one row selection (nonzero) for the mass at first digits (no device wait)
    assert counts[2][0] <= (2 if reweigh else 1) and counts[2][1] == 0, counts
    # the real tokenizer adds nothing: its spec is cached and Qwen has no multi-digit tokens
    x = torch.randn(1, 6, QWEN_V)
    labels = torch.tensor([[16, 17, QWEN_DOT, 18, 785, 19]])
    ntl.number_level_loss(x, labels, qwen_tok)
    assert count_syncs(lambda: ntl.number_level_loss(x, labels, qwen_tok, float_level=True), monkeypatch) <= 1


# ---------------------------------------------------------------- GPU (compiled kernels)
@pytest.mark.gpu
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_path_matches_torch_and_never_syncs(qwen_tok, reweigh, dtype):
    """CUDA, Qwen's width: backend="auto" (digit-gather / number-mass kernels) equals the torch
    path, and with strict checks off the forward and backward never synchronise."""
    text = [785, 4226, 374, 151_643, 496, 151_700]
    logits, labels, w = make_case(QWEN_V, QWEN_DIGITS, QWEN_DOT, text, seed=12, B=8, T=256)
    logits, labels, w = logits.to("cuda", dtype), labels.cuda(), w.cuda()
    args = dict(float_level=True, reweigh=reweigh, weights=w, reduction="sum")
    xa, xb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    a = ntl.number_level_loss(xa, labels, qwen_tok, backend="torch", **args)
    b = ntl.number_level_loss(xb, labels, qwen_tok, **args)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.backward()
    b.backward()
    tol: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(xb.grad.float(), xa.grad.float(), **tol)
    yhat, mass = ntl.predict_numbers(logits, qwen_tok)
    yt, mt = ntl.predict_numbers(logits, qwen_tok, backend="torch")
    torch.testing.assert_close(yhat, yt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, mt, rtol=1e-5, atol=1e-6)
    ntl.set_strict_checks(False)
    try:
        x = logits.clone().requires_grad_(True)
        ntl.number_level_loss(x, labels, qwen_tok, **args)  # warm the caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = ntl.number_level_loss(x, labels, qwen_tok, **args)
            loss.backward()
            ntl.predict_numbers(x.detach(), qwen_tok)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        ntl.set_strict_checks(True)
