"""The loss methods of NTL, each defined once: :class:`MSE`, :class:`MAE`, :class:`Huber`, :class:`W1`,
and the rivals :class:`DEL` (Digit Entropy Loss) and :class:`DIST2` (DIST²).

Every method is a frozen (hashable) dataclass of :class:`Method`, registered under its name
(and aliases) in :data:`REGISTRY`, and carries everything the rest of the package reads:

* ``name`` / ``aliases``: what ``method=`` accepts (``"mse"``, ``"mae"``, ``"huber"``,
  ``"wasserstein"`` alias ``"w1"``); an instance (``Huber(delta=2.0)``, ``W1(squash_factor=3.0)``)
  carries its parameters.
* ``code``: the Triton constexpr that selects its branch in the one row helper,
  ``ntl.kernels.ntl_loss.ntl_row_math`` (``None``: no Triton branch, PyTorch backend only).
* :meth:`Method.kernel_scalars`: its runtime scalars for the kernels (squashed-W1 ``a``/``b``,
  Huber ``delta``) for a given vocab.
* :meth:`Method.row_loss_grad` / :meth:`Method.row_loss`: its row formula over the ``K``
  number logits in plain PyTorch (loss and ``dL/dz``) from a :class:`Row` (raw logits ``z``,
  ``q = softmax(z)``, values, target value ``y``, target column ``k``, soft targets), which
  the twin ``ntl.kernels.reference`` runs.
* :meth:`Method.max_loss`: its largest per-position loss (``reweigh``'s ceiling
  ``D = 1.01 max_loss``); ``bounded = False`` (DEL, DIST²): none, ``reweigh`` is refused.
* ``soft_targets``: whether it takes a ``target_dist``.
* :attr:`Method.place_weighted`: whether the front end multiplies each position's loss by a
  weight computed from the labels (DEL's place weights, :func:`ntl.number_level.place_weights`).

Per position with number logits ``z [K]``, ``q = softmax(z)``, values ``v`` (ascending),
target value ``y`` and target column ``t``::

    MSE:    yhat = sum_k q_k v_k,  L = (yhat - y)^2,          dL/dz_j = 2 r q_j (v_j - yhat),  r = yhat - y
    MAE:    L = |r|,                                           dL/dz_j = sign(r) q_j (v_j - yhat)
    Huber:  L = r^2/2 if |r| < delta else delta (|r| - delta/2),  dL/dz_j = clamp(r, -delta, delta) q_j (v_j - yhat)
    W1:     L = sum_k q_k d_k,  d_k = |v_k - y|  (squashed: a + b d_k where d_k > 0),  dL/dz_j = q_j (d_j - L)
            soft target T: L = sum_{k<K-1} |Q_k - T_k| (v_{k+1} - v_k)  (Q, T the CDFs)
    DEL:    L = w (1/K) sum_k q_k b_k,  b_k = softplus(z_k) - [k = t] z_k  (BCE of sigmoid(z_k)),
            dL/dz_j = (w/K) q_j (sigmoid(z_j) - [j = t] + b_j - sum_k q_k b_k),  w the place weight
    DIST2:  t_k = softmax(-(v - y)^2 / tau)_k,  L = sum_k t_k (log t_k - log q_k),  dL/dz = q - t

Adding a method: a subclass here with ``@register`` (name, code, formula, ``max_loss``), a
``METHOD == code`` branch in ``ntl_row_math`` (for the Triton backend), and its tests. This
module imports only ``torch``: the kernels and the front end both read it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = ["DEL", "DIST2", "MAE", "MSE", "REGISTRY", "W1", "Huber", "Method", "Row", "RowScalars",
           "canonical_name",
           "kernel_code", "method_class", "register", "resolve", "squash_table", "unregister"]


class VocabValues(Protocol):
    """What a method reads from a vocab: its values (ascending) and ``v_max - v_min``."""

    @property
    def values(self) -> Sequence[float]: ...
    @property
    def max_distance(self) -> float: ...


class Row(NamedTuple):
    """The inputs of a row formula, for ``N`` rows of ``K`` number logits (fp32).

    ``z [N, K]``: the raw number logits (0 on rows taking no part), ``q = softmax(z)``,
    ``values [K]`` (ascending), ``y [N, 1]`` the target values, ``k [N]`` the target
    indices (the target's column, clamped to ``>= 0``), ``soft [N, K]`` the target
    distribution (``soft_targets`` methods with ``target_dist``; else ``None``). Most
    methods read ``q`` and ``y`` only; DEL reads the raw ``z`` and ``k``.

    Attributes:
        z: ``[N, K]`` raw number logits.
        q: ``[N, K]`` ``softmax(z)``.
        values: ``[K]`` the vocab's values, ascending.
        y: ``[N, 1]`` target values.
        k: ``[N]`` target columns (clamped to ``>= 0``).
        soft: ``[N, K]`` target distribution, or ``None``.

    Example:
        >>> import torch
        >>> from ntl.methods import MSE, Row, RowScalars
        >>> z = torch.zeros(1, 10)
        >>> row = Row(z, z.softmax(-1), torch.arange(10.0), torch.tensor([[3.0]]),
        ...           torch.tensor([3]), None)
        >>> MSE.row_loss(row, RowScalars())  # (4.5 - 3)^2
        tensor([2.2500])
    """

    z: Tensor
    q: Tensor
    values: Tensor
    y: Tensor
    k: Tensor
    soft: Tensor | None


class RowScalars(NamedTuple):
    """Runtime scalars of the row formula (Python floats; kernel arguments, not specialisations).

    ``sq_a``, ``sq_b``: squashed W1 distances ``a + b d`` (``(0, 1)`` keeps ``d``);
    ``delta``: the method's own scalar parameter: the Huber threshold, DIST²'s ``tau``
    (the kernels carry one such scalar).

    Attributes:
        sq_a: squashed-W1 offset ``a``.
        sq_b: squashed-W1 slope ``b``.
        delta: the method's scalar parameter (Huber's ``delta``, DIST²'s ``tau``).

    Example:
        >>> import ntl
        >>> ntl.methods.W1(squash_factor=2.0).kernel_scalars(ntl.DigitVocab(range(10), 12))
        RowScalars(sq_a=0.875, sq_b=0.125, delta=1.0)
    """

    sq_a: float = 0.0
    sq_b: float = 1.0
    delta: float = 1.0


@dataclass(frozen=True)
class Method:
    """A loss method: its registered name, Triton code, row formula and largest loss.

    Subclasses set the class attributes and override :meth:`row_loss_grad` and
    :meth:`max_loss` (and :meth:`kernel_scalars` when they have runtime parameters).
    The formulas are class methods of ``(q, values, y, soft, s)``: the twin looks the
    class up by ``name`` and passes the scalars the kernels get, so the registry, not
    the instance, travels through the ops.

    Example:
        >>> from ntl import methods
        >>> issubclass(methods.Huber, methods.Method), methods.Huber(delta=2.0).describe()
        (True, 'Huber(delta=2.0)')
        >>> methods.W1.name, methods.W1.aliases, methods.W1.code
        ('wasserstein', ('w1',), 1)
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    code: ClassVar[int | None] = None  # Triton constexpr METHOD (None: PyTorch backend only)
    soft_targets: ClassVar[bool] = False  # takes target_dist
    bounded: ClassVar[bool] = True  # has a finite max_loss (reweigh needs one)
    param_names: ClassVar[tuple[str, ...]] = ()  # the dataclass fields (set by register)

    def kernel_scalars(self, vocab: VocabValues) -> RowScalars:
        """The runtime scalars of this method's row formula for ``vocab``."""
        return RowScalars()

    def max_loss(self, vocab: VocabValues) -> float:
        """The largest per-position loss (``reweigh``'s ``D = 1.01 max_loss``)."""
        raise NotImplementedError(f"{type(self).__name__}.max_loss")

    def check_target_dist(self) -> None:
        """Raise unless this method (with its parameters) takes a ``target_dist``."""
        if not self.soft_targets:
            takes = " or ".join(repr(n) for n, c in REGISTRY.items() if c.soft_targets)
            raise ValueError(f"target_dist is only supported with method={takes}, not {self.name!r}")

    def reweigh_ceiling(self, vocab: VocabValues) -> float:
        """``D = 1.01 max_loss``: ``reweigh=True``'s ``L' = m L + D (1 - m)`` makes mass off the
        number tokens cost more than the worst number token (``ntloss``'s constant).
        ``ValueError`` for an unbounded method (:meth:`check_reweigh`)."""
        self.check_reweigh(True)
        return 1.01 * self.max_loss(vocab)

    def check_reweigh(self, reweigh: bool) -> None:
        """Raise for ``reweigh=True`` with a method whose loss has no upper bound (the
        ceiling ``D`` would be infinite)."""
        if reweigh and not self.bounded:
            raise ValueError(f"reweigh=True needs a bounded loss (its ceiling D = 1.01 max_loss), but "
                             f"method {self.name!r} is unbounded; use reweigh=False with it")

    @property
    def place_weighted(self) -> bool:
        """Whether the front end multiplies each position's loss by a place weight computed
        from the labels (:class:`DEL` with ``place_weights=True``)."""
        return False

    def decimal_point(self) -> int | None:
        """The ``'.'`` token id the place weights use, when the method carries one."""
        return None

    @classmethod
    def row_loss_grad(cls, row: Row, s: RowScalars) -> tuple[Tensor, Tensor]:
        """``(L [N], dL/dz [N, K])`` in fp32 from the :class:`Row` (``z``, ``q = softmax(z)``,
        ``values``, ``y``, ``k``, ``soft``) and the runtime scalars ``s``."""
        raise NotImplementedError(f"{cls.__name__}.row_loss_grad")

    @classmethod
    def row_loss(cls, row: Row, s: RowScalars) -> Tensor:
        """``L [N]``, differentiable through ``row.z`` and ``row.q`` by autograd (the test
        reference of :meth:`row_loss_grad`); by default the loss of :meth:`row_loss_grad`."""
        return cls.row_loss_grad(row, s)[0]

    def params(self) -> tuple[Any, ...]:
        """The instance's parameters, in field order (with ``name``: the instance's key;
        ``REGISTRY[name](*params)`` rebuilds it)."""
        return tuple(getattr(self, f) for f in self.param_names)

    def describe(self) -> str:
        """``'mse'`` for a method at its defaults, else its repr (``Huber(delta=2.0)``)."""
        try:
            default = self == type(self)()
        except TypeError:  # a method without defaults
            default = False
        return repr(self.name) if default else repr(self)

    def __str__(self) -> str:
        return self.name


REGISTRY: dict[str, type[Method]] = {}
"""Canonical name -> method class (registration order)."""
_ALIASES: dict[str, str] = {}

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: register ``cls`` under ``cls.name`` and ``cls.aliases``.

    Args:
        cls: a :class:`Method` subclass (a frozen dataclass) with a ``name``.

    Returns:
        ``cls`` itself.

    Raises:
        TypeError: ``cls`` is not a named :class:`Method` subclass.
        ValueError: its name, an alias or its ``code`` is taken.

    Example:
        >>> from dataclasses import dataclass
        >>> from typing import ClassVar
        >>> from ntl import methods
        >>> @methods.register
        ... @dataclass(frozen=True)
        ... class Plain(methods.MSE):
        ...     name: ClassVar[str] = "plain_mse"
        ...     code: ClassVar[int | None] = None  # PyTorch backend only
        >>> methods.canonical_name("plain_mse")
        'plain_mse'
        >>> methods.unregister("plain_mse")
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError("register takes a Method subclass with a name")
    for n in (cls.name, *cls.aliases):
        if n in REGISTRY or n in _ALIASES:
            raise ValueError(f"a loss method named {n!r} is already registered")
    codes = {c.code for c in REGISTRY.values() if c.code is not None}
    if cls.code is not None and cls.code in codes:
        raise ValueError(f"Triton method code {cls.code} is already taken")
    cls.param_names = tuple(f.name for f in fields(cls))  # read here, not under torch.compile
    REGISTRY[cls.name] = cls
    for a in cls.aliases:
        _ALIASES[a] = cls.name
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (and its aliases); for tests and plugins.

    Args:
        name: the method's registered (canonical) name.

    Returns:
        None.

    Raises:
        KeyError: no method is registered under ``name``.

    Example:
        >>> from dataclasses import dataclass
        >>> from typing import ClassVar
        >>> from ntl import methods
        >>> @methods.register
        ... @dataclass(frozen=True)
        ... class Tmp(methods.MAE):
        ...     name: ClassVar[str] = "tmp_mae"
        ...     code: ClassVar[int | None] = None
        >>> methods.unregister("tmp_mae")
        >>> "tmp_mae" in methods.REGISTRY
        False
    """
    cls = REGISTRY.pop(name)
    for a in cls.aliases:
        _ALIASES.pop(a, None)


def _choices() -> str:
    alias = ", ".join(f"{a!r}, an alias of {n!r}" for a, n in _ALIASES.items())
    return f"{list(REGISTRY)}" + (f" (or {alias})" if alias else "")


def canonical_name(method: object, name: str = "method") -> str:
    """The registered name of a method name or alias (``"w1"`` -> ``"wasserstein"``).

    Args:
        method: a method name or alias.
        name: the argument's name in the error message.

    Returns:
        The canonical name.

    Raises:
        ValueError: ``method`` is not a registered name or alias.

    Example:
        >>> from ntl import methods
        >>> methods.canonical_name("w1"), methods.canonical_name("mse")
        ('wasserstein', 'mse')
    """
    if isinstance(method, str):
        if method in REGISTRY:
            return method
        if method in _ALIASES:
            return _ALIASES[method]
    raise ValueError(f"{name} must be one of {_choices()} or an ntl.methods.Method object, "
                     f"got {method!r}")


def method_class(method: str) -> type[Method]:
    """The class registered under a method name or alias (what the ops and twins carry: an
    object's parameters reach them as runtime scalars, :meth:`Method.kernel_scalars`).

    Args:
        method: a method name or alias.

    Returns:
        The registered :class:`Method` subclass.

    Raises:
        TypeError: a :class:`Method` object (pass its ``name``).
        ValueError: an unknown name.

    Example:
        >>> from ntl import methods
        >>> methods.method_class("w1")
        <class 'ntl.methods.W1'>
    """
    if isinstance(method, Method):
        raise TypeError(f"the kernels and their twins take a method name, got the object {method!r}: "
                        "pass method.name and its kernel_scalars(vocab)")
    return REGISTRY[canonical_name(method)]


def kernel_code(method: str) -> int:
    """The Triton constexpr ``METHOD`` of a registered method; a ``ValueError`` for a method
    without a Triton branch.

    Args:
        method: a method name or alias.

    Returns:
        The int code of its branch in ``ntl.kernels.ntl_loss.ntl_row_math``.

    Raises:
        ValueError: an unknown name, or a method with no Triton branch.

    Example:
        >>> from ntl import methods
        >>> methods.kernel_code("mse"), methods.kernel_code("wasserstein")
        (0, 1)
    """
    code = method_class(method).code
    if code is None:
        raise ValueError(f"method {method!r} has no Triton kernel (no branch in "
                         "ntl.kernels.ntl_loss.ntl_row_math); use backend='torch'")
    return code


def _param_error(param: str, method: str) -> ValueError:
    what = {"squash_factor": "the Wasserstein loss", "huber_delta": "the Huber loss"}.get(param, "")
    return ValueError(f"{param} applies to {what} only, not method={method!r}")


def resolve(method: object, *, squash_factor: Any = None, huber_delta: Any = None,
            name: str = "method") -> Method:
    """A :class:`Method` from a registered name or alias or a :class:`Method` object.

    ``squash_factor`` (W1) and ``huber_delta`` (Huber) are the legacy keyword arguments:
    with a name they build the object (``resolve("huber", huber_delta=2.0) == Huber(2.0)``);
    with an object they must be ``None`` or equal to its parameter (else ``ValueError``:
    the object already says which). A keyword for another method is a ``ValueError``.

    Args:
        method: a registered name or alias, or a :class:`Method` object.
        squash_factor: W1's squash factor (``None``: unset).
        huber_delta: Huber's threshold (``None``: unset).
        name: the argument's name in error messages.

    Returns:
        The :class:`Method` instance.

    Raises:
        ValueError: an unknown name, an unregistered class, a keyword for another method, or
            one that conflicts with the object's parameter.
        TypeError: a keyword that is not a number.

    Example:
        >>> from ntl import methods
        >>> methods.resolve("huber", huber_delta=2.0)
        Huber(delta=2.0)
        >>> methods.resolve(methods.W1(squash_factor=3.0), squash_factor=3.0)
        W1(squash_factor=3.0)
    """
    if isinstance(method, Method):
        if type(method).name not in REGISTRY or REGISTRY[type(method).name] is not type(method):
            raise ValueError(f"{name}: {type(method).__name__} is not a registered method "
                             "(ntl.methods.register)")
        for param, field, value in (("squash_factor", "squash_factor", squash_factor),
                                    ("huber_delta", "delta", huber_delta)):
            if value is None:
                continue
            if not hasattr(method, field):
                raise _param_error(param, method.name)
            if _number(param, value) != getattr(method, field):
                raise ValueError(f"{param}={value!r} conflicts with {name}={method!r}: pass the "
                                 f"parameter in the object or as {param}= with a method name, not both")
        return method
    cls = REGISTRY[canonical_name(method, name)]
    kwargs: dict[str, Any] = {}
    for param, field, value in (("squash_factor", "squash_factor", squash_factor),
                                ("huber_delta", "delta", huber_delta)):
        if value is None:
            continue
        if field not in cls.param_names:
            _number(param, value)  # a bad value is reported as such first
            raise _param_error(param, cls.name)
        kwargs[field] = value
    return cls(**kwargs)


def _number(param: str, value: Any) -> float:
    """Type check of a numeric parameter (the value checks are the method's)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number > 1 or None" if param == "squash_factor" else "a positive number"
        raise TypeError(f"{param} must be {kind}, got {type(value).__name__}")
    return float(value)


# --------------------------------------------------------------------------- expected-value methods
class _ExpectedValue(Method):
    """An error ``e(r)`` of ``r = yhat - y``, ``yhat = sum_k q_k v_k``:
    ``dL/dz_j = e'(r) q_j (v_j - yhat)`` (``ntl_dot_loss``'s family)."""

    @classmethod
    def error(cls, r: Tensor, s: RowScalars) -> Tensor:
        raise NotImplementedError

    @classmethod
    def error_grad(cls, r: Tensor, s: RowScalars) -> Tensor:
        raise NotImplementedError

    @classmethod
    def error_of(cls, d: float, s: RowScalars) -> float:
        """``e(d)`` for a Python float (the largest loss)."""
        return float(cls.error(torch.tensor(d, dtype=torch.float64), s))

    @classmethod
    def row_loss_grad(cls, row: Row, s: RowScalars) -> tuple[Tensor, Tensor]:
        q, values = row.q, row.values
        yhat = q @ values
        r = yhat[:, None] - row.y
        return cls.error(r, s).squeeze(1), cls.error_grad(r, s) * q * (values - yhat[:, None])

    @classmethod
    def row_loss(cls, row: Row, s: RowScalars) -> Tensor:
        return cls.error((row.q @ row.values)[:, None] - row.y, s).squeeze(1)

    def max_loss(self, vocab: VocabValues) -> float:
        return self.error_of(vocab.max_distance, self.kernel_scalars(vocab))


@register
@dataclass(frozen=True)
class MSE(_ExpectedValue):
    """NTL-MSE: ``e(r) = r^2``, ``e'(r) = 2 r``; largest loss ``(v_max - v_min)^2``.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.zeros(1, 12), torch.tensor([3])  # uniform q: yhat = 4.5
        >>> ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.MSE())
        tensor(2.2500)
    """

    name: ClassVar[str] = "mse"
    code: ClassVar[int | None] = 0

    @classmethod
    def error(cls, r: Tensor, s: RowScalars) -> Tensor:
        return r.square()

    @classmethod
    def error_grad(cls, r: Tensor, s: RowScalars) -> Tensor:
        return 2.0 * r


@register
@dataclass(frozen=True)
class MAE(_ExpectedValue):
    """NTL-MAE: ``e(r) = |r|``, ``e'(r) = sign(r)`` (0 at 0); largest loss ``v_max - v_min``.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.zeros(1, 12), torch.tensor([3])  # uniform q: yhat = 4.5
        >>> ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.MAE())
        tensor(1.5000)
    """

    name: ClassVar[str] = "mae"
    code: ClassVar[int | None] = 2

    @classmethod
    def error(cls, r: Tensor, s: RowScalars) -> Tensor:
        return r.abs()

    @classmethod
    def error_grad(cls, r: Tensor, s: RowScalars) -> Tensor:
        return torch.sign(r)


@register
@dataclass(frozen=True)
class Huber(_ExpectedValue):
    """NTL-Huber (``F.huber_loss(delta=delta)`` of ``r``): ``e(r) = r^2/2`` for ``|r| < delta``,
    else ``delta (|r| - delta/2)``; ``e'(r) = clamp(r, -delta, delta)``.

    Args:
        delta: the threshold (a positive finite number).

    Raises:
        ValueError: ``delta`` not a positive finite number.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.zeros(1, 12), torch.tensor([3])  # uniform q: yhat = 4.5
        >>> ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.Huber(delta=1.0))  # 1.5 - 0.5
        tensor(1.)
    """

    delta: float = 1.0
    name: ClassVar[str] = "huber"
    code: ClassVar[int | None] = 3

    def __post_init__(self) -> None:
        d = _number("huber_delta", self.delta)
        if not (math.isfinite(d) and d > 0):
            raise ValueError(f"huber_delta must be a positive finite number, got {self.delta!r}")
        object.__setattr__(self, "delta", d)

    def kernel_scalars(self, vocab: VocabValues) -> RowScalars:
        return RowScalars(delta=self.delta)

    @classmethod
    def error(cls, r: Tensor, s: RowScalars) -> Tensor:
        a = r.abs()
        return torch.where(a < s.delta, 0.5 * r * r, s.delta * (a - 0.5 * s.delta))

    @classmethod
    def error_grad(cls, r: Tensor, s: RowScalars) -> Tensor:
        return r.clamp(-s.delta, s.delta)


# --------------------------------------------------------------------------- Wasserstein-1
def squash_table(vocab: VocabValues, squash_factor: float) -> tuple[float, float]:
    """``(a, b)`` of ``ntloss``'s squashed W1 distances: ``d' = a + b d`` for ``d = |v_i - v_j| > 0``
    (0 for ``d = 0``), so that the closest distinct values cost 1 and the farthest ``squash_factor``::

        b = (squash_factor - 1) / (d_max - d_min),   a = 1 - b d_min   (d_min the smallest d > 0)

    Args:
        vocab: anything with ``values`` (ascending) and ``max_distance`` (a
            :class:`ntl.NumberVocab`).
        squash_factor: the cost of the farthest distinct value (``> 1``).

    Returns:
        ``(a, b)`` as Python floats.

    Raises:
        ValueError: the values have fewer than two different nonzero distances.

    Example:
        >>> import ntl
        >>> ntl.methods.squash_table(ntl.DigitVocab(range(10), 12), 2.0)  # d_min = 1, d_max = 9
        (0.875, 0.125)
    """
    vals = list(vocab.values)
    gaps = [b - a for a, b in itertools.pairwise(vals) if b > a]
    d_max = vals[-1] - vals[0]
    if not gaps or min(gaps) == d_max:
        uniq = sorted(set(vals))
        raise ValueError(
            f"squash_factor needs number values with at least two different nonzero distances; "
            f"this vocab has values {uniq[:4]}{' ...' if len(uniq) > 4 else ''}"
        )
    d_min = min(gaps)
    b = (float(squash_factor) - 1.0) / (d_max - d_min)
    return 1.0 - b * d_min, b


@register
@dataclass(frozen=True)
class W1(Method):
    """NTL-W1: the Wasserstein-1 distance between ``q`` and the target (``ntloss.NTLoss``).

    One-hot target ``y``: ``L = sum_k q_k d_k``, ``d_k = |v_k - y|``, ``dL/dz_j = q_j (d_j - L)``;
    ``squash_factor`` (a number > 1) squashes ``d > 0`` to ``a + b d`` (:func:`squash_table`:
    closest distinct value 1, farthest ``squash_factor``). Soft target ``T`` (``target_dist``):
    ``L = sum_{k<K-1} |Q_k - T_k| g_k`` (CDFs ``Q``, ``T``, gaps ``g_k = v_{k+1} - v_k``),
    ``dL/dz_j = q_j (G_j - sum_i q_i G_i)``, ``G_i = sum_{k>=i, k<K-1} sign(Q_k - T_k) g_k``.
    Largest loss: ``v_max - v_min`` (``squash_factor`` when squashed).

    Args:
        squash_factor: ``None`` (plain distances) or a finite number ``> 1``.

    Raises:
        ValueError: ``squash_factor`` not a finite number ``> 1``.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.zeros(1, 12), torch.tensor([3])  # uniform q: yhat = 4.5
        >>> ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.W1())  # mean_k |k - 3|
        tensor(2.7000)
        >>> ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.W1(squash_factor=2.0))
        tensor(1.1250)
    """

    squash_factor: float | None = None
    name: ClassVar[str] = "wasserstein"
    aliases: ClassVar[tuple[str, ...]] = ("w1",)
    code: ClassVar[int | None] = 1
    soft_targets: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.squash_factor is None:
            return
        f = _number("squash_factor", self.squash_factor)
        if not (math.isfinite(f) and f > 1):
            raise ValueError(f"squash_factor must be a finite number > 1 (1 would be cross-entropy), "
                             f"got {self.squash_factor!r}")
        object.__setattr__(self, "squash_factor", f)

    def check_target_dist(self) -> None:
        if self.squash_factor is not None:
            raise ValueError("squash_factor is not supported with target_dist (the squashed distance "
                             "is defined for a one-hot target)")

    def kernel_scalars(self, vocab: VocabValues) -> RowScalars:
        if self.squash_factor is None:
            return RowScalars()
        a, b = squash_table(vocab, self.squash_factor)
        return RowScalars(sq_a=a, sq_b=b)

    def max_loss(self, vocab: VocabValues) -> float:
        return self.squash_factor if self.squash_factor is not None else float(vocab.max_distance)

    @staticmethod
    def _dist(values: Tensor, y: Tensor, s: RowScalars) -> Tensor:
        d = (values - y).abs()
        return torch.where(d > 0, s.sq_a + s.sq_b * d, 0.0)

    @classmethod
    def row_loss_grad(cls, row: Row, s: RowScalars) -> tuple[Tensor, Tensor]:
        q, values, y, soft = row.q, row.values, row.y, row.soft
        if soft is None:
            dist = cls._dist(values, y, s)
            loss = (q * dist).sum(-1)
            return loss, q * (dist - loss[:, None])
        gaps = values[1:] - values[:-1]
        d = q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]
        loss = (d.abs() * gaps).sum(-1)
        sg = torch.sign(d) * gaps  # [N, K-1]
        g = torch.nn.functional.pad(sg.flip(-1).cumsum(-1).flip(-1), (0, 1))  # sum_{k>=i}
        return loss, q * (g - (q * g).sum(-1, keepdim=True))

    @classmethod
    def row_loss(cls, row: Row, s: RowScalars) -> Tensor:
        q, values, y, soft = row.q, row.values, row.y, row.soft
        if soft is None:
            return (q * cls._dist(values, y, s)).sum(-1)
        gaps = values[1:] - values[:-1]
        return ((q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]).abs() * gaps).sum(-1)


# --------------------------------------------------------------------------- DEL
def _flag(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{param} must be a bool, got {type(value).__name__}")
    return value


@register
@dataclass(frozen=True)
class DEL(Method):
    """DEL, the Digit Entropy Loss (Zheng et al., arXiv 2605.20369): per number position
    with number logits ``z [K]``, ``q = softmax(z)`` (not detached) and target column ``t``::

        L = w (1/K) sum_k q_k b_k,    b_k = BCE(sigmoid(z_k), [k = t]) = softplus(z_k) - [k = t] z_k
        dL/dz_j = (w/K) (q_j (sigmoid(z_j) - [j = t]) + q_j (b_j - sum_k q_k b_k))

    The paper writes ``1/10`` for its ten digits; here ``1/K`` (the same for digits). DEL reads
    the raw logits (``sigmoid(z_k)``), so it is not shift-invariant in ``z``.

    ``w`` is the place weight (``place_weights=True``; ``w = 1`` when off), from the labels:
    a digit at integer place ``p >= 0`` (``p = 0`` the units digit, ``p`` = digits written
    after it before the decimal point) has ``w = 2 (p + 1)``; the ``d``-th digit after the
    decimal point (``d >= 1``) has ``w = 1.02^-(d + 1)``. This is the weight of the authors'
    public code (``generate_place`` in ``PolyU-VCLab/DEL``, ``train-qwen-deepseek.py``); the
    paper's own text of the formula was not reachable here. A number is a run of number-token
    labels in a row (the last axis of ``labels``); a ``'.'`` label between two number tokens
    is its decimal point (the first one; the tokenizer's ``'.'``, or
    ``decimal_point_id``; without one every run is an integer). A token writing several
    digits (Llama-3's ``'123'``) takes the place of its lowest digit. Place weights multiply
    the position's loss, not the mean's denominator (``mean = sum w_i pw_i L_i / sum w_i``).

    Unbounded (no ``reweigh``); no ``target_dist``.

    Args:
        place_weights: multiply each position's loss by its place weight ``w`` (``False``:
            ``w = 1``).
        decimal_point_id: the ``'.'`` token id (``None``: the tokenizer's, or none).

    Raises:
        TypeError: ``decimal_point_id`` not a non-negative int or ``None``.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.zeros(1, 12), torch.tensor([3])  # uniform q: yhat = 4.5
        >>> plain = ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.DEL(place_weights=False))
        >>> # b_k = softplus(0) = ln 2 for every k: L = ln 2 / 10
        >>> weighted = ntl.ntl_loss(logits, labels, vocab, method="del")  # a units digit: w = 2
        >>> round(plain.item(), 4), torch.allclose(weighted, 2 * plain)
        (0.0693, True)
    """

    place_weights: bool = True
    decimal_point_id: int | None = None
    name: ClassVar[str] = "del"
    code: ClassVar[int | None] = 4
    bounded: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _flag("place_weights", self.place_weights)
        d = self.decimal_point_id
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise TypeError(f"decimal_point_id must be a non-negative int token id or None, got {d!r}")

    @property
    def place_weighted(self) -> bool:
        return self.place_weights

    def decimal_point(self) -> int | None:
        return self.decimal_point_id

    def max_loss(self, vocab: VocabValues) -> float:
        return math.inf

    @staticmethod
    def _bce(z: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(b [N, K], [k = t] [N, K])``; ``b`` stays finite at a ``-inf`` logit off the target."""
        hit = torch.nn.functional.one_hot(k, z.shape[-1]).bool()
        return torch.nn.functional.softplus(z) - torch.where(hit, z, 0.0), hit.to(z.dtype)

    @classmethod
    def row_loss_grad(cls, row: Row, s: RowScalars) -> tuple[Tensor, Tensor]:
        z, q = row.z, row.q
        K = z.shape[-1]
        b, onehot = cls._bce(z, row.k)
        S = (q * b).sum(-1, keepdim=True)
        grad = q * (torch.sigmoid(z) - onehot + b - S) / K
        return S.squeeze(1) / K, grad

    @classmethod
    def row_loss(cls, row: Row, s: RowScalars) -> Tensor:
        b, _ = cls._bce(row.z, row.k)
        return (row.q * b).sum(-1) / row.z.shape[-1]


# --------------------------------------------------------------------------- DIST²
@register
@dataclass(frozen=True)
class DIST2(Method):
    """DIST² ("Teaching metric distance to discrete autoregressive language models", ICLR
    2026): the KL divergence from a target smoothed by the squared distance of the values::

        t_k = exp(-(v_k - y)^2 / tau) / sum_i exp(-(v_i - y)^2 / tau)
        L = KL(t || q) = sum_k t_k (log t_k - log q_k),   dL/dz_j = q_j - t_j

    (``log q = z - logsumexp(z)``, ``log t`` formed from its exponent, whose largest value is
    0 at ``v_k = y``: no ``0 log 0`` arises). ``tau`` a finite number > 0 (default 1.0).
    Unbounded (no ``reweigh``); no ``target_dist`` (the target is ``t``).

    Args:
        tau: the temperature of the target's smoothing (a positive finite number).

    Raises:
        TypeError: ``tau`` not a number.
        ValueError: ``tau`` not positive and finite.

    Example:
        >>> import torch, ntl
        >>> vocab = ntl.DigitVocab(range(10), vocab_size=12)
        >>> logits, labels = torch.zeros(1, 12), torch.tensor([3])  # uniform q: yhat = 4.5
        >>> loss = ntl.ntl_loss(logits, labels, vocab, method=ntl.methods.DIST2(tau=0.5))
        >>> round(loss.item(), 3)
        1.632
    """

    tau: float = 1.0
    name: ClassVar[str] = "dist2"
    code: ClassVar[int | None] = 5
    bounded: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise TypeError(f"tau must be a positive number, got {type(self.tau).__name__}")
        t = float(self.tau)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"tau must be a positive finite number, got {self.tau!r}")
        object.__setattr__(self, "tau", t)

    def kernel_scalars(self, vocab: VocabValues) -> RowScalars:
        return RowScalars(delta=self.tau)

    def max_loss(self, vocab: VocabValues) -> float:
        return math.inf

    @staticmethod
    def _log_target(row: Row, tau: float) -> Tensor:
        return torch.log_softmax(-(row.values - row.y).square() / tau, dim=-1)

    @classmethod
    def row_loss_grad(cls, row: Row, s: RowScalars) -> tuple[Tensor, Tensor]:
        logt = cls._log_target(row, s.delta)
        t = logt.exp()
        logq = torch.log_softmax(row.z, dim=-1)
        return (t * (logt - logq)).sum(-1), row.q - t

    @classmethod
    def row_loss(cls, row: Row, s: RowScalars) -> Tensor:
        logt = cls._log_target(row, s.delta)
        return (logt.exp() * (logt - torch.log_softmax(row.z, dim=-1))).sum(-1)
