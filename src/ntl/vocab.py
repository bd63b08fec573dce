"""Number-token vocabularies: which token ids are numbers, and their values.

A :class:`NumberVocab` holds the ``K`` number tokens of a tokenizer, sorted by
value (ties broken by id). :class:`DigitVocab` is the ``K = 10`` case of the
single-character ASCII digits ``'0'..'9'`` with values ``0..9``, which is what
the NTL paper uses with digit-level tokenizers (Qwen2.5, Llama-2, ...).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from ._docs import shared_docs

__all__ = [
    "DigitVocab",
    "NumberVocab",
    "VocabLike",
    "resolve_vocab",
    "vocab_for_tokenizer",
    "vocab_from_handle",
]

DIGITS = "0123456789"
logger: logging.Logger = logging.getLogger("ntl")


class NumberVocab:
    """The number tokens of a vocabulary: ids sorted by value, and the values.

    Args:
        token_ids: ids of the number tokens.
        values: the numeric value of each token (same length as ``token_ids``).
        vocab_size: the model's vocabulary size ``V`` (number of logits). Logits
            passed to a loss may be wider (padded vocabularies), never narrower.
        texts: optional token text of each number token (ASCII digit strings, e.g.
            Llama-3's ``'123'``, ``'07'``); :meth:`from_tokenizer` records them. A token's
            *width* is the number of digits it writes (``len(text)``), which place-aligned
            RL targets (:func:`ntl.rl.targets.build_digit_targets`) and
            :func:`ntl.number_level_loss` need for multi-digit tokens.

    Tensors for a device are built once and cached (:meth:`ids`, :meth:`values_on`,
    :meth:`lookup`).

    Raises:
        ValueError: empty, duplicate or out-of-range ids, lengths that differ, values that
            are not finite, texts that do not write their values.

    Example:
        >>> import ntl
        >>> v = ntl.NumberVocab([7, 5, 6], [10.0, 0.0, 5.0], vocab_size=8)
        >>> v.token_ids, v.values, v.K
        ((5, 6, 7), (0.0, 5.0, 10.0), 3)
    """

    def __init__(
        self, token_ids: Sequence[int], values: Sequence[float], vocab_size: int, *,
        texts: Sequence[str] | None = None,
    ) -> None:
        ids = [int(i) for i in token_ids]
        vals = [float(v) for v in values]
        txt = None if texts is None else [str(t) for t in texts]
        if len(ids) == 0:
            raise ValueError("NumberVocab: token_ids is empty; a vocabulary needs at least one number token")
        if len(ids) != len(vals):
            raise ValueError(
                f"NumberVocab: token_ids has {len(ids)} entries but values has {len(vals)}"
            )
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"NumberVocab: duplicate token ids {dup}")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
            raise ValueError(f"NumberVocab: vocab_size must be a positive int, got {vocab_size!r}")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(
                f"NumberVocab: token ids must lie in [0, vocab_size={vocab_size}), "
                f"got min {min(ids)} and max {max(ids)}"
            )
        if any(v != v or v in (float("inf"), float("-inf")) for v in vals):
            raise ValueError("NumberVocab: values must be finite")
        if txt is not None:
            if len(txt) != len(ids):
                raise ValueError(f"NumberVocab: token_ids has {len(ids)} entries but texts has {len(txt)}")
            bad = [t for t, v in zip(txt, vals, strict=True)
                   if not (t.isascii() and t.isdigit()) or float(int(t)) != v]
            if bad:
                raise ValueError(
                    f"NumberVocab: texts must be ASCII digit strings whose int() is the token's value; "
                    f"got {bad[:4]}")
            if len(set(txt)) != len(txt):
                raise ValueError("NumberVocab: duplicate texts")
        order = sorted(range(len(ids)), key=lambda k: (vals[k], ids[k]))
        self.token_ids: tuple[int, ...] = tuple(ids[k] for k in order)
        self.values: tuple[float, ...] = tuple(vals[k] for k in order)
        self.texts: tuple[str, ...] | None = None if txt is None else tuple(txt[k] for k in order)
        self.vocab_size: int = vocab_size
        self._cache: dict[tuple[str, torch.device, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- basic properties -------------------------------------------------
    @property
    def K(self) -> int:
        """Number of number tokens."""
        return len(self.token_ids)

    def __len__(self) -> int:
        return self.K

    @property
    def is_digit_vocab(self) -> bool:
        """True when the values are exactly 0..9 (unit gaps)."""
        return self.values == tuple(float(d) for d in range(10))

    @property
    def widths(self) -> tuple[int, ...] | None:
        """Digits written by each number token (``len(text)``), in vocab order; ``None``
        when the vocab was built without :attr:`texts`."""
        return None if self.texts is None else tuple(len(t) for t in self.texts)

    @property
    def max_width(self) -> int:
        """The widest number token's digit count (1 for a digit-level vocab; ``ValueError``
        without :attr:`texts`)."""
        w = self.widths
        if w is None:
            raise ValueError(
                f"{self!r} was built without token texts, so its tokens' digit widths are unknown; "
                "build it with NumberVocab.from_tokenizer(tok) or pass texts=")
        return max(w)

    @property
    def is_multi_digit(self) -> bool:
        """True when some number token writes more than one digit (Llama-3's ``'123'``)."""
        w = self.widths
        return w is not None and max(w) > 1

    def id_of_text(self, text: str) -> int | None:
        """Token id whose text is exactly ``text`` (e.g. ``'07'``), ``None`` if there is none."""
        if self.texts is None:
            return None
        m = self.__dict__.get("_by_text")
        if m is None:
            m = dict(zip(self.texts, self.token_ids, strict=True))
            self._by_text = m
        return m.get(text)

    def widths_on(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[K]`` int64 digit widths (vocab order) on ``device``; ``ValueError`` without texts."""
        self.max_width  # noqa: B018 - raises without texts
        return self._cached("widths", device)

    @property
    def max_distance(self) -> float:
        """Largest |v_i - v_j| between two number tokens."""
        return self.values[-1] - self.values[0]

    def __repr__(self) -> str:
        head = ", ".join(f"{i}:{v:g}" for i, v in zip(self.token_ids[:4], self.values[:4], strict=True))
        more = ", ..." if self.K > 4 else ""
        return f"{type(self).__name__}(K={self.K}, vocab_size={self.vocab_size}, {{{head}{more}}})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NumberVocab):
            return NotImplemented
        return (self.token_ids, self.values, self.vocab_size, self.texts) == (
            other.token_ids,
            other.values,
            other.vocab_size,
            other.texts,
        )

    def __hash__(self) -> int:
        return hash((self.token_ids, self.values, self.vocab_size, self.texts))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle / deepcopy the content only (not the lock, the device tensors or the handle)."""
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_cache", "_lock", "_handle", "_specs", "_by_text")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("texts", None)
        self.__dict__.update(state)
        self._cache = {}
        self._lock = threading.Lock()

    # -- cached device tensors ---------------------------------------------
    def _cached(self, kind: str, device: torch.device | str | None, width: int = 0) -> torch.Tensor:
        dev = torch.device(device if device is not None else "cpu")
        key = (kind, dev, width)
        t = self._cache.get(key)
        if t is None:
            with self._lock:
                t = self._cache.get(key)
                if t is None:
                    if kind == "ids":
                        t = torch.tensor(self.token_ids, dtype=torch.long, device=dev)
                    elif kind == "values":
                        t = torch.tensor(self.values, dtype=torch.float32, device=dev)
                    elif kind == "widths":
                        t = torch.tensor([len(x) for x in self.texts or ()], dtype=torch.long, device=dev)
                    elif kind == "arange":
                        t = torch.arange(self.K, device=dev)
                    elif kind == "table":  # [0..K-1, -1]: k -> k, and index -1 -> -1
                        t = torch.cat([torch.arange(self.K), torch.tensor([-1])]).to(dev)
                    else:  # lookup: token id -> index k, -1 for non-number tokens (table: + a final -1)
                        extra = 1 if kind == "lookup_table" else 0
                        t = torch.full((width + extra,), -1, dtype=torch.long)
                        t[torch.tensor(self.token_ids)] = torch.arange(self.K)
                        t = t.to(dev)
                    self._cache[key] = t
        return t

    def ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[K]`` int64 token ids (sorted by value) on ``device``."""
        return self._cached("ids", device)

    def values_on(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[K]`` float32 values (ascending) on ``device``."""
        return self._cached("values", device)

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[K]`` int64 ``0..K-1`` on ``device`` (the columns of gathered number logits)."""
        return self._cached("arange", device)

    def index_table(self, width: int | None, device: torch.device | str | None = None) -> torch.Tensor:
        """``[width + 1]`` int64: :meth:`lookup` plus a final ``-1``, so that
        ``table[labels.clamp(-1, width)]`` maps every label (negative, ``>= width``) in one
        gather. ``width=None``: labels are number indices already (``[0..K-1, -1]``)."""
        if width is None:
            return self._cached("table", device)
        self._check_width(width)
        return self._cached("lookup_table", device, width)

    def _check_width(self, width: int) -> None:
        if width < self.vocab_size and max(self.token_ids) >= width:
            raise ValueError(f"lookup width {width} is smaller than the largest number token id")

    @property
    def handle(self) -> int:
        """A small int naming this vocab's content (equal vocabs share it), for custom ops:
        :func:`vocab_from_handle` turns it back into a vocab whose tensors are cached."""
        h = self.__dict__.get("_handle")
        if h is None or (_BY_HANDLE.get(h) is not self and _BY_HANDLE.get(h) != self):
            with _CACHE_LOCK:
                h = _HANDLES.setdefault(self, len(_HANDLES))
                _BY_HANDLE.setdefault(h, self)
            self._handle = h
        return h

    def lookup(self, width: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[width]`` int64 map from token id to number index ``k`` (``-1`` if not a number)."""
        self._check_width(width)
        return self._cached("lookup", device, width)

    def digit_index(self, labels: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Map token-id labels to number indices ``k`` (``-1`` for everything else).

        Labels outside ``[0, width)`` (e.g. ``ignore_index``) map to ``-1``. No host sync.
        """
        width = self.vocab_size if width is None else width
        lut = self.lookup(width, labels.device)
        inside = (labels >= 0) & (labels < width)
        k = lut[labels.clamp(0, width - 1)]
        return torch.where(inside, k, torch.full_like(k, -1))

    # -- constructors -------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> NumberVocab:
        """Every token whose text is an ASCII digit string, with value ``int(text)``.

        Llama-3 has "0".."999" (and some zero-padded forms) as single tokens; a
        digit-level tokenizer gives exactly the ten digits. Cached per tokenizer.
        """
        return _from_tokenizer_cached(cls, tokenizer, vocab_size)

    @classmethod
    def _build(cls, tokenizer: Any, vocab_size: int | None) -> NumberVocab:
        vocab = _get_vocab(tokenizer)
        pairs = [(i, float(int(t)), t) for t, i in vocab.items() if t.isascii() and t.isdigit()]
        if not pairs:
            raise ValueError(
                f"{type(tokenizer).__name__} has no token whose text is an ASCII digit string"
            )
        ids, vals, texts = zip(*pairs, strict=True)
        return cls(ids, vals, _vocab_size(tokenizer, vocab_size, max(ids)), texts=texts)


class DigitVocab(NumberVocab):
    """The ten single-character ASCII digit tokens ``'0'..'9'`` with values ``0..9``.

    Build it from a tokenizer with :meth:`DigitVocab.from_tokenizer` (or pass the tokenizer
    itself to a loss).

    Args:
        token_ids: the ids of ``'0'..'9'``, in that order.
        vocab_size: the model's vocabulary size ``V`` (number of logits).

    Raises:
        ValueError: not exactly ten ids, or ids as :class:`NumberVocab` refuses them.

    Example:
        >>> import ntl
        >>> v = ntl.DigitVocab([20, 21, 22, 23, 24, 25, 26, 27, 28, 29], vocab_size=40)
        >>> v.K, v.is_digit_vocab, v.token_ids[3]
        (10, True, 23)
    """

    def __init__(self, token_ids: Sequence[int], vocab_size: int) -> None:
        ids = [int(i) for i in token_ids]
        if len(ids) != 10:
            raise ValueError(
                f"DigitVocab needs exactly 10 token ids (for '0'..'9' in order), got {len(ids)}"
            )
        super().__init__(ids, range(10), vocab_size, texts=DIGITS)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> DigitVocab:
        """The ten single-token digits ``'0'..'9'`` of ``tokenizer`` (``ValueError`` listing
        the missing ones; multi-digit tokens such as Llama-3's are left out, with a warning: use
        :class:`NumberVocab` for those). ``vocab_size``: the model's (padded) vocabulary size,
        default the tokenizer's. Cached per tokenizer."""
        return _from_tokenizer_cached(cls, tokenizer, vocab_size)  # type: ignore[return-value]

    @classmethod
    def _build(cls, tokenizer: Any, vocab_size: int | None) -> DigitVocab:
        vocab = _get_vocab(tokenizer)
        missing = [d for d in DIGITS if d not in vocab]
        if missing:
            raise ValueError(
                f"{type(tokenizer).__name__} has no single token for the digits {missing}; "
                "NTL needs each digit '0'..'9' to be one token"
            )
        ids = [vocab[d] for d in DIGITS]
        multi = sum(1 for t in vocab if len(t) > 1 and t.isascii() and t.isdigit())
        if multi:
            logger.warning(
                "%s also has %d multi-digit number tokens (e.g. Llama-3's '123'); the DigitVocab "
                "covers only '0'..'9', so those positions take no part. Use "
                "ntl.NumberVocab.from_tokenizer(tok) to include them.", type(tokenizer).__name__, multi)
        return cls(ids, _vocab_size(tokenizer, vocab_size, max(ids)))


VocabLike = Union[NumberVocab, Sequence[int], Mapping[int, float], torch.Tensor, Any]  # noqa: UP007


def _get_vocab(tokenizer: Any) -> dict[str, int]:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(
            "vocab_or_tokenizer must be a Hugging Face tokenizer (with get_vocab()), a "
            f"NumberVocab/DigitVocab, a list of 10 digit ids or an {{id: value}} dict; got {type(tokenizer).__name__}"
        )
    return dict(get_vocab())


def _vocab_size(tokenizer: Any, vocab_size: int | None, max_id: int) -> int:
    if vocab_size is None:
        try:
            vocab_size = len(tokenizer)
        except TypeError:
            vocab_size = int(getattr(tokenizer, "vocab_size", max_id + 1))
    if vocab_size <= max_id:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the tokenizer's number token id {max_id} needs "
            f"vocab_size > {max_id}"
        )
    return int(vocab_size)


# Per-tokenizer cache: tokenizer object -> {(class, vocab_size, len(tokenizer)): vocab}.
_TOKENIZER_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, NumberVocab]] = weakref.WeakKeyDictionary()
_ID_CACHE: dict[int, tuple[Any, dict[tuple, NumberVocab]]] = {}
_CACHE_LOCK = threading.Lock()


def _from_tokenizer_cached(cls: type[NumberVocab], tokenizer: Any, vocab_size: int | None) -> NumberVocab:
    try:
        n = len(tokenizer)
    except TypeError:
        n = -1
    key = (cls, vocab_size, n)
    with _CACHE_LOCK:
        try:
            per = _TOKENIZER_CACHE.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable / unhashable: key by identity, keep it alive
            per = _ID_CACHE.setdefault(id(tokenizer), (tokenizer, {}))[1]
        hit = per.get(key)
    if hit is not None:
        return hit
    built = cls._build(tokenizer, vocab_size)
    with _CACHE_LOCK:
        per[key] = built
    return built


@shared_docs
def resolve_vocab(vocab_or_tokenizer: VocabLike, vocab_size: int | None = None, *,
                  default_size: int | None = None) -> NumberVocab:
    """Turn what the losses accept into a :class:`NumberVocab`.

    Accepts a ``NumberVocab``/``DigitVocab`` (returned as is), a Hugging Face
    tokenizer (its :class:`DigitVocab`, cached), a sequence/tensor of 10 digit ids
    for ``'0'..'9'`` in order, or a mapping ``{token_id: value}``.

    Args:
        {vocab_or_tokenizer}
        vocab_size: the model's vocabulary size when known (default: the tokenizer's
            length).
        default_size: sizes id lists and dicts when ``vocab_size`` is not given (the
            logits' width).

    Returns:
        The :class:`NumberVocab` (cached for tokenizers, id lists and dicts).

    Raises:
        TypeError: anything else (a string, a number, ``None``, a float tensor).
        ValueError: an empty list or dict, ids as :class:`NumberVocab` refuses them.

    Example:
        >>> import ntl
        >>> v = ntl.resolve_vocab({3: 100.0, 4: 20.0}, default_size=8)
        >>> v.token_ids, v.values, v.vocab_size
        ((4, 3), (20.0, 100.0), 8)
    """
    if vocab_size is None and not hasattr(vocab_or_tokenizer, "get_vocab"):
        vocab_size = default_size
    v = vocab_or_tokenizer
    if isinstance(v, NumberVocab):
        return v
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype == torch.bool or v.dim() != 1:
            raise TypeError(
                f"digit ids must be a 1-D integer tensor, got dtype {v.dtype} and shape {tuple(v.shape)}"
            )
        v = v.tolist()
    if isinstance(v, Mapping):
        if not v:
            raise ValueError("vocab_or_tokenizer: the {id: value} mapping is empty")
        ids = list(v.keys())
        size = vocab_size if vocab_size is not None else max(ids) + 1
        return _cached_simple(("map", tuple(v.items()), size), lambda: NumberVocab(ids, list(v.values()), size))
    if isinstance(v, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise TypeError("vocab_or_tokenizer: a list of digit ids must hold ints")
        if len(v) == 0:
            raise ValueError("vocab_or_tokenizer: the list of digit ids is empty")
        size = vocab_size if vocab_size is not None else max(v) + 1
        return _cached_simple(("ids", tuple(v), size), lambda: DigitVocab(v, size))
    if isinstance(v, (str, bytes, int, float)) or v is None:
        raise TypeError(
            "vocab_or_tokenizer must be a tokenizer, a NumberVocab/DigitVocab, a list of 10 digit "
            f"ids or an {{id: value}} dict; got {type(v).__name__}"
        )
    return DigitVocab.from_tokenizer(v, vocab_size)


@shared_docs
def vocab_for_tokenizer(tokenizer: Any, vocab_size: int | None = None) -> NumberVocab:
    """The model's whole number vocabulary: what RL targets and the adapters use.

    A digit-level tokenizer (Qwen2.5, Llama-2, Mistral: each of ``'0'..'9'`` one token and
    no wider number token) gives its :class:`DigitVocab` (``K = 10``); a tokenizer with
    multi-digit number tokens (Llama-3: ``'0'..'999'``, ``K = 1,110``) gives the
    :class:`NumberVocab` of all of them, with their texts (widths). ``ValueError`` when the
    tokenizer has no ASCII digit-string token at all. A :class:`NumberVocab` is returned
    as is. Cached per tokenizer.

    (The losses' ``vocab_or_tokenizer=tokenizer`` still means the DigitVocab, as in the
    NTL paper; pass this function's result to score every number token.)

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``get_vocab()``; a processor's
            ``.tokenizer`` is used), or a :class:`NumberVocab`.
        {vocab_size}

    Returns:
        A :class:`DigitVocab` or a multi-digit :class:`NumberVocab` with texts.

    Raises:
        ValueError: the tokenizer has no digit-string token; ``vocab_size`` too small.
        TypeError: an object with no ``get_vocab()``.

    Example:
        >>> import ntl
        >>> class Tok:  # stands in for a Hugging Face tokenizer
        ...     def get_vocab(self):
        ...         return {"a": 0, **{str(d): d + 1 for d in range(10)}, "12": 11}
        ...     def __len__(self):
        ...         return 12
        >>> v = ntl.vocab_for_tokenizer(Tok())
        >>> v.K, v.texts[-1], v.is_multi_digit
        (11, '12', True)
    """
    if isinstance(tokenizer, NumberVocab):
        return tokenizer
    tok = getattr(tokenizer, "tokenizer", None)  # a processor wraps its tokenizer
    if not hasattr(tokenizer, "get_vocab") and tok is not None:
        tokenizer = tok
    full = NumberVocab.from_tokenizer(tokenizer, vocab_size)
    if full.is_multi_digit or not full.is_digit_vocab:
        return full
    return DigitVocab.from_tokenizer(tokenizer, vocab_size)


_SIMPLE_CACHE: dict[tuple, NumberVocab] = {}
# content -> handle, handle -> the first vocab with that content (kept alive: vocabs are small and few)
_HANDLES: dict[NumberVocab, int] = {}
_BY_HANDLE: dict[int, NumberVocab] = {}


def vocab_from_handle(handle: int) -> NumberVocab:
    """The vocab registered under :attr:`NumberVocab.handle`."""
    try:
        return _BY_HANDLE[handle]
    except KeyError:
        raise ValueError(f"no number vocab has handle {handle!r}") from None


def _cached_simple(key: tuple, build: Any) -> NumberVocab:
    """Vocabs given as id lists / dicts, cached so repeated loss calls rebuild nothing."""
    hit = _SIMPLE_CACHE.get(key)
    if hit is None:
        hit = build()
        with _CACHE_LOCK:
            if len(_SIMPLE_CACHE) >= 64:
                _SIMPLE_CACHE.pop(next(iter(_SIMPLE_CACHE)))
            _SIMPLE_CACHE[key] = hit
    return hit
