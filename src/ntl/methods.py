"""The loss methods of NTL, each defined once: :class:`MSE`, :class:`MAE`, :class:`Huber`, :class:`W1`.

Every method is a frozen (hashable) dataclass of :class:`Method`, registered under its name
(and aliases) in :data:`REGISTRY`, and carries everything the rest of the package reads:

* ``name`` / ``aliases``: what ``method=`` accepts (``"mse"``, ``"mae"``, ``"huber"``,
  ``"wasserstein"`` alias ``"w1"``); an instance (``Huber(delta=2.0)``, ``W1(squash_factor=3.0)``)
  carries its parameters.
* ``code``: the Triton constexpr that selects its branch in the one row helper,
  ``ntl.kernels.rowloss.ntl_row_math`` (``None``: no Triton branch, PyTorch backend only).
* :meth:`Method.kernel_scalars`: its runtime scalars for the kernels (squashed-W1 ``a``/``b``,
  Huber ``delta``) for a given vocab.
* :meth:`Method.row_loss_grad` / :meth:`Method.row_loss`: its row formula over the ``K``
  number logits in plain PyTorch (loss and ``dL/dz``), which the twin
  ``ntl.kernels.reference`` runs.
* :meth:`Method.max_loss`: its largest per-position loss (``reweigh``'s ceiling
  ``D = 1.01 max_loss``).
* ``soft_targets``: whether it takes a ``target_dist``.

Per position with number logits ``z [K]``, ``q = softmax(z)``, values ``v`` (ascending) and
target value ``y``::

    MSE:    yhat = sum_k q_k v_k,  L = (yhat - y)^2,          dL/dz_j = 2 r q_j (v_j - yhat),  r = yhat - y
    MAE:    L = |r|,                                           dL/dz_j = sign(r) q_j (v_j - yhat)
    Huber:  L = r^2/2 if |r| < delta else delta (|r| - delta/2),  dL/dz_j = clamp(r, -delta, delta) q_j (v_j - yhat)
    W1:     L = sum_k q_k d_k,  d_k = |v_k - y|  (squashed: a + b d_k where d_k > 0),  dL/dz_j = q_j (d_j - L)
            soft target T: L = sum_{k<K-1} |Q_k - T_k| (v_{k+1} - v_k)  (Q, T the CDFs)

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

__all__ = ["MAE", "MSE", "REGISTRY", "W1", "Huber", "Method", "RowScalars", "canonical_name",
           "kernel_code", "method_class", "register", "resolve", "squash_table", "unregister"]


class VocabValues(Protocol):
    """What a method reads from a vocab: its values (ascending) and ``v_max - v_min``."""

    @property
    def values(self) -> Sequence[float]: ...
    @property
    def max_distance(self) -> float: ...


class RowScalars(NamedTuple):
    """Runtime scalars of the row formula (Python floats; kernel arguments, not specialisations).

    ``sq_a``, ``sq_b``: squashed W1 distances ``a + b d`` (``(0, 1)`` keeps ``d``);
    ``delta``: the Huber threshold."""

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
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    code: ClassVar[int | None] = None  # Triton constexpr METHOD (None: PyTorch backend only)
    soft_targets: ClassVar[bool] = False  # takes target_dist
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
        number tokens cost more than the worst number token (``ntloss``'s constant)."""
        return 1.01 * self.max_loss(vocab)

    @classmethod
    def row_loss_grad(cls, q: Tensor, values: Tensor, y: Tensor, soft: Tensor | None,
                      s: RowScalars) -> tuple[Tensor, Tensor]:
        """``(L [N], dL/dz [N, K])`` in fp32 from ``q = softmax(z) [N, K]``, ``values [K]``,
        target values ``y [N, 1]`` and (``soft_targets`` methods) ``soft [N, K]``."""
        raise NotImplementedError(f"{cls.__name__}.row_loss_grad")

    @classmethod
    def row_loss(cls, q: Tensor, values: Tensor, y: Tensor, soft: Tensor | None, s: RowScalars) -> Tensor:
        """``L [N]``, differentiable through ``q`` by autograd (the test reference of
        :meth:`row_loss_grad`); by default the loss of :meth:`row_loss_grad`."""
        return cls.row_loss_grad(q, values, y, soft, s)[0]

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
    """Class decorator: register ``cls`` under ``cls.name`` and ``cls.aliases``."""
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
    """Remove a registered method (and its aliases); for tests and plugins."""
    cls = REGISTRY.pop(name)
    for a in cls.aliases:
        _ALIASES.pop(a, None)


def _choices() -> str:
    alias = ", ".join(f"{a!r}, an alias of {n!r}" for a, n in _ALIASES.items())
    return f"{list(REGISTRY)}" + (f" (or {alias})" if alias else "")


def canonical_name(method: object, name: str = "method") -> str:
    """The registered name of a method name or alias (``"w1"`` -> ``"wasserstein"``)."""
    if isinstance(method, str):
        if method in REGISTRY:
            return method
        if method in _ALIASES:
            return _ALIASES[method]
    raise ValueError(f"{name} must be one of {_choices()} or an ntl.methods.Method object, "
                     f"got {method!r}")


def method_class(method: str) -> type[Method]:
    """The class registered under a method name or alias (what the ops and twins carry: an
    object's parameters reach them as runtime scalars, :meth:`Method.kernel_scalars`)."""
    if isinstance(method, Method):
        raise TypeError(f"the kernels and their twins take a method name, got the object {method!r}: "
                        "pass method.name and its kernel_scalars(vocab)")
    return REGISTRY[canonical_name(method)]


def kernel_code(method: str) -> int:
    """The Triton constexpr ``METHOD`` of a registered method; a ``ValueError`` for a method
    without a Triton branch."""
    code = method_class(method).code
    if code is None:
        raise ValueError(f"method {method!r} has no Triton kernel (no branch in "
                         "ntl.kernels.rowloss.ntl_row_math); use backend='torch'")
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
    def row_loss_grad(cls, q: Tensor, values: Tensor, y: Tensor, soft: Tensor | None,
                      s: RowScalars) -> tuple[Tensor, Tensor]:
        yhat = q @ values
        r = yhat[:, None] - y
        return cls.error(r, s).squeeze(1), cls.error_grad(r, s) * q * (values - yhat[:, None])

    @classmethod
    def row_loss(cls, q: Tensor, values: Tensor, y: Tensor, soft: Tensor | None, s: RowScalars) -> Tensor:
        return cls.error((q @ values)[:, None] - y, s).squeeze(1)

    def max_loss(self, vocab: VocabValues) -> float:
        return self.error_of(vocab.max_distance, self.kernel_scalars(vocab))


@register
@dataclass(frozen=True)
class MSE(_ExpectedValue):
    """NTL-MSE: ``e(r) = r^2``, ``e'(r) = 2 r``; largest loss ``(v_max - v_min)^2``."""

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
    """NTL-MAE: ``e(r) = |r|``, ``e'(r) = sign(r)`` (0 at 0); largest loss ``v_max - v_min``."""

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
    else ``delta (|r| - delta/2)``; ``e'(r) = clamp(r, -delta, delta)``."""

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
    def row_loss_grad(cls, q: Tensor, values: Tensor, y: Tensor, soft: Tensor | None,
                      s: RowScalars) -> tuple[Tensor, Tensor]:
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
    def row_loss(cls, q: Tensor, values: Tensor, y: Tensor, soft: Tensor | None, s: RowScalars) -> Tensor:
        if soft is None:
            return (q * cls._dist(values, y, s)).sum(-1)
        gaps = values[1:] - values[:-1]
        return ((q.cumsum(-1)[:, :-1] - soft.float().cumsum(-1)[:, :-1]).abs() * gaps).sum(-1)
