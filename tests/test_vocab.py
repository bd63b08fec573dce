"""NumberVocab / DigitVocab: discovery from real and synthetic tokenizers, caching, padding.

References are independent of ntl: the tokenizers' own ``get_vocab()`` /
``convert_tokens_to_ids`` and hand-written id tables.
"""


import pytest
import torch
from toy_tokenizers import DIGIT_IDS, synthetic_tokenizer  # tests/support

import ntl
from ntl.vocab import resolve_vocab


# ---------------------------------------------------------------- Qwen2.5 (real)
def test_qwen_digit_vocab_ids_and_sizes(qwen_tok):
    v = ntl.DigitVocab.from_tokenizer(qwen_tok)
    expected = [qwen_tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert expected == list(range(15, 25))
    assert list(v.token_ids) == expected
    assert v.values == tuple(float(d) for d in range(10))
    assert v.K == 10 and v.is_digit_vocab
    assert v.vocab_size == len(qwen_tok) == 151_665
    padded = ntl.DigitVocab.from_tokenizer(qwen_tok, vocab_size=151_936)
    assert padded.vocab_size == 151_936
    assert list(padded.ids()) == expected
    assert padded.values_on().dtype == torch.float32


def test_qwen_number_vocab_is_the_ten_digits(qwen_tok):
    # Qwen2.5 splits numbers into single digits, so the general form finds only '0'..'9'.
    v = ntl.NumberVocab.from_tokenizer(qwen_tok)
    assert list(v.token_ids) == list(range(15, 25))
    assert v.values == tuple(float(d) for d in range(10))


def test_padded_vocab_digit_index(qwen_tok):
    v = ntl.DigitVocab.from_tokenizer(qwen_tok, vocab_size=151_936)
    labels = torch.tensor([15, 24, 19, -100, 785, 151_935, 151_664, 0])
    k = v.digit_index(labels, 151_936)
    assert k.tolist() == [0, 9, 4, -1, -1, -1, -1, -1]


def test_digit_index_respects_value_order_not_id_order():
    tok = synthetic_tokenizer()
    v = ntl.DigitVocab.from_tokenizer(tok)
    # ids sorted by VALUE: id of '0', id of '1', ...
    assert list(v.token_ids) == [DIGIT_IDS[str(d)] for d in range(10)]
    labels = torch.tensor([[DIGIT_IDS["7"], DIGIT_IDS["0"], -100], [0, DIGIT_IDS["9"], 31]])
    assert v.digit_index(labels).tolist() == [[7, 0, -1], [-1, 9, -1]]


# ---------------------------------------------------------------- synthetic tokenizer
def test_synthetic_traps_are_not_numbers():
    tok = synthetic_tokenizer()
    v = ntl.NumberVocab.from_tokenizer(tok)
    # "007", "12" ARE ascii digit strings -> number tokens with values 7 and 12;
    # "-1", "5.0", Arabic-Indic three are not.
    gv = tok.get_vocab()
    want = {gv[str(d)]: float(d) for d in range(10)} | {gv["007"]: 7.0, gv["12"]: 12.0}
    assert dict(zip(v.token_ids, v.values, strict=True)) == want
    assert list(v.values) == sorted(v.values)
    d = ntl.DigitVocab.from_tokenizer(tok)
    assert set(d.token_ids) == set(DIGIT_IDS.values())


def test_missing_digits_raise_listing_them():
    tok = synthetic_tokenizer(drop=("3", "7"))
    with pytest.raises(ValueError, match=r"digits \['3', '7'\]"):
        ntl.DigitVocab.from_tokenizer(tok)
    # the losses resolve a tokenizer to its DigitVocab and fail the same way
    logits = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=r"'3', '7'"):
        ntl.ntl_mse_loss(logits, torch.tensor([1, 2]), tok)


def test_tokenizer_without_numbers_raises():
    class Tok:
        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="no token whose text is an ASCII digit string"):
        ntl.NumberVocab.from_tokenizer(Tok())


# ---------------------------------------------------------------- Llama-3 (real)
def test_llama3_number_vocab(llama3_tok):
    v = ntl.NumberVocab.from_tokenizer(llama3_tok)
    gv = llama3_tok.get_vocab()
    ascii_numbers = {t: i for t, i in gv.items() if t and all("0" <= c <= "9" for c in t)}
    # 1,110 ASCII digit strings: "0".."999" and zero-padded forms ("00", "007", ...).
    # (The design doc's 1,113 also counts the non-ASCII '²', '³', '¹' which str.isdigit accepts.)
    assert v.K == len(ascii_numbers) == 1110
    assert sum(1 for t in gv if t.isdigit()) == 1113
    assert v.vocab_size == len(llama3_tok) == 128_256
    table = dict(zip(v.token_ids, v.values, strict=True))
    for n in range(1000):
        assert table[gv[str(n)]] == float(n)
    assert table[gv["007"]] == 7.0 and table[gv["00"]] == 0.0
    assert list(v.values) == sorted(v.values)
    assert v.max_distance == 999.0
    assert not v.is_digit_vocab
    # DigitVocab of Llama-3 is the ten single-character digits.
    d = ntl.DigitVocab.from_tokenizer(llama3_tok)
    assert list(d.token_ids) == [gv[str(n)] for n in range(10)]


def test_llama3_multi_digit_labels_map(llama3_tok):
    v = ntl.NumberVocab.from_tokenizer(llama3_tok)
    ids = llama3_tok.encode("123 4567 007", add_special_tokens=False)
    texts = [llama3_tok.decode([i]) for i in ids]
    assert texts == ["123", " ", "456", "7", " ", "007"]
    k = v.digit_index(torch.tensor(ids))
    vals = v.values_on()[k.clamp_min(0)]
    got = [float(x) if kk >= 0 else None for x, kk in zip(vals, k, strict=True)]
    assert got == [123.0, None, 456.0, 7.0, None, 7.0]


# ---------------------------------------------------------------- caching
def count_get_vocab(tok, monkeypatch):
    """Count calls of the tokenizer's (expensive) get_vocab scan."""
    calls = []
    orig = tok.get_vocab
    monkeypatch.setattr(tok, "get_vocab", lambda: calls.append(1) or orig())
    return calls


def test_cache_returns_same_object_and_is_free(monkeypatch):
    tok = synthetic_tokenizer()
    calls = count_get_vocab(tok, monkeypatch)
    a = ntl.DigitVocab.from_tokenizer(tok)
    built = len(calls)
    assert built >= 1
    assert all(ntl.DigitVocab.from_tokenizer(tok) is a for _ in range(100))
    assert len(calls) == built  # a cache hit never rescans the vocabulary
    assert resolve_vocab(tok) is a
    # a different vocab_size or class is a different entry
    c = ntl.DigitVocab.from_tokenizer(tok, vocab_size=64)
    assert c is not a and c.vocab_size == 64
    assert ntl.DigitVocab.from_tokenizer(tok, vocab_size=64) is c
    n = ntl.NumberVocab.from_tokenizer(tok)
    assert n is not a and n.K == 12


def test_cache_on_real_tokenizer_is_free(qwen_tok, monkeypatch):
    a = ntl.DigitVocab.from_tokenizer(qwen_tok)
    calls = count_get_vocab(qwen_tok, monkeypatch)
    b = ntl.DigitVocab.from_tokenizer(qwen_tok)
    assert b is a
    assert calls == []  # building it scans 151k entries; a hit does not


def test_device_tensors_are_cached():
    v = ntl.NumberVocab([5, 3, 9], [2.0, 0.5, 1.0], vocab_size=12)
    assert v.ids() is v.ids("cpu")
    assert v.values_on() is v.values_on("cpu")
    assert v.ids().tolist() == [3, 9, 5]
    assert v.values_on().tolist() == [0.5, 1.0, 2.0]


# ---------------------------------------------------------------- explicit forms
def test_resolve_vocab_forms():
    ids = [21, 4, 30, 9, 2, 17, 13, 26, 6, 11]
    a = resolve_vocab(ids, 40)
    assert isinstance(a, ntl.DigitVocab) and a.vocab_size == 40
    assert list(a.token_ids) == ids  # values 0..9 in the order given
    assert resolve_vocab(torch.tensor(ids), 40) == a
    m = resolve_vocab({7: 1.5, 3: -2.0, 5: 10.0}, 8)
    assert list(m.token_ids) == [3, 7, 5] and m.values == (-2.0, 1.5, 10.0)
    assert resolve_vocab(m) is m


def test_number_vocab_constructor_validation():
    with pytest.raises(ValueError, match="empty"):
        ntl.NumberVocab([], [], vocab_size=4)
    with pytest.raises(ValueError, match="duplicate"):
        ntl.NumberVocab([1, 1], [0.0, 1.0], vocab_size=4)
    with pytest.raises(ValueError, match="vocab_size"):
        ntl.NumberVocab([1, 5], [0.0, 1.0], vocab_size=4)
    with pytest.raises(ValueError, match="finite"):
        ntl.NumberVocab([1, 2], [0.0, float("nan")], vocab_size=4)
    with pytest.raises(ValueError, match="exactly 10"):
        ntl.DigitVocab([1, 2, 3], vocab_size=10)
    with pytest.raises(ValueError, match="too small"):
        ntl.DigitVocab.from_tokenizer(synthetic_tokenizer(), vocab_size=20)


def test_cache_follows_tokenizer_growth():
    """ntloss (and users) call add_tokens: a grown tokenizer gets a fresh vocab, not a stale one."""
    tok = synthetic_tokenizer(drop=("3",))
    with pytest.raises(ValueError, match=r"\['3'\]"):
        ntl.DigitVocab.from_tokenizer(tok)
    assert tok.add_tokens(["3"]) == 1
    v = ntl.DigitVocab.from_tokenizer(tok)
    assert v.token_ids[3] == tok.convert_tokens_to_ids("3") == 31
    assert v.vocab_size == len(tok) == 32
    tok.add_tokens(["<extra>"])
    w = ntl.DigitVocab.from_tokenizer(tok)
    assert w is not v and w.vocab_size == 33 and w.token_ids == v.token_ids


def test_vocab_pickles_and_deep_copies_by_content():
    """A vocab (and a NumberTokenLoss holding one) survives pickle / deepcopy; the copy gets its
    own lock and device-tensor cache, and the same handle (content-keyed) in this process."""
    import copy
    import pickle

    import torch

    import ntl

    v = ntl.DigitVocab([3, 9, 12, 20, 21, 30, 33, 40, 41, 49], vocab_size=50)
    v.ids()
    c = pickle.loads(pickle.dumps(v))
    assert c == v and type(c) is type(v) and c.handle == v.handle
    assert torch.equal(c.ids(), v.ids()) and c.ids() is not v.ids()
    crit = ntl.NumberTokenLoss(v, squash_factor=3.0)
    dup = copy.deepcopy(crit)
    x, y = torch.randn(4, 50), torch.tensor([3, 9, 1, 49])
    assert torch.equal(dup(x, y), crit(x, y))
