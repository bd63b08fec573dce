"""Final-answer extraction and numeric equality (ntl.answers)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import gsm8k_file

from ntl.answers import (
    Answer,
    answers_equal,
    digit_agreement,
    extract_answer,
    parse_ground_truth,
    parse_number,
    place_value_targets,
)

# (text, flexible, expected normalised text or None, substring covered by .span, span start or
# None for text.rfind(substring))
TRICKY = [
    ("#### $1,234.", False, "1234", "1,234", 6),
    ("#### -5", False, "-5", "-5", 5),
    ("#### 3\n#### 4", False, "4", "4", 12),
    ("#### 3\n#### 4", True, "4", "4", 12),
    ("\\boxed{12}", False, "12", "12", 7),
    ("I do not know.", False, None, None, None),
    ("I do not know.", True, None, None, None),
    ("#### 42 apples, 7 pears", False, "42", "42", 5),
    ("#### \u22127", False, "-7", "\u22127", 5),
    ("#### 3.50", False, "3.50", "3.50", 5),
    ("#### 18.", False, "18", "18", 5),
    ("####18", False, "18", "18", 4),
    ("#### 1,000,000", False, "1000000", "1,000,000", 5),
    ("#### .5", False, "0.5", ".5", 5),
    ("So \\boxed{\\frac{1}{2}}", False, None, None, None),
    ("So \\boxed{\\frac{1}{2}}", True, "2", "2", None),
    ("#### 5\n####", False, "5", "5", 5),
    ("#### 5\n#### no idea", False, "5", "5", 5),
    ("#### $ 7", False, "7", "7", 7),
    ("#### -$5", False, "-5", "-$5", 5),
    ("#### $-5", False, "-5", "-5", 6),
    ("Step 1: 2+3=5.\n#### 5 is it", False, "5", "5", 20),
    ("10-5 = 5", False, None, None, None),
    ("10-5 = 5", True, "5", "5", 7),
    ("so x = -5.", True, "-5", "-5", 7),
    ("The total is 12 and then 15", True, "15", "15", 25),
    ("\\boxed{\\$1,234.50}", False, "1234.50", "1,234.50", 9),
    ("\\boxed{12 \\text{ apples}}", False, "12", "12", 7),
    ("\\boxed{x = 5}", False, None, None, None),
    ("\\boxed{3} then \\boxed{4}", False, "4", "4", 22),
    ("\\boxed{1/2}", False, None, None, None),
    ("\\boxed{2^{10}}", False, None, None, None),
    ("#### 7 or \\boxed{9}", False, "7", "7", 5),
    ("\\boxed{-0.25}", False, "-0.25", "-0.25", 7),
    ("#### 1 234", False, "1", "1", 5),
    ("#### 1\u202f234", False, "1234", "1\u202f234", 5),
    ("#### 12,34", False, "12", "12", 5),
    ("Rate 5%\n#### 50%", False, "50", "50", 13),
    ("#### (\u22123)", False, "-3", "\u22123", 6),
    ("in 2019, 300 people", True, "300", "300", 9),
    ("#### COVID-19", False, "19", "19", 11),
    ("#### 0.00", False, "0.00", "0.00", 5),
    ("\\boxed{12", False, None, None, None),
    ("#### \u0661\u0662", False, None, None, None),
    ("####\n\n  42\n", False, "42", "42", 8),
    ("#### 007", False, "007", "007", 5),
    ("the answer is 42.", True, "42", "42", 14),
    ("\\boxed{50\\%}", False, "50", "50", 7),
    ("#### -1,234.5 dollars", False, "-1234.5", "-1,234.5", 5),
    ("#### 3-4", False, "3", "3", 5),
    ("#### x-4", False, "4", "4", 7),
]


def test_table_is_big_enough():
    assert len(TRICKY) >= 30


@pytest.mark.parametrize("text,flexible,expected,sub,start", TRICKY)
def test_tricky_extractions(text, flexible, expected, sub, start):
    ans = extract_answer(text, flexible=flexible)
    if expected is None:
        assert ans is None
        return
    assert ans is not None
    assert ans.text == expected
    assert ans.value == Decimal(expected)
    s0 = text.rfind(sub) if start is None else start
    assert ans.span == (s0, s0 + len(sub))
    assert text[ans.span[0] : ans.span[1]] == sub
    d0, d1 = ans.digits_span
    assert text[d0].isdigit() and text[d1 - 1].isdigit()
    assert ans.span[0] <= d0 < d1 == ans.span[1]


def test_sources():
    assert extract_answer("#### 5").source == "####"
    assert extract_answer("\\boxed{5}").source == "boxed"
    assert extract_answer("it is 5", flexible=True).source == "flexible"
    assert extract_answer("it is 5") is None
    assert extract_answer("#### -5").negative and not extract_answer("#### 5").negative


def test_extract_type_error():
    with pytest.raises(TypeError, match="text"):
        extract_answer(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "a,b,eq",
    [
        ("18", "18.0", True),
        ("18", "18.00", True),
        ("1,234", "1234", True),
        ("$18.", "18", True),
        ("-0", "0", True),
        ("0.1", "0.10", True),
        ("\u22125", "-5", True),
        ("18", "-18", False),
        ("3.33", "3.333", False),
        ("abc", "abc", False),
        ("1e3", "1000", False),
        ("18 apples", "18", False),
        ("", "", False),
    ],
)
def test_answers_equal(a, b, eq):
    assert answers_equal(a, b) is eq
    assert answers_equal(b, a) is eq


def test_answers_equal_tol_and_answer_objects():
    assert answers_equal("3.33", "3.333", tol=0.01)
    assert not answers_equal("3.33", "3.35", tol=0.01)
    assert answers_equal(extract_answer("#### 1,234"), "1234.0")


def test_parse_number_strict():
    assert parse_number(" $1,234. ").text == "1234"
    assert parse_number("50%").text == "50"
    assert parse_number("the 5") is None
    assert parse_number("5 6") is None
    assert parse_number("") is None


def test_parse_ground_truth():
    assert parse_ground_truth("18").text == "18"
    assert parse_ground_truth(18).text == "18"
    assert parse_ground_truth(2.5).text == "2.5"
    assert parse_ground_truth(1e-7).text == "0.0000001"
    assert parse_ground_truth("She pays 5+5.\n#### 1,000").text == "1000"
    with pytest.raises(ValueError, match="neither a number"):
        parse_ground_truth("seven")
    with pytest.raises(TypeError):
        parse_ground_truth(True)
    with pytest.raises(ValueError, match="finite"):
        parse_ground_truth(float("nan"))


@pytest.mark.parametrize(
    "pred,truth,expected",
    [
        ("123.45", "23.4", [0, 2, 3, 4, 0]),  # hundreds/hundredths: no counterpart -> 0
        ("5", "1234", [4]),  # truth digits without a generated counterpart are dropped
        ("1234", "5", [0, 0, 0, 5]),
        ("-7", "7", [7]),  # sign ignored
        ("7", "-12", [2]),
        ("0.125", "0.1", [0, 1, 0, 0]),
        ("12.5", "2.75", [0, 2, 7]),
        ("007", "7", [0, 0, 7]),
    ],
)
def test_place_value_targets(pred, truth, expected):
    assert place_value_targets(parse_number(pred), parse_number(truth)) == expected


def test_place_value_targets_leading_dot_uses_written_digits():
    text = "#### .5"
    ans = extract_answer(text)
    assert place_value_targets(ans, parse_number("0.25"), text) == [2]  # one written digit
    assert place_value_targets(ans, parse_number("0.25")) == [0, 2]  # "0.5" has two


@pytest.mark.parametrize(
    "pred,truth,expected",
    [
        ("5", "15", 0.5),
        ("18", "18.0", 1.0),
        ("17", "18", 0.5),
        ("123", "23", 2 / 3),
        ("-5", "5", 0.5),
        ("-5", "-5", 1.0),
        ("1.5", "1.25", 1 / 3),  # grid 150 / 125
        (None, "5", 0.0),
        ("90", "9", 0.0),
    ],
)
def test_digit_agreement(pred, truth, expected):
    assert digit_agreement(pred, truth) == pytest.approx(expected)


# --------------------------------------------------------------------------- GSM8K
def _gsm8k(split):
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(gsm8k_file(split))
    sols = [e["answer"] for e in df["extra_info"]]
    gts = [r["ground_truth"] for r in df["reward_model"]]
    return sols, gts


@pytest.mark.parametrize("split,n", [("train", 7473), ("test", 1319)])
def test_gsm8k_reference_solutions(split, n):
    sols, gts = _gsm8k(split)
    assert len(sols) == n
    bad = []
    for i, (s, g) in enumerate(zip(sols, gts, strict=True)):
        ans = extract_answer(s)
        if ans is None or ans.text != g or not answers_equal(ans, g):
            bad.append((i, s[-40:], g))
    assert not bad, bad[:5]


# --------------------------------------------------------------------------- properties
def _fmt(n: int, group: bool) -> str:
    return f"{n:,}" if group else str(n)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(-10**9, 10**9),
    frac=st.one_of(st.none(), st.text("0123456789", min_size=1, max_size=4)),
    group=st.booleans(),
    dollar=st.booleans(),
    period=st.booleans(),
    prefix=st.text(st.characters(blacklist_characters="#"), max_size=30),
)
def test_roundtrip_property(n, frac, group, dollar, period, prefix):
    body = _fmt(abs(n), group) + (f".{frac}" if frac is not None else "")
    sign = "-" if n < 0 else ""
    written = sign + ("$" if dollar else "") + body
    text = prefix + "\n#### " + written + ("." if period else "") + " end"
    ans = extract_answer(text)
    expected = Decimal(sign + str(abs(n)) + (f".{frac}" if frac is not None else ""))
    assert ans is not None
    assert ans.value == expected
    # the span starts at the sign (then it covers "-$"), else at the first digit
    assert text[ans.span[0] : ans.span[1]] == (written if sign else body)
    assert "," not in ans.text and "$" not in ans.text and not ans.text.endswith(".")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.booleans())
def test_arbitrary_text_never_crashes(text, flexible):
    ans = extract_answer(text, flexible=flexible)
    if ans is not None:
        assert isinstance(ans, Answer)
        assert Decimal(ans.text) == ans.value
        seg = text[ans.digits_span[0] : ans.digits_span[1]]
        assert seg[0] in "0123456789" and seg[-1] in "0123456789"
