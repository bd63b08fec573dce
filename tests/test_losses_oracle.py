"""Oracle: ntl's losses equal ``ntloss`` 0.3.x (the authors' package), values and gradients.

``ntloss.NTLoss`` (Wasserstein) <-> ``ntl.ntl_wasserstein_loss`` and
``ntloss.NTLossDotProduct`` (MSE) <-> ``ntl.ntl_mse_loss``, ``digit_level=True``,
both ``reweigh`` settings, every reduction, with and without weights, on Qwen2.5's
real tokenizer (V = 151,936 padded logits) and on a small synthetic word-level
tokenizer whose digits sit at scattered ids (not in value order). fp32, 1e-5.

Also ``squash_factor`` (``ntloss.NTLoss(squash_factor=...)``), the other errors of the
expected value (``NTLossDotProduct(loss_function=F.l1_loss | F.huber_loss)`` <->
``ntl.ntl_dot_loss(error="mae" | "huber")``) and integer / bool weights.

Notes on the oracle:
* ``ntloss`` calls ``tokenizer.add_tokens('0'..'9')`` in its constructor; both
  tokenizers already hold every digit, so nothing changes (asserted).
* With no number label ``ntloss`` returns a *detached* zero (no backward); ntl's
  zero is attached to the graph, so there we compare values only.
* ``reweigh=True`` in the new tests: ntloss is evaluated on float64 logits (its fp32
  softmax over 151,936 logits is off by up to ~5e-5 from its own float64 value; ntl's
  fp32 result is within 1e-6 of it).
"""

import functools
from typing import Any

import ntloss
import pytest
import torch
from toy_tokenizers import DIGIT_IDS, synthetic_tokenizer  # tests/support

import ntl

QWEN_V = 151_936
SYN_V = 40  # synthetic tokenizer has 32 entries; logits padded to 40
TOL: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}

_ORACLES: dict = {}


def oracle(tok, V, method, reweigh):
    key = (id(tok), V, method, reweigh)
    if key not in _ORACLES:
        n = len(tok)
        cls = ntloss.NTLoss if method == "wasserstein" else ntloss.NTLossDotProduct
        _ORACLES[key] = (tok, cls(tok, vocab_size=V, digit_level=True, reweigh=reweigh))
        assert len(tok) == n, "ntloss added tokens to a tokenizer that already had all digits"
    return _ORACLES[key][1]


@pytest.fixture(scope="module")
def syn_tok():
    return synthetic_tokenizer()


def ntl_fn(method):
    return ntl.ntl_wasserstein_loss if method == "wasserstein" else ntl.ntl_mse_loss


def make_case(V, digit_ids, text_ids, seed, B=2, T=5):
    """Logits with a varied digit mass (boost 0..14 on the digit columns) and mixed labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 1.5
    boost = torch.tensor([0.0, 4.0, 8.0, 12.0, 14.0])[torch.randint(0, 5, (B, T), generator=g)]
    ids = torch.tensor(digit_ids)
    logits[:, :, ids] += boost[..., None]
    labels = ids[torch.randint(0, 10, (B, T), generator=g)]
    kind = torch.randint(0, 4, (B, T), generator=g)  # 0,1: digit, 2: text, 3: -100
    text = torch.tensor(text_ids)[torch.randint(0, len(text_ids), (B, T), generator=g)]
    labels = torch.where(kind == 2, text, labels)
    labels = torch.where(kind == 3, torch.full_like(labels, -100), labels)
    labels[0, 0], labels[0, 1], labels[1, 0] = digit_ids[3], -100, text_ids[0]  # all kinds present
    weights = torch.rand(B, T, generator=g) * 2.0
    weights[0, 2] = 0.0
    return logits, labels, weights


def compare(tok, V, digit_ids, text_ids, method, reweigh, reduction, use_weights, seed):
    logits, labels, weights = make_case(V, digit_ids, text_ids, seed)
    w = weights if use_weights else None
    x_ref = logits.clone().requires_grad_(True)
    x_ntl = logits.clone().requires_grad_(True)
    ref = oracle(tok, V, method, reweigh)(x_ref, labels, loss_weights=w, reduction=reduction)
    got = ntl_fn(method)(x_ntl, labels, tok, reduction=reduction, weights=w, reweigh=reweigh)
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    (ref * up).sum().backward()
    (got * up).sum().backward()
    torch.testing.assert_close(x_ntl.grad, x_ref.grad, **TOL)
    return got


METHODS = ["wasserstein", "mse"]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_oracle_qwen(qwen_tok, method, reweigh, reduction, use_weights):
    digit_ids = list(range(15, 25))
    # text ids: ordinary BPE tokens, <|endoftext|>, and a padded id beyond len(tokenizer)
    text_ids = [785, 4226, 374, 151_643, 151_700]
    compare(qwen_tok, QWEN_V, digit_ids, text_ids, method, reweigh, reduction, use_weights, seed=7)


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_synthetic(syn_tok, method, reweigh, reduction, use_weights, seed):
    digit_ids = [DIGIT_IDS[str(d)] for d in range(10)]
    gv = syn_tok.get_vocab()
    # "12" and "007" are text for a digit-level loss; 35 is a padding id (>= len(tok))
    text_ids = [gv["the"], gv["12"], gv["007"], gv["[PAD]"], 35]
    compare(syn_tok, SYN_V, digit_ids, text_ids, method, reweigh, reduction, use_weights, seed)


@pytest.mark.parametrize("method", METHODS)
def test_oracle_only_digits_and_ignore(syn_tok, method):
    """Every label a digit or -100 (no text), larger batch, mean reduction."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, SYN_V, generator=g)
    ids = torch.tensor([DIGIT_IDS[str(d)] for d in range(10)])
    labels = ids[torch.randint(0, 10, (4, 16), generator=g)]
    labels[:, ::3] = -100
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = oracle(syn_tok, SYN_V, method, False)(xa, labels)
    got = ntl_fn(method)(xb, labels, syn_tok)
    torch.testing.assert_close(got, ref, **TOL)
    ref.backward()
    got.backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_oracle_custom_ignore_index(syn_tok, method):
    """ignore_index set to a text id (e.g. the pad id)."""
    pad = syn_tok.get_vocab()["[PAD]"]
    logits, labels, _ = make_case(SYN_V, [DIGIT_IDS[str(d)] for d in range(10)], [pad], seed=5)
    xa, xb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    labels = torch.where(labels == -100, torch.full_like(labels, pad), labels)
    ref = oracle(syn_tok, SYN_V, method, False)(xa, labels, ignore_index=pad)
    got = ntl_fn(method)(xb, labels, syn_tok, ignore_index=pad)
    torch.testing.assert_close(got, ref, **TOL)
    ref.backward()
    got.backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_oracle_no_digit_labels(syn_tok, method, reduction):
    """ntloss returns a detached 0; ntl returns an attached 0 whose gradient is 0."""
    gv = syn_tok.get_vocab()
    x = torch.randn(2, 3, SYN_V)
    labels = torch.tensor([[gv["the"], -100, gv["12"]], [-100, -100, gv["007"]]])
    ref = oracle(syn_tok, SYN_V, method, True)(x.clone(), labels, reduction=reduction)
    assert not ref.requires_grad
    xb = x.clone().requires_grad_(True)
    got = ntl_fn(method)(xb, labels, syn_tok, reduction=reduction, reweigh=True)
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)
    assert got.requires_grad
    got.sum().backward()
    assert torch.equal(xb.grad, torch.zeros_like(x))


@pytest.mark.parametrize("method", METHODS)
def test_oracle_zero_weights_on_all_digits(syn_tok, method):
    """All weights at digit positions are 0: both give 0 (ntl without NaN)."""
    logits, labels, _ = make_case(SYN_V, [DIGIT_IDS[str(d)] for d in range(10)], [3], seed=2)
    w = torch.zeros(labels.shape)
    ref = oracle(syn_tok, SYN_V, method, False)(logits, labels, loss_weights=w)
    x = logits.clone().requires_grad_(True)
    got = ntl_fn(method)(x, labels, syn_tok, weights=w)
    assert float(ref) == 0.0 and float(got.detach()) == 0.0
    got.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_oracle_ignore_index_that_is_a_digit_id(syn_tok):
    """A label equal to ignore_index never takes part, even when it is a digit id."""
    ids = [DIGIT_IDS[str(d)] for d in range(10)]
    x = torch.randn(1, 3, SYN_V, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[ids[3], ids[5], 7]])
    for method in METHODS:
        ref = oracle(syn_tok, SYN_V, method, False)(x, labels, ignore_index=ids[3])
        got = ntl_fn(method)(x, labels, syn_tok, ignore_index=ids[3])
        only = ntl_fn(method)(x[:, 1:2], labels[:, 1:2], syn_tok)
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(got, only, **TOL)


def _reweigh_case(syn_tok):
    gv = syn_tok.get_vocab()
    text_ids = [gv["the"], gv["12"], gv["007"], gv["[PAD]"], 35]
    logits, labels, _ = make_case(SYN_V, [DIGIT_IDS[str(d)] for d in range(10)], text_ids, seed=0)
    truth = ntloss.NTLossDotProduct(syn_tok, vocab_size=SYN_V, reweigh=True)(
        logits.double(), labels, reduction="none")
    return logits, labels, truth


def test_reweigh_oracle_fp32_is_accurate(syn_tok):
    """ntloss in fp32 is within 1e-5 (relative) of its own float64 evaluation."""
    logits, labels, truth = _reweigh_case(syn_tok)
    ref = oracle(syn_tok, SYN_V, "mse", True)(logits, labels, reduction="none")
    torch.testing.assert_close(ref.double(), truth, rtol=1e-5, atol=1e-6)


def test_reweigh_mse_precision_vs_float64_truth(syn_tok):
    """ntl's reweigh in fp32 is as accurate as ntloss's (regression: the mass used to be
    exp(logsumexp(z) - logsumexp(x)), 1.3e-4 relative error here)."""
    logits, labels, truth = _reweigh_case(syn_tok)
    got = ntl.ntl_mse_loss(logits, labels, syn_tok, reduction="none", reweigh=True)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- squash_factor, other errors, int weights
def oracle_kw(tok, V, cls, reweigh, f64=False, **kw):
    """ntloss loss object for extra constructor keywords (cached like :func:`oracle`).

    ``f64``: its number values in float64 too, so that float64 logits are evaluated in float64
    throughout (ntloss keeps them in fp32, which breaks the Huber backward on float64 logits).
    """
    key = (id(tok), V, cls.__name__, reweigh, f64, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _ORACLES:
        n = len(tok)
        obj = cls(tok, vocab_size=V, digit_level=True, reweigh=reweigh, **kw)
        if f64:
            obj.number_values = obj.number_values.double()
        _ORACLES[key] = (tok, obj)
        assert len(tok) == n
    return _ORACLES[key][1]


def compare_fn(tok, V, digit_ids, text_ids, ref_loss, ntl_call, reduction, weights_kind, seed,
               f64=False):
    """``ntl_call(x, labels, w, reduction)`` vs ``ref_loss(x, labels, loss_weights=w, reduction=...)``.

    ``f64``: evaluate the oracle on float64 logits (with ``reweigh`` over Qwen's 151,936 logits
    ntloss's fp32 softmax mass is off by up to ~5e-5 from its own float64 value, ntl's by < 1e-6).
    """
    logits, labels, weights = make_case(V, digit_ids, text_ids, seed)
    mask = (weights > 0.5).long() + (weights > 1.8).long()  # attention-mask-like, a few 2s
    w = {"none": None, "float": weights, "int": mask, "uint8": mask.to(torch.uint8),
         "bool": mask > 0}[weights_kind]
    x_ref = (logits.double() if f64 else logits.clone()).requires_grad_(True)
    x_ntl = logits.clone().requires_grad_(True)
    ref = ref_loss(x_ref, labels, loss_weights=w, reduction=reduction)
    got = ntl_call(x_ntl, labels, w, reduction)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref.float(), **TOL)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    (ref * up.to(ref.dtype)).sum().backward()
    (got * up).sum().backward()
    torch.testing.assert_close(x_ntl.grad, x_ref.grad.float(), **TOL)


# At V = 151,936 a case costs seconds: on Qwen the weights are the int mask only (float weights
# on the cheap synthetic tokenizer)
TOK_WEIGHTS = [("qwen", "none"), ("qwen", "int"), ("synthetic", "none"), ("synthetic", "float"),
               ("synthetic", "int")]
QWEN_DIGITS = list(range(15, 25))
QWEN_TEXT = [785, 4226, 374, 151_643, 151_700]


def syn_case(syn_tok):
    gv = syn_tok.get_vocab()
    return [DIGIT_IDS[str(d)] for d in range(10)], [gv["the"], gv["12"], gv["007"], gv["[PAD]"], 35]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("squash", [1.5, 30.0])
@pytest.mark.parametrize(("tokenizer", "weights_kind"), TOK_WEIGHTS)
def test_oracle_squash_factor(qwen_tok, syn_tok, tokenizer, squash, reweigh, reduction, weights_kind):
    """ntloss.NTLoss(squash_factor=...) vs ntl_wasserstein_loss(squash_factor=...), and the module."""
    tok, V = (qwen_tok, QWEN_V) if tokenizer == "qwen" else (syn_tok, SYN_V)
    digits, text = (QWEN_DIGITS, QWEN_TEXT) if tokenizer == "qwen" else syn_case(syn_tok)
    ref = oracle_kw(tok, V, ntloss.NTLoss, reweigh, f64=reweigh, squash_factor=squash)

    def call(x, labels, w, reduction):
        return ntl.ntl_wasserstein_loss(x, labels, tok, reduction=reduction, weights=w,
                                        reweigh=reweigh, squash_factor=squash)

    compare_fn(tok, V, digits, text, ref, call, reduction, weights_kind, seed=11, f64=reweigh)
    if tokenizer == "synthetic" and reduction == "mean":
        crit = ntl.NumberTokenLoss(tok, reweigh=reweigh, squash_factor=squash, vocab_size=V)
        compare_fn(tok, V, digits, text, ref, lambda x, y, w, r: crit(x, y, weights=w), "mean",
                   weights_kind, seed=12, f64=reweigh)


def _huber(delta):
    return functools.partial(torch.nn.functional.huber_loss, delta=delta)


ERRORS = {  # "mse" is test_oracle_qwen / test_oracle_synthetic (ntl_mse_loss)
    "mae": (torch.nn.functional.l1_loss, {}),
    "huber": (torch.nn.functional.huber_loss, {}),
    "huber-2.5": (_huber(2.5), {"huber_delta": 2.5}),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize(("tokenizer", "weights_kind"), TOK_WEIGHTS)
def test_oracle_dot_loss_errors(qwen_tok, syn_tok, tokenizer, error, reweigh, reduction, weights_kind):
    """ntloss.NTLossDotProduct(loss_function=F.l1_loss / F.huber_loss(delta)) vs ntl_dot_loss."""
    tok, V = (qwen_tok, QWEN_V) if tokenizer == "qwen" else (syn_tok, SYN_V)
    digits, text = (QWEN_DIGITS, QWEN_TEXT) if tokenizer == "qwen" else syn_case(syn_tok)
    fn, kw = ERRORS[error]
    ref = oracle_kw(tok, V, ntloss.NTLossDotProduct, reweigh, f64=reweigh, loss_function=fn)

    def call(x, labels, w, reduction):
        return ntl.ntl_dot_loss(x, labels, tok, error=error.split("-")[0], reduction=reduction,
                                weights=w, reweigh=reweigh, **kw)

    compare_fn(tok, V, digits, text, ref, call, reduction, weights_kind, seed=13, f64=reweigh)


@pytest.mark.parametrize("weights_kind", ["int", "uint8", "bool"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("method", METHODS)
def test_oracle_integer_and_bool_weights(syn_tok, method, reduction, weights_kind):
    """An HF attention mask (int64), uint8 and bool masks as weights: equal to ntloss given the
    same tensor (it accepts them all)."""
    digits, text = syn_case(syn_tok)
    ref = oracle(syn_tok, SYN_V, method, False)

    def call(x, labels, w, reduction):
        return ntl_fn(method)(x, labels, syn_tok, reduction=reduction, weights=w)

    compare_fn(syn_tok, SYN_V, digits, text, ref, call, reduction, weights_kind, seed=17)
