"""Place-aligned RL targets for number tokens of any width (issue 25), on the REAL tokenizers.

Llama-3 writes numbers in tokens of up to three digits (``1234`` -> ``'123' '4'``); a number
token writing ``w`` digits at place values ``[p, p + w)`` of the response's final answer
targets the token whose text is the ground truth's digits at those places, zero-padded.
Qwen2.5 (digit-level) is the ``w = 1`` case and must be unchanged.

Every expected value below is written by hand (token texts) or computed independently
with plain string formatting / float64 formulas / ``ntloss``; never by the code under test.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from token_rows import IGN, pad_rows, targeted  # tests/support

import ntl
from ntl.rl.metrics import digit_probs, digit_stats
from ntl.targets import build_digit_targets

sys.path.insert(0, str(Path(__file__).parent))
from test_targets import FINAL_ANSWER_CASES as QWEN_CASES  # the pre-issue-25 expectations

EOT = "<|end_of_text|>"


def encode(tok, texts, pad_id=0, eos=True):
    """Right-padded Llama-3 ids [B, T] (no BOS) and mask; an <|end_of_text|> closes each response.
    Llama-3 has no pad token: ``pad_id`` fills the padding (outside the mask)."""
    end = [tok.convert_tokens_to_ids(EOT)] if eos else []
    return pad_rows(tok, texts, end=end, pad_id=pad_id, add_special_tokens=False)


def is_number_text(s: str) -> bool:
    return s.isascii() and s.isdigit()


def test_llama3_tokenization_precondition(llama3_tok):
    """What the worked examples rely on: Llama-3 splits digit runs into 3-digit tokens from
    the left, separators and '.' are their own tokens, no space inside number tokens."""
    def toks(s):
        return [llama3_tok.decode([i]) for i in llama3_tok.encode(s, add_special_tokens=False)]
    assert toks("#### 1234") == ["####", " ", "123", "4"]
    assert toks("#### 12345") == ["####", " ", "123", "45"]
    assert toks("#### 12.5") == ["####", " ", "12", ".", "5"]
    assert toks("#### 1,234") == ["####", " ", "1", ",", "234"]
    assert toks("#### -7") == ["####", " -", "7"]
    v = ntl.vocab_for_tokenizer(llama3_tok)
    assert type(v) is ntl.NumberVocab and v.K == 1110 and v.max_width == 3
    assert ntl.vocab_for_tokenizer(ntl.tokenizers.qwen2_tokenizer()).K == 10


# (response, truth, expected [(token, target)] over the final answer's number tokens)
LLAMA_CASES = [
    # the examples
    ("#### 1234", "1234", [("123", "123"), ("4", "4")]),
    ("#### 1234", "1299", [("123", "129"), ("4", "9")]),
    ("#### 999", "1234", [("999", "234")]),  # truth's thousands dropped
    ("#### 12345", "12399", [("123", "123"), ("45", "99")]),
    ("#### 42", "7", [("42", "07")]),  # zero-padded two-digit token
    ("#### 1234", "5", [("123", "000"), ("4", "5")]),
    ("#### 1234567", "7654321", [("123", "765"), ("456", "432"), ("7", "1")]),
    # decimals: integer part from the units leftwards, fraction from the tenths rightwards
    ("#### 12.5", "3.25", [("12", "03"), ("5", "2")]),
    ("#### 0.125", "0.1", [("0", "0"), ("125", "100")]),
    ("#### 3", "3.5", [("3", "3")]),
    # signs are ignored (ASCII minus, unicode minus, negative truth)
    ("#### -1,234", "1299", [("1", "1"), ("234", "299")]),
    ("#### \u221242", "-17", [("42", "17")]),
    ("#### 7", "-1,234", [("7", "4")]),
    # thousands separators, dollar sign, trailing period
    ("#### 1,234", "1299", [("1", "1"), ("234", "299")]),
    ("#### $1,234.", "1240", [("1", "1"), ("234", "240")]),
    # digits before the answer take no part; boxed answers
    ("So 3+4=7 and 120*10=1200.\n#### 1234", "99", [("123", "009"), ("4", "9")]),
    ("The answer is \\boxed{42}.", "42", [("42", "42")]),
]


@pytest.mark.parametrize("text,truth,expected", LLAMA_CASES)
def test_llama3_final_answer_worked_examples(llama3_tok, text, truth, expected):
    ids, mask, lens = encode(llama3_tok, [text])
    tg = build_digit_targets(ids, [truth], llama3_tok, mode="final_answer", response_mask=mask)
    assert tg.dtype == torch.long and tg.shape == ids.shape
    got = targeted(llama3_tok, ids[0], tg[0])
    assert [(a, b) for _, a, b in got] == expected
    # the answer closes the response: its tokens are the last number tokens of the row
    num_pos = [t for t in range(lens[0]) if is_number_text(llama3_tok.decode([int(ids[0, t])]))]
    assert [p for p, _, _ in got] == num_pos[-len(expected):]


def test_llama3_answer_followed_by_text_and_numbers(llama3_tok):
    text = "Add 30 and 9.\n#### 39 because 30 apples and 9 pears"
    ids, mask, _ = encode(llama3_tok, [text])
    tg = build_digit_targets(ids, ["1,241"], llama3_tok, response_mask=mask)
    got = targeted(llama3_tok, ids[0], tg[0])
    assert [(a, b) for _, a, b in got] == [("39", "41")]
    num_pos = [t for t in range(ids.shape[1]) if is_number_text(llama3_tok.decode([int(ids[0, t])]))]
    assert [p for p, _, _ in got] == [num_pos[2]]  # after '30' and '9'


def test_llama3_digit_with_no_token_gets_no_target():
    """A vocab lacking the zero-padded text ('07') leaves that position without a target."""
    texts = [str(d) for d in range(1, 10)] + ["42"]  # '1'..'9' at ids 1..9, '42' at 13; no '0', '07'
    vocab = ntl.NumberVocab([*range(1, 10), 13], [int(t) for t in texts], 20, texts=texts)
    tg = build_digit_targets(torch.tensor([[13], [4]]), ["7", "14"], vocab,
                             responses=["#### 42", "#### 4"])
    assert tg.tolist() == [[IGN], [4]]  # '07' is no token; '4' -> '4'


def test_qwen_unchanged(qwen_tok):
    """Digit-level tokenizers are the width-1 case: the old expectations of test_targets.py hold
    with the default vocab, an explicit DigitVocab and a NumberVocab without texts."""
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    dv = ntl.DigitVocab.from_tokenizer(qwen_tok)
    bare = ntl.NumberVocab(list(dv.token_ids), list(range(10)), dv.vocab_size)  # no texts
    assert bare.texts is None
    assert ntl.vocab_for_tokenizer(qwen_tok) == dv
    for text, truth, expected in QWEN_CASES:
        row = [*qwen_tok.encode(text), im_end]
        ids = torch.tensor([row])
        for vocab in (None, dv, bare):
            tg = build_digit_targets(ids, [truth], qwen_tok, vocab=vocab)
            got = [(a, b) for _, a, b in targeted(qwen_tok, ids[0], tg[0])]
            assert got == expected, (text, truth, vocab)
        assert torch.equal(build_digit_targets(ids, [truth], bare, responses=[text]),
                           build_digit_targets(ids, [truth], qwen_tok))


def test_llama3_all_mode_targets_every_number_token(llama3_tok):
    texts = ["3+4=7 and 1234+10=1244 so #### 1,244", "1234 so #### 1235", "#### 12.5"]
    truths = ["1244", "1234", "12.50"]
    ids, mask, _ = encode(llama3_tok, texts)
    tg, info = build_digit_targets(ids, truths, llama3_tok, mode="all", response_mask=mask,
                                   return_info=True)
    assert info.correct == [True, False, True]
    assert [a for _, a, _ in targeted(llama3_tok, ids[0], tg[0])] == [
        "3", "4", "7", "123", "4", "10", "124", "4", "1", "244"]
    assert (tg[1] == IGN).all()
    assert [a for _, a, _ in targeted(llama3_tok, ids[2], tg[2])] == ["12", "5"]
    sel = tg != IGN
    assert torch.equal(tg[sel], ids[sel])
    assert info.n_targets == [10, 0, 2]


def test_llama3_responses_given_equals_decoded(llama3_tok):
    texts = ["So 12 + 30 = 42\n#### 42", "#### 1,234.5", "no answer 77"]
    truths = ["41", "-999.25", "77"]
    ids, mask, _ = encode(llama3_tok, texts, eos=False)
    nv = ntl.NumberVocab.from_tokenizer(llama3_tok)
    ref, info = build_digit_targets(ids, truths, llama3_tok, response_mask=mask, return_info=True)
    assert [[(a, b) for _, a, b in targeted(llama3_tok, ids[i], ref[i])] for i in range(3)] == [
        [("42", "41")],
        [("1", "0"), ("234", "999"), ("5", "2")],
        [],
    ]
    assert info.preds == ["42", "1234.5", None] and info.n_targets == [1, 3, 0]
    # a NumberVocab positionally (no tokenizer, no decode) plus the texts
    assert torch.equal(ref, build_digit_targets(ids, truths, nv, response_mask=mask, responses=texts))
    # vocab= with the tokenizer, and responses= with the tokenizer
    assert torch.equal(ref, build_digit_targets(ids, truths, llama3_tok, vocab=nv, response_mask=mask))
    assert torch.equal(ref, build_digit_targets(ids, truths, llama3_tok, response_mask=mask,
                                                responses=texts))


def test_llama3_digit_count_mismatch_excluded_with_warning(llama3_tok, caplog):
    texts = ["#### 1234", "#### 56"]
    ids, mask, _ = encode(llama3_tok, texts, eos=False)
    nv = ntl.vocab_for_tokenizer(llama3_tok)
    with caplog.at_level(logging.WARNING, logger="ntl"):
        tg, info = build_digit_targets(
            ids, ["1299", "57"], nv, response_mask=mask,
            responses=["#### 1234", "9 more digits #### 56"], return_info=True,
        )
    assert info.excluded == [1] and info.n_targets == [2, 0]
    assert (tg[1] == IGN).all()
    assert [(a, b) for _, a, b in targeted(llama3_tok, ids[0], tg[0])] == [("123", "129"), ("4", "9")]
    assert "excluded" in caplog.text and "[1]" in caplog.text
    # the ten-digit vocab cannot account for '123': both rows excluded (the silent case)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ntl"):
        tg, info = build_digit_targets(ids, ["1299", "57"], llama3_tok, response_mask=mask,
                                       vocab=ntl.DigitVocab.from_tokenizer(llama3_tok), return_info=True)
    assert info.excluded == [0, 1] and (tg == IGN).all() and "2 of 2" in caplog.text


def test_llama3_padding_batch_mixed_rows(llama3_tok):
    """Pads hold the number token '123' outside response_mask: never targeted. The batch gives
    each row what the row alone gives."""
    texts = ["#### 7", "So 12 + 30 = 42\n#### 42", "nothing", "#### 1000", "#### 12,345.75"]
    truths = ["1,008", "42", "3", "999", "99.5"]
    pad = llama3_tok.convert_tokens_to_ids("123")
    ids, mask, lens = encode(llama3_tok, texts, pad_id=pad)
    tg, info = build_digit_targets(ids, truths, llama3_tok, response_mask=mask, return_info=True)
    assert (tg[mask == 0] == IGN).all()
    rows = [[(a, b) for _, a, b in targeted(llama3_tok, ids[i], tg[i])] for i in range(len(texts))]
    assert rows == [
        [("7", "8")],
        [("42", "42")],
        [],
        [("100", "099"), ("0", "9")],
        [("12", "00"), ("345", "099"), ("75", "50")],
    ]
    assert info.preds == ["7", "42", None, "1000", "12345.75"]
    assert info.correct == [False, True, False, False, False]
    assert info.n_targets == [1, 1, 0, 2, 3] and info.excluded == []
    for i, L in enumerate(lens):
        alone = build_digit_targets(ids[i : i + 1, :L], [truths[i]], llama3_tok)
        assert torch.equal(alone[0], tg[i, :L])


def test_multi_digit_vocab_without_texts_refused(llama3_tok):
    nv = ntl.vocab_for_tokenizer(llama3_tok)
    bare = ntl.NumberVocab(list(nv.token_ids), list(nv.values), nv.vocab_size)  # widths unknown
    ids, mask, _ = encode(llama3_tok, ["#### 1234"])
    with pytest.raises(ValueError, match=r"without token texts.*NumberVocab\.from_tokenizer"):
        build_digit_targets(ids, ["1234"], llama3_tok, vocab=bare)
    with pytest.raises(ValueError, match="texts="):
        build_digit_targets(ids, ["1234"], bare, responses=["#### 1234"])
    # "all" mode needs no widths
    tg = build_digit_targets(ids, ["1234"], llama3_tok, vocab=bare, mode="all", response_mask=mask)
    assert [a for _, a, _ in targeted(llama3_tok, ids[0], tg[0])] == ["123", "4"]


def test_llama3_empty_batch(llama3_tok):
    ids = torch.zeros((0, 5), dtype=torch.long)
    tg, info = build_digit_targets(ids, [], llama3_tok, return_info=True)
    assert tg.shape == (0, 5) and info.n_targets == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pred=st.integers(0, 10**9),
    truth=st.integers(-(10**9), 10**9),
    noise=st.integers(0, 99_999),
    commas=st.booleans(),
)
def test_property_llama3_targets_spell_the_aligned_truth(llama3_tok, pred, truth, noise, commas):
    """Concatenated target texts == the truth's digits aligned to the response's digits
    (zero-padded / truncated on the left), and each target has its token's width."""
    p = f"{pred:,}" if commas else str(pred)
    text = f"First {noise} then {noise + 1}.\n#### {p}"
    ids, mask, _ = encode(llama3_tok, [text])
    tg = build_digit_targets(ids, [str(truth)], llama3_tok, response_mask=mask)
    got = targeted(llama3_tok, ids[0], tg[0])
    digits = str(pred)
    expected = str(abs(truth)).zfill(len(digits))[-len(digits):]
    assert "".join(a for _, a, _ in got) == digits  # every answer token targeted
    assert "".join(b for _, _, b in got) == expected
    assert all(len(a) == len(b) for _, a, b in got)


# --------------------------------------------------------------- metrics with K = 1,110
def test_digit_metrics_count_number_tokens(llama3_tok):
    """digit_probs / digit_stats with Llama-3's whole NumberVocab: target = the target token's
    index; accuracy = number-token accuracy; checked against a float64 softmax over the
    number columns."""
    nv = ntl.vocab_for_tokenizer(llama3_tok)
    texts = ["#### 1234", "So 7 #### 42"]
    ids, mask, _ = encode(llama3_tok, texts)
    tg = build_digit_targets(ids, ["1299", "42"], llama3_tok, response_mask=mask)
    V = nv.vocab_size
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*ids.shape, V, generator=g)
    t129, t42 = (llama3_tok.convert_tokens_to_ids(s) for s in ("129", "42"))
    logits[0, :, t129] += 30.0  # argmax = '129' on row 0: right at '123', wrong at '4'
    logits[1, :, t42] += 30.0  # right at '42'
    ref_ids = torch.tensor(nv.token_ids)
    z = logits.double()[..., ref_ids]
    q = torch.softmax(z, -1)
    sel = tg != IGN
    assert int(sel.sum()) == 3
    tcol = [nv.token_ids.index(int(t)) for t in tg[sel]]
    qs = q[sel]
    tp = qs[torch.arange(3), tcol]
    pred_ids = ref_ids[qs.argmax(-1)]
    acc = (pred_ids == tg[sel]).double().mean()
    assert acc.item() == pytest.approx(2 / 3)
    vals = torch.tensor(nv.values, dtype=torch.float64)
    w1 = (qs * (vals[None] - vals[tcol][:, None]).abs()).sum(-1).mean()
    stats = digit_stats(logits, tg, nv, method="wasserstein").to_dict()
    assert stats["ntl/total_digits"] == 3.0
    assert stats["ntl/digit_accuracy"] == pytest.approx(acc.item(), abs=1e-6)
    assert stats["ntl/target_prob"] == pytest.approx(tp.mean().item(), abs=1e-5)
    assert stats["ntl/confidence"] == pytest.approx(qs.max(-1).values.mean().item(), abs=1e-5)
    assert stats["ntl/loss"] == pytest.approx(w1.item(), rel=1e-4, abs=1e-4)
    pr = digit_probs(logits, tg, nv)
    assert pr.target_digit[sel].tolist() == tcol
    assert pr.correct[sel].tolist() == [True, False, True]
    assert torch.allclose(pr.target_prob[sel].double(), tp, atol=1e-5)


# ----------------------------------------------------- targets -> losses, end to end
def _llama_batch(tok):
    texts = ["So 3+4=7. #### 1234", "#### 42", "#### 12.5", "no answer"]
    truths = ["1299", "7", "3.25", "1"]
    ids, mask, _ = encode(tok, texts)
    tg = build_digit_targets(ids, truths, tok, response_mask=mask)
    return ids, tg


@pytest.mark.parametrize("method", ["mse", "wasserstein"])
def test_llama3_targets_through_ntl_loss(llama3_tok, method):
    nv = ntl.vocab_for_tokenizer(llama3_tok)
    _, tg = _llama_batch(llama3_tok)
    sel = tg != IGN
    assert [llama3_tok.decode([int(t)]) for t in tg[sel]] == ["129", "9", "07", "03", "2"]
    V = nv.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*tg.shape, V, generator=g) * 2.0
    # float64 hand formula: softmax over the K number columns, values = token values
    z = logits.double()[..., torch.tensor(nv.token_ids)][sel]
    q = torch.softmax(z, -1)
    vals = torch.tensor(nv.values, dtype=torch.float64)
    y = torch.tensor([float(llama3_tok.decode([int(t)])) for t in tg[sel]], dtype=torch.float64)
    assert y.tolist() == [129.0, 9.0, 7.0, 3.0, 2.0]
    if method == "mse":
        ref = ((q @ vals - y) ** 2).mean()
    else:
        ref = (q * (vals[None] - y[:, None]).abs()).sum(-1).mean()
    got = ntl.ntl_loss(logits, tg, nv, method=method)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # the authors' package over every number token (digit_level=False, no reweighing)
    import ntloss

    n = len(llama3_tok)
    cls = ntloss.NTLossDotProduct if method == "mse" else ntloss.NTLoss
    oracle = cls(llama3_tok, vocab_size=V, digit_level=False, reweigh=False)
    assert len(llama3_tok) == n
    assert set(oracle.number_token_ids.tolist()) == set(nv.token_ids)
    assert got.item() == pytest.approx(float(oracle(logits.double(), tg)), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", ["mse", "wasserstein"])
def test_llama3_targets_through_fused(llama3_tok, method, backend):
    """Fused CE + w * NTL == CE + w * standalone NTL on Llama-3 final_answer targets."""
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("backend='triton' needs CUDA or TRITON_INTERPRET=1")
    nv = ntl.vocab_for_tokenizer(llama3_tok)
    _, tg = _llama_batch(llama3_tok)
    V = nv.vocab_size
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*tg.shape, V, generator=g) * 2.0
    ce = torch.nn.functional.cross_entropy(logits.double().view(-1, V), tg.view(-1), ignore_index=IGN)
    alone = ntl.ntl_loss(logits, tg, nv, method=method, backend="torch")
    fused = ntl.cross_entropy_with_ntl(logits, tg, nv, ntl_weight=0.3, method=method, backend=backend)
    assert fused.item() == pytest.approx((ce + 0.3 * alone.double()).item(), rel=1e-5)
    _, ce_part, ntl_part = ntl.cross_entropy_with_ntl(logits, tg, nv, ntl_weight=0.3, method=method,
                                                      backend=backend, return_parts=True)
    assert ntl_part.item() == pytest.approx(alone.item(), rel=1e-5)
    assert ce_part.item() == pytest.approx(ce.item(), rel=1e-5)
