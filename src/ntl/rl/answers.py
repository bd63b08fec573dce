"""Final-answer extraction and numeric equality for math responses (GSM8K style).

Rules of :func:`extract_answer` (first that applies):

1. ``####`` marker: the first number after the last ``####`` that is followed by
   a number (text between the two is allowed: ``#### The answer is 42``; a
   number is searched only up to the next ``####``, so a trailing empty
   ``####`` line does not hide the answer before it).
2. ``\\boxed{...}``: the last ``\\boxed{`` with its matching ``}``; its content
   must hold exactly one number, optionally with ``$``/``\\$``, ``%``, ``\\text{...}``
   unit words, LaTeX spacing (``\\,`` ``\\!`` ``\\;``) and a trailing ``.``. Anything
   else (``\\frac``, ``1/2``, ``x+1``, two numbers) makes the boxed answer ``None``.
3. ``flexible=True`` only: the last number anywhere in the text.

A *number* is ``[sign][$]digits`` with ASCII digits ``0-9`` only:

* thousands groups ``1,234,567`` (also with thin / narrow no-break / no-break
  spaces ``U+2009 U+202F U+00A0``; a plain space never groups: ``1 234`` is ``1``);
* an optional decimal part ``.5``; a leading-dot number ``.5`` reads ``0.5``;
  a trailing period (``18.``) is sentence punctuation, not part of the number;
* a sign ``-`` or unicode minus ``U+2212`` (also ``U+FE63``, ``U+FF0D``) directly
  before the digits (or before ``$``: ``-$5``); it is a sign only when not preceded
  by a letter, digit, ``)``, ``]`` or ``.`` (``10-5`` and ``x-5`` give ``5``).

Decimal commas, scientific notation, fractions and spelled-out numbers are not
numbers here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

__all__ = [
    "Answer",
    "answers_equal",
    "digit_agreement",
    "extract_answer",
    "find_numbers",
    "parse_ground_truth",
    "parse_number",
    "place_value_targets",
]

_MINUS = "-\u2212\ufe63\uff0d"
_GROUP_SEPS = ",\u2009\u202f\u00a0"
_NUMBER_RE = re.compile(
    r"(?:(?<![0-9A-Za-z)\].])(?P<sign>[" + _MINUS + r"])(?:\\?\$)?)?"
    r"(?P<num>"
    r"(?<![0-9])(?:[0-9]{1,3}(?:[" + _GROUP_SEPS + r"][0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"|(?<![0-9])\.[0-9]+"
    r")"
)
_MARKER = "####"
_BOXED = "\\boxed{"
_BOX_NOISE_RE = re.compile(
    r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|rm)\s*\{|\\[$%,!; ]|\\dollars?|[{}\s$%.]"
)
_BOX_REST_RE = re.compile(r"[A-Za-z\s]*")


@dataclass(frozen=True)
class Answer:
    """An extracted final answer.

    Attributes:
        text: normalised number: optional ``-``, digits without separators, optional
            ``.digits``; no ``$``, no trailing ``.``; a leading-dot ``.5`` becomes ``0.5``.
        value: exact :class:`decimal.Decimal` of ``text``.
        span: ``(start, end)`` character span in the source text, from the sign (if
            any, else the first character of the number: a digit or a leading ``.``)
            to just after the last digit. ``source[start:end]`` may contain ``$``
            (``-$5``) and group separators.
        digits_span: ``(start, end)`` from the first to just after the last digit.
        source: which rule found it: ``"####"``, ``"boxed"`` or ``"flexible"``.

    Example:
        >>> from ntl.rl.answers import extract_answer
        >>> a = extract_answer("So she pays #### -$1,234.")
        >>> a.text, a.value, a.source, a.span
        ('-1234', Decimal('-1234'), '####', (17, 24))
    """

    text: str
    value: Decimal
    span: tuple[int, int]
    digits_span: tuple[int, int]
    source: str

    @property
    def negative(self) -> bool:
        """True when the answer carries a minus sign."""
        return self.text.startswith("-")


def _make(m: re.Match[str], source: str) -> Answer:
    num = m.group("num")
    body = "".join(c for c in num if c not in _GROUP_SEPS)
    if body.startswith("."):
        body = "0" + body
    sign = "-" if m.group("sign") else ""
    text = sign + body
    start = m.start("sign") if m.group("sign") else m.start("num")
    dstart = m.start("num") + (1 if num.startswith(".") else 0)
    return Answer(text, Decimal(text), (start, m.end("num")), (dstart, m.end("num")), source)


def find_numbers(text: str, start: int = 0, end: int | None = None) -> list[Answer]:
    """Every number in ``text[start:end]`` (in order), spans relative to ``text``.

    Args:
        text: the text to scan.
        start: where the scan starts.
        end: where it stops (``None``: the end of ``text``).

    Returns:
        A list of :class:`Answer` (``source="flexible"``).

    Example:
        >>> from ntl.rl.answers import find_numbers
        >>> [a.text for a in find_numbers("3 apples, 1,200 pears and .5 kg")]
        ['3', '1200', '0.5']
    """
    end = len(text) if end is None else end
    return [_make(m, "flexible") for m in _NUMBER_RE.finditer(text, start, end)]


def _from_markers(text: str) -> Answer | None:
    positions = [m.start() for m in re.finditer(re.escape(_MARKER), text)]
    if not positions:
        return None
    bounds = [*positions[1:], len(text)]
    for pos, stop in zip(reversed(positions), reversed(bounds), strict=True):
        m = _NUMBER_RE.search(text, pos + len(_MARKER), stop)
        if m is not None:
            return _make(m, "####")
    return None


def _from_boxed(text: str) -> Answer | None:
    pos = text.rfind(_BOXED)
    if pos < 0:
        return None
    lo = pos + len(_BOXED)
    depth, i = 1, lo
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    if depth:  # unbalanced: no closing brace
        return None
    hi = i - 1
    nums = list(_NUMBER_RE.finditer(text, lo, hi))
    if len(nums) != 1:
        return None
    m = nums[0]
    rest = text[lo : m.start()] + " " + text[m.end() : hi]
    if "\\" in _BOX_NOISE_RE.sub(" ", rest) or not _BOX_REST_RE.fullmatch(_BOX_NOISE_RE.sub(" ", rest)):
        return None
    return _make(m, "boxed")


def extract_answer(text: str, *, flexible: bool = False) -> Answer | None:
    r"""The final numeric answer of a response, or ``None`` (see the module docstring).

    Args:
        text: a model response.
        flexible: fall back to the last number anywhere in the text (rule 3).

    Returns:
        The :class:`Answer`, or ``None`` when no rule applies.

    Raises:
        TypeError: ``text`` is not a str.

    Example:
        >>> from ntl.rl.answers import extract_answer
        >>> extract_answer("... #### $1,234.").text
        '1234'
        >>> extract_answer(r"so \boxed{42\%}").value
        Decimal('42')
        >>> extract_answer("it is 7") is None, extract_answer("it is 7", flexible=True).text
        (True, '7')
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ans = _from_markers(text)
    if ans is None:
        ans = _from_boxed(text)
    if ans is None and flexible:
        nums = find_numbers(text)
        ans = nums[-1] if nums else None
    return ans


def parse_number(s: str) -> Answer | None:
    """``s`` as one number, or ``None``: the stripped string must be exactly one number,
    optionally with a leading ``$`` and a trailing ``.`` or ``%`` (``"$1,234."`` -> 1234).

    Args:
        s: the string to read.

    Returns:
        The :class:`Answer` (``source="number"``), or ``None``.

    Raises:
        TypeError: ``s`` is not a str.

    Example:
        >>> from ntl.rl.answers import parse_number
        >>> parse_number("$1,234.").value, parse_number("12 apples")
        (Decimal('1234'), None)
    """
    if not isinstance(s, str):
        raise TypeError(f"expected a str, got {type(s).__name__}")
    st = s.strip()
    nums = list(_NUMBER_RE.finditer(st))
    if len(nums) != 1:
        return None
    m = nums[0]
    head, tail = st[: m.start()], st[m.end() :]
    if head not in ("", "$", "\\$") or tail not in ("", ".", "%"):
        return None
    return _make(m, "number")


def parse_ground_truth(ground_truth: str | int | float | Answer) -> Answer:
    r"""A ground truth as an :class:`Answer`.

    Accepts a number string (``"18"``, ``"1,234"``, ``"$5."``; see :func:`parse_number`),
    an ``int``/``float``, or a full reference solution whose final answer follows
    ``####`` or sits in ``\boxed{}`` (the GSM8K ``answer`` column). Raises ``ValueError``
    naming the value when none of these applies (no silent zero).

    Args:
        ground_truth: a number string, an ``int``/``float``, a reference solution, or an
            :class:`Answer` (returned as is).

    Returns:
        The :class:`Answer`.

    Raises:
        TypeError: not a str, a number or an :class:`Answer`.
        ValueError: a non-finite float, or a string with no final answer.

    Example:
        >>> from ntl.rl.answers import parse_ground_truth
        >>> parse_ground_truth("He has 3 + 4 = 7 apples.\n#### 7").text
        '7'
        >>> parse_ground_truth(2.5).text
        '2.5'
    """
    if isinstance(ground_truth, Answer):
        return ground_truth
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise TypeError(
            f"ground_truth must be a str or a number, got {type(ground_truth).__name__}"
        )
    if not isinstance(ground_truth, str):
        if ground_truth != ground_truth or ground_truth in (float("inf"), float("-inf")):
            raise ValueError(f"ground_truth must be finite, got {ground_truth!r}")
        ground_truth = format(Decimal(repr(ground_truth)), "f")
    ans = parse_number(ground_truth)
    if ans is None:
        ans = extract_answer(ground_truth)
    if ans is None:
        raise ValueError(
            f"ground_truth {ground_truth[:80]!r} is neither a number nor a solution with a "
            "final answer after '####' or in \\boxed{}"
        )
    return ans


def answers_equal(a: str | Answer, b: str | Answer, *, tol: float = 0.0) -> bool:
    """Numeric equality of two answers: ``|a - b| <= tol`` (exact by default).

    Each side is an :class:`Answer` or a string read by :func:`parse_number`
    (``"18" == "18.0" == "$18."``, ``"1,234" == "1234"``, ``"-0" == "0"``). A string that
    is not exactly one number is never equal to anything (returns ``False``).

    Args:
        a: an :class:`Answer` or a number string.
        b: an :class:`Answer` or a number string.
        tol: the absolute tolerance (``0.0``: exact).

    Returns:
        ``True`` when both are numbers within ``tol``.

    Example:
        >>> from ntl.rl.answers import answers_equal
        >>> answers_equal("18", "$18."), answers_equal("1,234", "1234.5", tol=0.5)
        (True, True)
        >>> answers_equal("x", "x")  # not numbers
        False
    """
    x, y = (v if isinstance(v, Answer) else parse_number(v) for v in (a, b))
    if x is None or y is None:
        return False
    if tol == 0.0:
        return x.value == y.value
    try:
        return abs(x.value - y.value) <= Decimal(str(tol))
    except InvalidOperation:  # pragma: no cover - Decimal of a float repr is always valid
        return False


def _parts(ans: Answer) -> tuple[str, str]:
    body = ans.text.lstrip("-")
    ip, _, fp = body.partition(".")
    return ip, fp


def place_value_targets(pred: Answer, truth: Answer, source_text: str | None = None) -> list[int]:
    """Target digit (0..9) for each digit of ``pred``, aligned by place value with ``truth``.

    Integer digits align from the units place leftwards, decimal digits from the
    tenths place rightwards. A ``pred`` digit with no counterpart in ``truth`` targets
    ``0``; ``truth`` digits with no ``pred`` counterpart are dropped; signs are ignored.
    ``pred`` digits are those written in ``source_text[pred.digits_span]`` when given
    (so a leading-dot ``.5`` has one digit), else those of ``pred.text``.

    Args:
        pred: the predicted :class:`Answer`.
        truth: the true :class:`Answer`.
        source_text: the text ``pred`` was read from (``None``: use ``pred.text``).

    Returns:
        One target digit (0..9) per digit of ``pred``.

    Raises:
        ValueError: ``truth`` is not a number.

    Example:
        >>> from ntl.rl.answers import parse_number, place_value_targets
        >>> place_value_targets(parse_number("123.45"), parse_number("23.4"))
        [0, 2, 3, 4, 0]
    """
    if source_text is not None:
        written = source_text[pred.span[0] : pred.span[1]]
        ip, _, fp = written.partition(".")
        ip = "".join(c for c in ip if "0" <= c <= "9")
        fp = "".join(c for c in fp if "0" <= c <= "9")
    else:
        ip, fp = _parts(pred)
    tip, tfp = _parts(truth)
    out = []
    for i in range(len(ip)):
        place = len(ip) - 1 - i
        out.append(int(tip[len(tip) - 1 - place]) if place < len(tip) else 0)
    for j in range(len(fp)):
        out.append(int(tfp[j]) if j < len(tfp) else 0)
    return out


def digit_agreement(pred: str | Answer | None, truth: str | Answer) -> float:
    """Text-only digit agreement in ``[0, 1]``.

    Both numbers are written on a common place-value grid: integer parts left-padded
    with ``0`` to the same length, decimal parts right-padded with ``0``. With ``P``
    grid positions (plus one sign position when either number is negative) and ``M``
    positions where the two agree, agreement = ``M / P``. ``1.0`` iff the numbers are
    equal as written on the grid (``"18"`` vs ``"18.0"``: 1.0); ``0.0`` when ``pred`` is
    ``None`` or not a number (``"5"`` vs ``"15"``: grid ``05``/``15``, 0.5).

    Args:
        pred: the predicted answer (an :class:`Answer`, a number string or ``None``).
        truth: the true answer (an :class:`Answer` or a number string).

    Returns:
        The agreement in ``[0, 1]``.

    Raises:
        ValueError: ``truth`` is not a number.

    Example:
        >>> from ntl.rl.answers import digit_agreement
        >>> digit_agreement("5", "15"), digit_agreement("18", "18.0"), digit_agreement(None, "3")
        (0.5, 1.0, 0.0)
    """
    p = pred if isinstance(pred, Answer) or pred is None else parse_number(pred)
    t = truth if isinstance(truth, Answer) else parse_number(truth)
    if t is None:
        raise ValueError(f"truth is not a number: {truth!r}")
    if p is None:
        return 0.0
    pi, pf = _parts(p)
    ti, tf = _parts(t)
    n_i, n_f = max(len(pi), len(ti)), max(len(pf), len(tf))
    a = pi.rjust(n_i, "0") + pf.ljust(n_f, "0")
    b = ti.rjust(n_i, "0") + tf.ljust(n_f, "0")
    match = sum(x == y for x, y in zip(a, b, strict=True))
    total = len(a)
    pneg, tneg = p.value < 0, t.value < 0
    if pneg or tneg:
        total += 1
        match += int(pneg == tneg)
    return match / total if total else 0.0
