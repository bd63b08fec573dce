"""Small offline tokenizers for the tests (word-level and character-level, built in memory).

* :func:`synthetic_tokenizer`: digits at scattered ids, not in value order, among text tokens
  that must not count as digits ("12", "007", "-1", "5.0", Arabic-Indic three).
* :func:`digit_tokenizer`: a digit-level tokenizer with ``'.'`` and ``'..'`` (number-level tests).
* :func:`word_tokenizer` / :func:`char_tokenizer`: the two builders behind them and the others.
"""

from __future__ import annotations

from collections.abc import Iterable

# synthetic_tokenizer: the digits' ids, and the text tokens placed on the free ids below 32
DIGIT_IDS = {"0": 21, "1": 4, "2": 30, "3": 9, "4": 2, "5": 17, "6": 13, "7": 26, "8": 6, "9": 11}
TEXT = ["[UNK]", "[PAD]", "the", "answer", "is", "####", ",", ".", "12", "007", "-1", "5.0",
        "\u0663", "x", "+", "=", "cat", "dog", "sum", "of", "and", "total"]  # fmt: skip

# digit_tokenizer: digits at scattered ids (not in value order), '.', '..', text
DIG = {"0": 19, "1": 3, "2": 27, "3": 8, "4": 1, "5": 14, "6": 22, "7": 11, "8": 5, "9": 25}
WORDS = ["[UNK]", "[PAD]", ".", "..", "the", "answer", "is", "####", ",", "x", "+", "=", "sum",
         "of", "and", "total", "cat", "dog", "-"]  # fmt: skip
SYN_V = 35  # digit_tokenizer has 29 entries; logits padded to 35


def word_tokenizer(vocab: dict[str, int], *, unk: str = "[UNK]", pad: str = "[PAD]",
                   whitespace_split: bool = True):
    """A word-level fast tokenizer over ``vocab`` (token -> id), split on white space
    (``whitespace_split=False``: also between word characters and punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if whitespace_split else pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad)


def bench_tokenizer(extra: Iterable[str] = ()):
    """The 40-token word-level tokenizer of the bench tests: ``<unk> <pad> w0..w17`` (0-19),
    the digits ``'0'..'9'`` at ids 20..29, ``x0..x9`` (30-39), then ``extra`` (from 40)."""
    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(18)] + [str(d) for d in range(10)]
    words += [f"x{i}" for i in range(10)] + list(extra)
    return word_tokenizer({w: i for i, w in enumerate(words)}, unk="<unk>", pad="<pad>",
                          whitespace_split=False)


def char_tokenizer(specials: Iterable[str], chars: Iterable[str], **special_tokens: str):
    """One token per character: ids 0.. for ``specials`` then ``chars`` (in the order given);
    ``special_tokens`` (``pad_token="<pad>"``, ...) go to ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def synthetic_tokenizer(drop: Iterable[str] = ()):
    """:data:`TEXT` on the free ids below 32, :data:`DIGIT_IDS` but the digits in ``drop``."""
    free = iter(i for i in range(32) if i not in DIGIT_IDS.values())
    vocab = {t: next(free) for t in TEXT}
    vocab |= {d: i for d, i in DIGIT_IDS.items() if d not in drop}
    return word_tokenizer(vocab)


def digit_tokenizer():
    """:data:`WORDS` on the free ids, :data:`DIG` (29 entries; the tests pad logits to :data:`SYN_V`)."""
    free = iter(i for i in range(64) if i not in DIG.values())
    return word_tokenizer({w: next(free) for w in WORDS} | DIG)
