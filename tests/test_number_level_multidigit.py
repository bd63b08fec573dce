"""Number-level NTL and ``predict_numbers(labels=)`` on multi-digit number tokens (issue 25).

Llama-3's real tokenizer (``ntl.tokenizers.llama3_tokenizer()``, V = 128,256) with its whole
number vocabulary ``ntl.vocab_for_tokenizer(tok)`` (K = 1,110 tokens ``'0'..'999'``, widths 1-3).
A number written ``'123' '4'`` is 1234: ``yhat = sum_t 10^{p_t} E[value_t]`` with ``p_t`` the
digits written after token ``t`` in its number.

References, independent of the code under test:
* hand-computed values (two-token distributions whose expectation is exact);
* a float64 walk over each row's label strings (token texts from ``tok.get_vocab()``, widths
  ``len(text)``), differentiated by autograd for the gradients;
* a hypothesis property: logits +30 at the label tokens of random integers (tokenized by the
  real tokenizer) give a loss ~0 and ``predict_numbers`` gives the integers.
``ntloss`` is no reference here: it scores ``'123' '4'`` as the number 4.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_probe import count_syncs  # tests/support

import ntl

V = 128_256
EPS = torch.finfo(torch.float32).eps
BACKENDS = ["torch", "triton"]  # triton: the digit-gather / number-mass kernels (interpreted on CPU)
REDUCTIONS = ["none", "mean", "sum"]


class Llama3(SimpleNamespace):
    def __repr__(self) -> str:  # hypothesis and pytest print arguments: not 128k tokens
        return "Llama3()"


@pytest.fixture(scope="module")
def L3(llama3_tok):
    gv = llama3_tok.get_vocab()
    text = {i: t for t, i in gv.items() if t.isascii() and t.isdigit()}
    ids = torch.tensor(sorted(text))
    return Llama3(
        tok=llama3_tok, gv=gv, text=text, ids=ids,
        vals=torch.tensor([float(int(text[i])) for i in ids.tolist()], dtype=torch.float64),
        vocab=ntl.vocab_for_tokenizer(llama3_tok), dot=gv["."])


def test_the_vocabulary_is_llama3s_every_number_token(L3):
    assert L3.vocab.K == len(L3.text) == 1110 and L3.vocab.vocab_size == len(L3.tok) == V
    assert sorted(L3.vocab.token_ids) == L3.ids.tolist()
    assert L3.tok.tokenize("1234 12345 12.5") == ["123", "4", "Ġ", "123", "45", "Ġ", "12", ".", "5"]


# ---------------------------------------------------------------- the float64 reference
def reference(L3, x, labels, *, float_level=False, L=20, reweigh=False, ignore_index=-100):
    """``(loss, yhat, y)``, float64 ``[R, T]`` at each number's first token (0 elsewhere), by
    walking each row's label texts; differentiable in ``x`` (upcast to float64 here)."""
    x64 = x.double()
    e = torch.softmax(x64[..., L3.ids], -1) @ L3.vals
    mass = torch.softmax(x64, -1)[..., L3.ids].sum(-1) if reweigh else None
    R, T = labels.shape
    zero = x64.new_zeros(())
    loss = [[zero] * T for _ in range(R)]
    yhat = [[zero] * T for _ in range(R)]
    y = [[zero] * T for _ in range(R)]
    for r in range(R):
        lab = [int(v) for v in labels[r]]

        def is_num(j, lab=lab):
            return lab[j] != ignore_index and lab[j] in L3.text

        t = 0
        while t < T:
            if not is_num(t):
                t += 1
                continue
            pos, j = [t], t + 1
            while j < T:
                if is_num(j):
                    pos.append(j)
                    j += 1
                elif float_level and lab[j] == L3.dot and j + 1 < T and is_num(j + 1):
                    j += 1
                else:
                    break
            widths = [len(L3.text[lab[q]]) for q in pos]
            places = [min(sum(widths[i + 1:]), max(L - widths[i], 0)) for i in range(len(pos))]
            yh = torch.stack([10.0 ** p * e[r, q] for p, q in zip(places, pos, strict=True)]).sum()
            yv = sum(10.0 ** p * int(L3.text[lab[q]]) for p, q in zip(places, pos, strict=True))
            lo = (yh - yv).abs() / (yh.abs() + abs(yv) + float(EPS))
            if mass is not None:
                lo = lo * mass[r, t] + 1.01 * (1 - mass[r, t])
            loss[r][t], yhat[r][t], y[r][t] = lo, yh, x64.new_tensor(float(yv))
            t = j
    stack = lambda rows: torch.stack([torch.stack(row) for row in rows])  # noqa: E731
    return stack(loss), stack(yhat), stack(y)


def reduce(per, labels_start_w, reduction):
    w = labels_start_w
    if reduction == "none":
        return per * w
    if reduction == "sum":
        return (per * w).sum()
    return (per * w).sum() / w.sum()


def starts_of(L3, labels, float_level=False, ignore_index=-100):
    """First token of each number (the reference's walk, as a bool mask)."""
    R, T = labels.shape
    out = torch.zeros(R, T, dtype=torch.bool)
    for r in range(R):
        lab = [int(v) for v in labels[r]]
        num = [v != ignore_index and v in L3.text for v in lab]
        for t in range(T):
            joined = (float_level and t >= 2 and lab[t - 1] == L3.dot and num[t - 2])
            out[r, t] = num[t] and not (t > 0 and num[t - 1]) and not joined
    return out


# ---------------------------------------------------------------- hand-computed values
def two_token_logits(L3, specs, seed=0):
    """``[1, T, V]`` random logits; at position ``t`` with ``specs[t] = {text: logit}`` every
    number token gets -60 but those (so E[value] is their softmax-weighted mean, exactly)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, len(specs), V, generator=g)
    for t, spec in enumerate(specs):
        if spec is not None:
            x[0, t, L3.ids] = -60.0
            for text, logit in spec.items():
                x[0, t, L3.gv[text]] = logit
    return x


LN3 = math.log(3.0)  # {a: LN3, b: 0}: E = 0.75 a + 0.25 b

# (label texts, logits specs, float_level, {position: loss}, {position: yhat})
HAND_CASES = {
    # '123' '4' = 1234: yhat = 10 * 123.25 + 4.5 = 1237
    "123|4": (["123", "4"], [{"123": LN3, "124": 0.0}, {"4": 0.0, "5": 0.0}], False,
              {0: 3 / 2471}, {0: 1237.0}),
    # '12' '345' = 12345: yhat = 1000 * 12.25 + 346 = 12596
    "12|345": (["12", "345"], [{"12": LN3, "13": 0.0}, {"345": 0.0, "347": 0.0}], False,
               {0: 251 / 24941}, {0: 12596.0}),
    # '12' '.' '5' = 125 (float level): yhat = 10 * 12.25 + 6 = 128.5
    "12|.|5 float": (["12", ".", "5"], [{"12": LN3, "13": 0.0}, None, {"5": 0.0, "7": 0.0}], True,
                     {0: 3.5 / 253.5}, {0: 128.5}),
    # the same labels as two numbers 12 and 5 without float_level
    "12|.|5 int": (["12", ".", "5"], [{"12": LN3, "13": 0.0}, None, {"5": 0.0, "7": 0.0}], False,
                   {0: 0.25 / 24.25, 2: 1 / 11}, {0: 12.25, 2: 6.0}),
    # one token: '42' predicted 0.75 * 40 + 0.25 * 50 = 42.5
    "42": (["42"], [{"40": LN3, "50": 0.0}], False, {0: 0.5 / 84.5}, {0: 42.5}),
    # a zero-padded token has its text's width: '1' '07' = 107 (p = 2, 0); yhat = 100 + 7.5
    "1|07": (["1", "07"], [{"1": 0.0}, {"07": 0.0, "08": 0.0}], False, {0: 0.5 / 214.5}, {0: 107.5}),
    # two numbers in a row: '123' '4' ' and' '42'
    "1234 and 42": (["123", "4", "Ġand", "42"],
                    [{"123": LN3, "124": 0.0}, {"4": 0.0, "5": 0.0}, None, {"40": LN3, "50": 0.0}], False,
                    {0: 3 / 2471, 3: 0.5 / 84.5}, {0: 1237.0, 3: 42.5}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HAND_CASES))
def test_hand_values(L3, case, backend):
    texts, specs, float_level, want_loss, want_yhat = HAND_CASES[case]
    labels = torch.tensor([[L3.gv[t] for t in texts]])
    x = two_token_logits(L3, specs)
    kw = {"float_level": float_level, "decimal_point_id": L3.dot if float_level else None}
    T = len(texts)
    loss = torch.zeros(1, T, dtype=torch.float64)
    yhat = torch.zeros(1, T, dtype=torch.float64)
    for t, v in want_loss.items():
        loss[0, t] = v
    for t, v in want_yhat.items():
        yhat[0, t] = v
    # the float64 reference agrees with the hand values (to ln 3's fp32 rounding in the logits)
    ref_loss, ref_yhat, _ = reference(L3, x, labels, float_level=float_level)
    torch.testing.assert_close(ref_loss, loss, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(ref_yhat, yhat, rtol=1e-7, atol=1e-9)
    # fp32: E[value] to ~1e-7 relative, so |yhat - y| (3 out of 1237) to ~5e-5 relative
    got = ntl.number_level_loss(x, labels, L3.vocab, reduction="none", backend=backend, **kw)
    torch.testing.assert_close(got.double(), loss, rtol=2e-4, atol=1e-8)
    n = len(want_loss)
    for reduction, want in (("sum", loss.sum()), ("mean", loss.sum() / n)):
        got = ntl.number_level_loss(x, labels, L3.vocab, reduction=reduction, backend=backend, **kw)
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-8)
    pred, mass = ntl.predict_numbers(x, L3.vocab, labels=labels, backend=backend, **kw)
    torch.testing.assert_close(pred.double(), yhat, rtol=1e-6, atol=1e-6)
    want_mass = torch.softmax(x.double(), -1)[..., L3.ids].sum(-1)
    torch.testing.assert_close(mass.double(), want_mass, rtol=1e-5, atol=1e-7)


def test_hand_values_ignore_index_and_weights(L3):
    """'12' <ignore> '5' is two numbers (12 and 5); a number takes its first token's weight."""
    labels = torch.tensor([[L3.gv["12"], -100, L3.gv["5"], L3.gv["Ġ"], L3.gv["123"], L3.gv["4"]]])
    x = two_token_logits(L3, [{"12": LN3, "13": 0.0}, None, {"5": 0.0, "7": 0.0}, None,
                              {"123": LN3, "124": 0.0}, {"4": 0.0, "5": 0.0}])
    w = torch.tensor([[2.0, 9.0, 0.5, 9.0, 3.0, 7.0]])
    l12, l5, l1234 = 0.25 / 24.25, 1 / 11, 3 / 2471
    got = ntl.number_level_loss(x, labels, L3.vocab, weights=w, reduction="none")
    torch.testing.assert_close(got.double(), torch.tensor([[2 * l12, 0, 0.5 * l5, 0, 3 * l1234, 0]],
                                                          dtype=torch.float64), rtol=2e-4, atol=1e-8)
    got = ntl.number_level_loss(x, labels, L3.vocab, weights=w)
    torch.testing.assert_close(got.double(), torch.tensor((2 * l12 + 0.5 * l5 + 3 * l1234) / 5.5,
                                                          dtype=torch.float64), rtol=2e-4, atol=1e-8)
    pred, _ = ntl.predict_numbers(x, L3.vocab, labels=labels)
    torch.testing.assert_close(pred.double(), torch.tensor([[12.25, 0, 6.0, 0, 1237.0, 0]],
                                                           dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_max_number_length_counts_digits(L3):
    """'123' '456' '789' with max_number_length=4: digits after = 6, 3, 0; a width-3 token's
    place is at most 4 - 3 = 1, so y = 1230 + 4560 + 789 = 6579 (its leading digit at place 3)."""
    labels = torch.tensor([[L3.gv["123"], L3.gv["456"], L3.gv["789"]]])
    x = two_token_logits(L3, [{"123": 0.0}, {"456": 0.0}, {"788": 0.0}])
    pred, _ = ntl.predict_numbers(x, L3.vocab, labels=labels, max_number_length=4)
    torch.testing.assert_close(pred, torch.tensor([[6578.0, 0.0, 0.0]]))
    got = ntl.number_level_loss(x, labels, L3.vocab, max_number_length=4, reduction="sum")
    torch.testing.assert_close(got, torch.tensor(1 / 13157))
    # max_number_length=1 (below the width): every place 0, y = 123 + 456 + 789
    got = ntl.number_level_loss(x, labels, L3.vocab, max_number_length=1, reduction="sum")
    torch.testing.assert_close(got, torch.tensor(1 / (1368 + 1367)))


# ---------------------------------------------------------------- float64 reference, gradients
def packed_case(L3, seed=0):
    """Rows of real Llama-3 tokens: several numbers, decimals, a '.' at a row end, -100 inside
    a number, numbers at both row boundaries (row 0 ends and row 1 starts with one)."""
    texts = ["#### 1234 and 56.5", "12 + 7.25 = 1999", "x 3.14.15 y 12345678"]
    rows = [L3.tok.encode(t, add_special_tokens=False) for t in texts]
    T = max(map(len, rows)) + 1
    labels = torch.full((len(rows), T), -100)
    for r, ids in enumerate(rows):
        labels[r, : len(ids)] = torch.tensor(ids)
    labels[0, -1] = L3.gv["7"]  # row 0 ends with a number, row 1 starts with one ('12')
    labels[2, -2], labels[2, -1] = -100, L3.gv["78"]  # '123' '456' <ignore> '78': 123456 and 78
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*labels.shape, V, generator=g)
    boost = torch.tensor([0.0, 4.0, 8.0])[torch.randint(0, 3, labels.shape, generator=g)]
    x[..., L3.ids] += boost[..., None] + torch.randn(*labels.shape, len(L3.ids), generator=g)
    w = torch.rand(labels.shape, generator=g) * 2
    return x, labels, w


def test_packed_case_has_what_it_says(L3):
    _, labels, _ = packed_case(L3)
    texts = [[L3.tok.convert_ids_to_tokens(int(i)) if i >= 0 else None for i in row] for row in labels]
    assert texts[0][2:4] == ["123", "4"] and texts[0][-2:] == [None, "7"]
    assert texts[1][0] == "12" and texts[1][3:6] == ["7", ".", "25"] and texts[1][-5:-3] == ["199", "9"]
    assert texts[2][2:7] == ["3", ".", "14", ".", "15"] and texts[2][-4:] == ["123", "456", None, "78"]
    # 1234 56 5 7 | 12 7 25 1999 | 3 14 15 123456 78; float level: 1234 565 7 | 12 725 1999 | 31415 ...
    assert int(starts_of(L3, labels).sum()) == 13 and int(starts_of(L3, labels, True).sum()) == 9


@pytest.mark.parametrize(("float_level", "reweigh", "backend"), [
    (False, False, "torch"), (False, True, "torch"), (True, False, "torch"), (True, True, "torch"),
    (True, True, "triton"),  # the digit-gather and number-mass kernels (interpreted on a CPU)
])
def test_against_float64_reference_values_and_gradients(L3, float_level, reweigh, backend):
    x, labels, w = packed_case(L3, seed=1)
    x_ref = x.double().requires_grad_(True)
    per, yhat_ref, _ = reference(L3, x_ref, labels, float_level=float_level, reweigh=reweigh)
    start = starts_of(L3, labels, float_level).double()
    kw = {"float_level": float_level, "decimal_point_id": L3.dot if float_level else None}
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7))
    for use_w in (True,) if reweigh else (False, True):  # reweigh: the full-V mass is the slow part
        wt = (w.double() if use_w else torch.ones_like(start)) * start
        for reduction in REDUCTIONS:
            ref = reduce(per, wt, reduction)
            xg = x.clone().requires_grad_(True)
            got = ntl.number_level_loss(xg, labels, L3.vocab, reweigh=reweigh, reduction=reduction,
                                        weights=w if use_w else None, backend=backend, **kw)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            u = up if reduction == "none" else torch.tensor(1.0)
            (g_ref,) = torch.autograd.grad((ref * u.double()).sum(), x_ref, retain_graph=True)
            (got * u).sum().backward()
            torch.testing.assert_close(xg.grad.double(), g_ref, rtol=1e-4, atol=1e-6)
    # predict_numbers(labels=): the whole numbers' expectations, and their gradients
    xg = x.clone().requires_grad_(True)
    pred, _ = ntl.predict_numbers(xg, L3.vocab, labels=labels, backend=backend, **kw)
    torch.testing.assert_close(pred.double(), yhat_ref.detach(), rtol=1e-6, atol=1e-4)
    (g_ref,) = torch.autograd.grad((yhat_ref * up.double()).sum(), x_ref)
    (pred * up).sum().backward()
    # d yhat / d z = 10^p q (v - e): fp32's e (~500, to ~3e-5) scaled by 10^p: an absolute bound
    torch.testing.assert_close(xg.grad.double(), g_ref, rtol=1e-5, atol=1e-6 * float(g_ref.abs().max()))


def test_gradient_matches_finite_differences(L3):
    """d loss / d z at the two number tokens of '123' '4', by central differences in float64."""
    labels = torch.tensor([[L3.gv["123"], L3.gv["4"]]])
    x = two_token_logits(L3, [{"123": 0.3, "124": 0.0, "99": -0.5}, {"4": 0.0, "5": 0.2}]).double()
    xg = x.clone().requires_grad_(True)
    ntl.number_level_loss(xg, labels, L3.vocab, reduction="sum").backward()
    for t, text in ((0, "123"), (0, "124"), (0, "99"), (1, "4"), (1, "5")):
        j, h = L3.gv[text], 1e-3
        xp, xm = x.clone(), x.clone()
        xp[0, t, j] += h
        xm[0, t, j] -= h
        fd = (reference(L3, xp, labels)[0].sum() - reference(L3, xm, labels)[0].sum()) / (2 * h)
        torch.testing.assert_close(xg.grad[0, t, j].double(), fd, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- tokenizer, module, digit level
def test_the_tokenizer_still_means_its_ten_digits_and_refuses_multi_digit_labels(L3):
    labels = torch.tensor([[L3.gv["123"], L3.gv["4"]]])
    x = torch.randn(1, 2, V)
    msg = r"labels hold multi-digit number tokens \(e.g. id \d+\).*ntl.vocab_for_tokenizer\(tok\)"
    with pytest.raises(ValueError, match=msg):
        ntl.number_level_loss(x, labels, L3.tok)
    with pytest.raises(ValueError, match=msg):
        ntl.predict_numbers(x, L3.tok, labels=labels)


def test_module_method_number_takes_the_number_vocab(L3):
    x, labels, _ = packed_case(L3, seed=2)
    crit = ntl.NumberTokenLoss(L3.vocab, method="number", float_level=True, decimal_point_id=L3.dot)
    want = reference(L3, x, labels, float_level=True)[0].sum() / starts_of(L3, labels, True).sum()
    torch.testing.assert_close(crit(x, labels).double(), want, rtol=1e-5, atol=1e-7)


def test_digit_level_results_unchanged(qwen_tok):
    """Qwen's whole number vocabulary is its ten digits: the same numbers bit for bit as the
    tokenizer (tests/test_number_level.py checks those against ntloss)."""
    vocab = ntl.vocab_for_tokenizer(qwen_tok)
    assert isinstance(vocab, ntl.DigitVocab) and not vocab.is_multi_digit
    ids = qwen_tok.encode("#### 1234.5 and 67", add_special_tokens=False)
    labels = torch.tensor([ids, ids[::-1]])
    x = torch.randn(2, len(ids), 151_936, generator=torch.Generator().manual_seed(3))
    for reweigh in (False, True):
        a = ntl.number_level_loss(x, labels, qwen_tok, float_level=True, reweigh=reweigh, reduction="none")
        b = ntl.number_level_loss(x, labels, vocab, float_level=True, decimal_point_id=qwen_tok.get_vocab()["."],
                                  reweigh=reweigh, reduction="none")
        assert torch.equal(a, b) and int((a != 0).sum()) == 4


def test_bad_input(L3):
    x = torch.randn(1, 2, V)
    labels = torch.tensor([[L3.gv["12"], L3.gv["3"]]])
    with pytest.raises(ValueError, match="apply only with labels="):
        ntl.predict_numbers(x, L3.vocab, float_level=True)
    with pytest.raises(ValueError, match="apply only with labels="):
        ntl.predict_numbers(x, L3.vocab, max_number_length=5)
    with pytest.raises(ValueError, match="max_number_length"):
        ntl.predict_numbers(x, L3.vocab, labels=labels, max_number_length=0)
    with pytest.raises(ValueError, match=r"float_level=True needs the '\.' token"):
        ntl.predict_numbers(x, L3.vocab, labels=labels, float_level=True)
    with pytest.raises(ValueError, match="labels shape"):
        ntl.predict_numbers(x, L3.vocab, labels=labels[:, :1])
    no_texts = ntl.NumberVocab(L3.vocab.token_ids, L3.vocab.values, V)
    with pytest.raises(ValueError, match="without texts"):
        ntl.number_level_loss(x, labels, no_texts)
    # without labels, predict_numbers stays per position (any NumberVocab, texts or not)
    y0, _ = ntl.predict_numbers(x, no_texts)
    torch.testing.assert_close(y0.double(), torch.softmax(x.double()[..., L3.ids], -1) @ L3.vals,
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- vectorised: no per-number sync
def test_host_syncs_do_not_grow_with_numbers(monkeypatch):
    texts = [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]
    vocab = ntl.NumberVocab(range(110), [int(t) for t in texts], 128, texts=texts)
    counts = {}
    for n in (2, 200):
        labels = torch.full((2, 3 * n), 120)
        labels[:, 0::3] = 10 + torch.arange(n) % 100   # a two-digit token, then a digit: 3 digits
        labels[:, 1::3] = torch.arange(n) % 10
        x = torch.randn(2, 3 * n, 128, requires_grad=True)
        box = {}

        def fwd(x=x, labels=labels, box=box):
            box["loss"] = ntl.number_level_loss(x, labels, vocab, reweigh=True)

        f = count_syncs(fwd, monkeypatch)
        b = count_syncs(lambda box=box: box["loss"].backward(), monkeypatch)
        counts[n] = (f, b)
    assert counts[2] == counts[200] and counts[2][1] == 0, counts


# ---------------------------------------------------------------- property: peaked logits
@settings(max_examples=15)
@given(numbers=st.lists(st.integers(1, 10**12 - 1), min_size=1, max_size=3),
       decimals=st.lists(st.integers(1, 999), min_size=3, max_size=3),
       float_level=st.booleans(), seed=st.integers(0, 2**16))
def test_property_peaked_logits_score_zero_and_predict_the_labels(L3, numbers, decimals, float_level, seed):
    """Text "#### a and b.c ...": logits +30 at each label token. The loss is ~0 and
    predict_numbers gives each number's value (the digits with the '.' dropped at float level).
    Numbers >= 1: the relative error of a 0 is ~1 for any leak of mass (e^-27 per token here)."""
    parts, want = [], []
    for i, n in enumerate(numbers):
        if i == 1:  # a decimal
            parts.append(f"{n}.{decimals[i]}")
            want += [int(f"{n}{decimals[i]}")] if float_level else [n, decimals[i]]
        else:
            parts.append(str(n))
            want.append(n)
    ids = L3.tok.encode("#### " + " and ".join(parts), add_special_tokens=False)
    labels = torch.tensor([ids])
    x = torch.randn(1, len(ids), V, generator=torch.Generator().manual_seed(seed))
    x[0, torch.arange(len(ids)), labels[0]] += 30.0
    kw = {"float_level": float_level, "decimal_point_id": L3.dot if float_level else None}
    loss = ntl.number_level_loss(x, labels, L3.vocab, **kw)
    assert 0.0 <= float(loss) < 1e-5
    pred, _ = ntl.predict_numbers(x, L3.vocab, labels=labels, **kw)
    start = starts_of(L3, labels, float_level)
    got = pred[start].double()
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=1e-3)
    assert torch.all(pred[~start] == 0)
