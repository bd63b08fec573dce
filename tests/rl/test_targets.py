"""Digit targets for RL responses on Qwen2.5's real tokenizer (ntl.targets)."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from token_rows import IGN, pad_rows, targeted  # tests/support

import ntl
from ntl.targets import build_digit_targets, count_ascii_digits, digit_token_mask


def encode(tok, texts, pad_id=None, eos=True):
    """Right-padded ids [B, T] and mask; an <|im_end|> closes each response (inside the mask)."""
    end = [tok.convert_tokens_to_ids("<|im_end|>")] if eos else []
    return pad_rows(tok, texts, end=end, pad_id=tok.pad_token_id if pad_id is None else pad_id)


def test_qwen_digits_are_single_tokens(qwen_tok):
    # The precondition of the worked examples below: one token per digit, spaces separate.
    assert qwen_tok.encode("The answer is #### 1,234") == [
        785, 4226, 374, 26274, 220, 16, 11, 17, 18, 19
    ]


# (response, truth, expected [(token, target)] over the final answer's digits)
FINAL_ANSWER_CASES = [
    ("So 3+4=7. #### 123", "45", [("1", "0"), ("2", "4"), ("3", "5")]),  # more digits than truth
    ("We get 10 and 20.\n#### 5", "1,234", [("5", "4")]),  # fewer digits than truth
    ("#### 12.5", "2.75", [("1", "0"), ("2", "2"), ("5", "7")]),  # decimals, by place value
    ("#### 3", "3.5", [("3", "3")]),
    ("#### 0.125", "0.1", [("0", "0"), ("1", "1"), ("2", "0"), ("5", "0")]),
    ("#### -7", "7", [("7", "7")]),  # sign ignored
    ("#### \u22127", "-12", [("7", "2")]),  # unicode minus, negative truth
    ("#### $1,234.", "1240", [("1", "1"), ("2", "2"), ("3", "4"), ("4", "0")]),
    ("The answer is \\boxed{42}.", "42", [("4", "4"), ("2", "2")]),
    ("#### 18", "18", [("1", "1"), ("8", "8")]),
]


@pytest.mark.parametrize("text,truth,expected", FINAL_ANSWER_CASES)
def test_final_answer_worked_examples(qwen_tok, text, truth, expected):
    ids, mask, lens = encode(qwen_tok, [text])
    tg = build_digit_targets(ids, [truth], qwen_tok, mode="final_answer", response_mask=mask)
    assert tg.dtype == torch.long and tg.shape == ids.shape
    got = targeted(qwen_tok, ids[0], tg[0])
    assert [(a, b) for _, a, b in got] == expected
    # the answer closes the response, so its digit tokens are the last digit tokens
    n = len(expected)
    digit_pos = [t for t in range(lens[0]) if qwen_tok.decode([int(ids[0, t])]).isdigit()]
    assert [p for p, _, _ in got] == digit_pos[-n:]


def test_answer_followed_by_text_and_digits(qwen_tok):
    text = "Add 3 and 9.\n#### 12 because 3 apples and 9 pears"
    ids, mask, _ = encode(qwen_tok, [text])
    tg = build_digit_targets(ids, ["21"], qwen_tok, response_mask=mask)
    got = targeted(qwen_tok, ids[0], tg[0])
    assert [(a, b) for _, a, b in got] == [("1", "2"), ("2", "1")]
    # positions: the 3rd and 4th digit tokens of the response (after '3' and '9')
    digit_pos = [t for t in range(ids.shape[1]) if qwen_tok.decode([int(ids[0, t])]).isdigit()]
    assert [p for p, _, _ in got] == digit_pos[2:4]


def test_no_answer_gives_no_targets(qwen_tok):
    ids, mask, _ = encode(qwen_tok, ["I think it is 5 or 6"])
    tg = build_digit_targets(ids, ["5"], qwen_tok, response_mask=mask)
    assert (tg == IGN).all()
    tg = build_digit_targets(ids, ["5"], qwen_tok, response_mask=mask, flexible=True)
    assert [(a, b) for _, a, b in targeted(qwen_tok, ids[0], tg[0])] == [("6", "5")]


def test_batch_with_padding_that_looks_like_digits(qwen_tok):
    """Pad positions hold the digit token '9' but lie outside response_mask: never targeted."""
    texts = ["#### 7", "So 12 + 30 = 42\n#### 42", "nothing", "#### 1000"]
    truths = ["8", "42", "3", "999"]
    nine = qwen_tok.convert_tokens_to_ids("9")
    ids, mask, lens = encode(qwen_tok, texts, pad_id=nine)
    tg, info = build_digit_targets(
        ids, truths, qwen_tok, response_mask=mask, return_info=True
    )
    assert (tg[mask == 0] == IGN).all()
    rows = [[(a, b) for _, a, b in targeted(qwen_tok, ids[i], tg[i])] for i in range(4)]
    assert rows[0] == [("7", "8")]
    assert rows[1] == [("4", "4"), ("2", "2")]
    assert rows[2] == []
    assert rows[3] == [("1", "0"), ("0", "9"), ("0", "9"), ("0", "9")]
    assert info.preds == ["7", "42", None, "1000"]
    assert info.correct == [False, True, False, False]
    assert info.n_targets == [1, 2, 0, 4]
    assert info.excluded == []
    # vectorised batch == each row alone (no mask needed for an unpadded single row)
    for i, L in enumerate(lens):
        alone = build_digit_targets(ids[i : i + 1, :L], [truths[i]], qwen_tok)
        assert torch.equal(alone[0], tg[i, :L])


def test_without_mask_pads_are_real_tokens(qwen_tok):
    # With no response_mask every position is a real token: the default pad <|endoftext|>
    # is no digit and is skipped when decoding, so targets are unchanged.
    ids, mask, _ = encode(qwen_tok, ["#### 7", "#### 123"])
    assert torch.equal(
        build_digit_targets(ids, ["7", "5"], qwen_tok),
        build_digit_targets(ids, ["7", "5"], qwen_tok, response_mask=mask),
    )


def test_responses_given_and_mismatch_warning(qwen_tok, caplog):
    texts = ["#### 7", "#### 123"]
    ids, mask, _ = encode(qwen_tok, texts, eos=False)
    vocab = ntl.DigitVocab.from_tokenizer(qwen_tok)
    ref = build_digit_targets(ids, ["8", "5"], qwen_tok, response_mask=mask)
    # a vocab in the tokenizer slot plus the texts: no decoding needed
    same = build_digit_targets(ids, ["8", "5"], vocab, response_mask=mask, responses=texts)
    assert torch.equal(ref, same)
    with caplog.at_level(logging.WARNING, logger="ntl"):
        tg, info = build_digit_targets(
            ids, ["8", "5"], vocab, response_mask=mask,
            responses=["#### 7", "1 more digit #### 123"], return_info=True,
        )
    assert info.excluded == [1]
    assert (tg[1] == IGN).all() and torch.equal(tg[0], ref[0])
    assert "excluded" in caplog.text


def test_all_mode(qwen_tok):
    texts = ["3+4=7 so #### 7", "3+4=8 so #### 8", "#### 1,000"]
    truths = ["7.0", "7", "1000"]
    ids, mask, _ = encode(qwen_tok, texts)
    tg = build_digit_targets(ids, truths, qwen_tok, mode="all", response_mask=mask)
    # correct responses: every digit token targets itself; wrong response: nothing
    assert [(a, b) for _, a, b in targeted(qwen_tok, ids[0], tg[0])] == [
        ("3", "3"), ("4", "4"), ("7", "7"), ("7", "7")
    ]
    assert (tg[1] == IGN).all()
    assert [a for _, a, _ in targeted(qwen_tok, ids[2], tg[2])] == ["1", "0", "0", "0"]
    sel = tg != IGN
    assert torch.equal(tg[sel], ids[sel])


def test_custom_ignore_index(qwen_tok):
    ids, mask, _ = encode(qwen_tok, ["#### 12"])
    tg = build_digit_targets(ids, ["13"], qwen_tok, response_mask=mask, ignore_index=-1)
    assert set(tg[0].tolist()) == {-1, qwen_tok.convert_tokens_to_ids("1"), qwen_tok.convert_tokens_to_ids("3")}


def test_llama3_final_answer_and_all_mode(llama3_tok, caplog):
    """Issue 25: final_answer used to be refused for Llama-3; it now targets whole number
    tokens (more cases in test_targets_multidigit.py). A DigitVocab passed explicitly with
    Llama-3 cannot match the text's digits: the row is excluded with a warning."""
    ids = torch.tensor([llama3_tok.encode("#### 1234", add_special_tokens=False)])
    nv = ntl.NumberVocab.from_tokenizer(llama3_tok)

    def pairs(tg):
        return [(llama3_tok.decode([int(i)]), llama3_tok.decode([int(g)]))
                for i, g in zip(ids[0], tg[0], strict=True) if g != IGN]

    assert pairs(build_digit_targets(ids, ["1299"], llama3_tok, mode="final_answer")) == [
        ("123", "129"), ("4", "9")]
    assert pairs(build_digit_targets(ids, ["1299"], llama3_tok, mode="final_answer", vocab=nv)) == [
        ("123", "129"), ("4", "9")]
    with caplog.at_level(logging.WARNING, logger="ntl"):
        tg, info = build_digit_targets(ids, ["1234"], llama3_tok, vocab=ntl.DigitVocab.from_tokenizer(llama3_tok),
                                       return_info=True)
    assert info.excluded == [0] and (tg == IGN).all() and "excluded" in caplog.text
    tg = build_digit_targets(ids, ["1234"], llama3_tok, mode="all", vocab=nv)
    toks = [llama3_tok.decode([int(i)]) for i, g in zip(ids[0], tg[0], strict=True) if g != IGN]
    assert toks == ["123", "4"]
    assert torch.equal(tg, build_digit_targets(ids, ["1234"], llama3_tok, mode="all"))


def test_bad_inputs(qwen_tok):
    ids, mask, _ = encode(qwen_tok, ["#### 1", "#### 2"])
    with pytest.raises(ValueError, match="mode"):
        build_digit_targets(ids, ["1", "2"], qwen_tok, mode="digits")
    with pytest.raises(ValueError, match="ground_truths has 1"):
        build_digit_targets(ids, ["1"], qwen_tok)
    with pytest.raises(ValueError, match="response_mask shape"):
        build_digit_targets(ids, ["1", "2"], qwen_tok, response_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="tokenizer"):
        build_digit_targets(ids, ["1", "2"])
    with pytest.raises(ValueError, match=r"ground_truths\[1\]"):
        build_digit_targets(ids, ["1", "two"], qwen_tok)
    with pytest.raises(TypeError, match="response_ids"):
        build_digit_targets(ids.float(), ["1", "2"], qwen_tok)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        build_digit_targets(ids[0], ["1"], qwen_tok)
    with pytest.raises(ValueError, match="responses has 1"):
        build_digit_targets(ids, ["1", "2"], qwen_tok, responses=["#### 1"])


def test_empty_batch(qwen_tok):
    ids = torch.zeros((0, 5), dtype=torch.long)
    assert build_digit_targets(ids, [], qwen_tok).shape == (0, 5)


def test_helpers(qwen_tok):
    vocab = ntl.DigitVocab.from_tokenizer(qwen_tok)
    ids = torch.tensor([[15, 16, 220, 24, 25]])  # '0' '1' ' ' '9' ':'-ish (25 is no digit)
    assert digit_token_mask(ids, vocab).tolist() == [[True, True, False, True, False]]
    assert digit_token_mask(ids, vocab, torch.tensor([[1, 0, 1, 1, 1]])).tolist() == [
        [True, False, False, True, False]
    ]
    assert count_ascii_digits("a1b22\u0663") == 3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pred=st.integers(0, 10**7),
    truth=st.integers(-(10**7), 10**7),
    noise=st.integers(0, 999),
)
def test_property_integer_place_value(qwen_tok, pred, truth, noise):
    text = f"First {noise} then {noise + 1}.\n#### {pred:,}"
    ids, mask, _ = encode(qwen_tok, [text])
    tg = build_digit_targets(ids, [str(truth)], qwen_tok, response_mask=mask)
    got = [(a, b) for _, a, b in targeted(qwen_tok, ids[0], tg[0])]
    p = str(pred)
    t = str(abs(truth)).zfill(len(p))[-len(p):]  # right-aligned, zero-filled on the left
    assert got == list(zip(p, t, strict=True))
