"""Benchmark cases, their inputs, the providers compared in each, and the expected values.

Cases (``--cases``):

* ``ntl-mse`` / ``ntl-w1``: standalone NTL on ``logits [N, V]``.
* ``ce+ntl``: ``CE + 0.3 * NTL-W1`` on ``logits [N, V]``; ``ce`` (``F.cross_entropy``
  alone) is the baseline every ratio "x CE" refers to. The ``-ga`` providers (GPU) time a
  gradient-accumulation step, ``loss / k`` (:data:`GA_STEPS`): ntl with ``grad_scale=1/k``
  (its backward then reads and writes nothing), Liger's CE as it is (its backward rescales
  the ``N x V`` gradient).
* ``hidden``: NTL-W1 from ``hidden [N, H]`` and the LM head ``W [V, H]``; its
  baseline "x CE" is a full LM-head forward+backward with cross-entropy.
* ``number-level``, ``predict``, ``dot-mae``, ``dot-huber``, ``w1-squash``, ``reweigh``: the
  ntloss-parity features against ``ntloss`` (:mod:`ntl.bench.parity`).
* ``rivals``, ``ce+rivals``: DEL and DIST² beside NTL-W1, standalone and fused
  (:mod:`ntl.bench.rivals`).
* ``linear``: ``CE + 0.3 * NTL-W1`` from ``hidden [N, H]`` and ``W [V, H]`` (H = 896,
  Qwen2.5-0.5B's head, by default): the logits path ``hidden @ W.T`` +
  ``ntl.cross_entropy_with_ntl`` (its baseline), ``F.linear_cross_entropy`` (CE only)
  with and without chunking, ``ntl.linear_cross_entropy_with_ntl``, and on GPU
  Liger's fused linear CE and Cut Cross-Entropy (CE only; plus NTL from hidden).

Every provider is a builder ``(ctx, inputs) -> fwd`` where ``fwd()`` returns the
scalar loss; it raises :class:`Unavailable` (with the reason shown in the
report) when its library or entry point is missing or it needs a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CASES",
    "GA_STEPS",
    "NTL_WEIGHT",
    "Case",
    "Ctx",
    "Inputs",
    "Provider",
    "Unavailable",
    "expected_values",
    "make_inputs",
    "ref_ntl",
]

#: Weight of NTL in the cross-entropy + NTL cases (the issue's default).
NTL_WEIGHT = 0.3
#: Gradient-accumulation steps k of the ``-ga`` providers: the step's loss is ``loss / k``.
GA_STEPS = 8
#: Text token ids are drawn below this bound (Qwen2.5's tokenizer has 151,665 entries).
TOKENIZER_LEN = 151_665


class Unavailable(Exception):
    """A provider cannot run here; the message says why (shown as 'skipped')."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Tensors of one shape. ``logits`` or ``hidden``/``weight`` are leaves requiring grad."""

    N: int
    V: int
    dtype: torch.dtype
    device: torch.device
    seed: int
    labels: torch.Tensor
    ids: torch.Tensor  # [K] digit token ids, sorted by value
    values: torch.Tensor  # [K] fp32
    lut: torch.Tensor  # [V] long: token id -> digit index or -1
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    dirty: bool = False  # logits were overwritten by an in-place provider
    kind: str = "logits"
    widths: tuple[int, ...] | None = None  # [K] digits each number token writes (None: unknown)

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.logits, self.hidden, self.weight) if t is not None]

    def restore(self) -> None:
        """Regenerate the logits bit-identically after an in-place provider overwrote them."""
        if self.dirty and self.logits is not None:
            with torch.no_grad():
                self.logits.normal_(generator=_gen(self.seed + 1, self.device))
            self.dirty = False


def _gen(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_labels(N: int, V: int, digit_ids: torch.Tensor, *, digit_frac: float, ignore_frac: float,
                seed: int) -> torch.Tensor:
    """``N`` labels: exactly ``round(N digit_frac)`` number tokens (drawn uniformly from
    ``digit_ids``: Qwen's 10 digits, or e.g. Llama-3's 1,110 number tokens), ``round(N ignore_frac)``
    ``-100`` and text tokens (ids below ``min(V, 151665)`` that are not in ``digit_ids``)
    elsewhere, shuffled."""
    g = _gen(seed, torch.device("cpu"))
    hi = min(V, TOKENIZER_LEN)
    if len(torch.unique(digit_ids[digit_ids < hi])) >= hi:
        raise ValueError(f"make_labels: every id below {hi} is a number token; no text token to draw")
    text = torch.randint(0, hi, (N,), generator=g)
    is_digit = torch.isin(text, digit_ids)
    step = 10 * len(digit_ids)  # move off the number ids: one step for Qwen's 10 contiguous digit ids,
    while bool(is_digit.any()):  # then single steps (Llama-3's ids are scattered) until none is left
        text = torch.where(is_digit, (text + step) % hi, text)
        is_digit = torch.isin(text, digit_ids)
        step = 1
    digits = digit_ids[torch.randint(0, len(digit_ids), (N,), generator=g)]
    n_d, n_i = round(N * digit_frac), round(N * ignore_frac)
    perm = torch.randperm(N, generator=g)
    labels = text.clone()
    labels[perm[:n_d]] = digits[perm[:n_d]]
    labels[perm[n_d:n_d + n_i]] = -100
    return labels


def make_inputs(kind: str, N: int, V: int, dtype: torch.dtype, device: torch.device, vocab: Any, *,
                digit_frac: float, ignore_frac: float, hidden_size: int, seed: int = 0) -> Inputs:
    """Inputs for ``kind`` ``"logits"`` (``[N, V]`` standard normal) or ``"hidden"`` /
    ``"linear"`` (``hidden [N, H]`` standard normal, ``W [V, H]`` with std ``H^-1/2``, so
    logits ~ N(0, 1); the two kinds differ only in their default ``H``)."""
    ids = vocab.ids(device)
    values = vocab.values_on(device)
    lut = torch.full((V,), -1, dtype=torch.long, device=device)
    lut[ids] = torch.arange(len(ids), device=device)
    labels = make_labels(N, V, ids.cpu(), digit_frac=digit_frac, ignore_frac=ignore_frac, seed=seed).to(device)
    inp = Inputs(N, V, dtype, device, seed, labels, ids, values, lut, kind=kind,
                 widths=getattr(vocab, "widths", None))
    if kind == "logits":
        logits = torch.empty(N, V, dtype=dtype, device=device)
        logits.normal_(generator=_gen(seed + 1, device))
        inp.logits = logits.requires_grad_(True)
    elif kind in ("hidden", "linear"):
        g = _gen(seed + 2, device)
        inp.hidden = torch.empty(N, hidden_size, dtype=dtype, device=device).normal_(generator=g).requires_grad_(True)
        w = torch.empty(V, hidden_size, dtype=dtype, device=device).normal_(generator=g)
        with torch.no_grad():
            w.mul_(hidden_size ** -0.5)
        inp.weight = w.requires_grad_(True)
    else:
        raise ValueError(f"kind must be 'logits', 'hidden' or 'linear', got {kind!r}")
    return inp


# --------------------------------------------------------------------------- reference math


def ref_ntl(digit_logits: torch.Tensor, labels: torch.Tensor, lut: torch.Tensor, values: torch.Tensor,
            method: str) -> torch.Tensor:
    """Plain eager NTL (mean over digit-label rows), written out independently of ``ntl``.

    ``q = softmax(z)`` over the ``K`` digit logits; MSE ``(sum_k q_k v_k - y)^2``;
    W1 ``sum_k q_k |v_k - y|``; ``y`` the label's digit value.
    """
    k = torch.where(labels >= 0, lut[labels.clamp_min(0)], -1)
    active = k >= 0
    q = torch.softmax(digit_logits.float(), dim=-1)
    y = values[k.clamp_min(0)]
    if method == "mse":
        rows = (q @ values - y).square()
    else:
        rows = (q * (values[None, :] - y[:, None]).abs()).sum(-1)
    rows = torch.where(active, rows, torch.zeros((), device=rows.device))
    return rows.sum() / active.sum().clamp_min(1)


def expected_values(inp: Inputs, hidden_chunk: int = 256) -> dict[str, float]:
    """Float64 values every provider's loss is checked against (computed once per shape).

    Keys: ``mse``, ``w1`` (NTL), ``mse-rw``, ``w1-rw`` (ntloss's reweighing
    ``m L + 1.01 D (1 - m)``, ``m`` the full-softmax mass on digits, ``D`` 81 / 9),
    ``ce``, ``ce+w1``, ``ce+w1-rw``, ``ce/ga``, ``ce+w1/ga`` (divided by :data:`GA_STEPS`); for
    hidden inputs ``w1`` from ``hidden @ W[ids].T``;
    for linear inputs ``ce``, ``w1``, ``ce+w1`` from float64 logits ``hidden @ W.T``
    (:func:`_linear_expected`).
    """
    if inp.logits is None and inp.kind == "linear":
        return _linear_expected(inp)
    labels, lut, values = inp.labels, inp.lut, inp.values.double()
    k = torch.where(labels >= 0, lut[labels.clamp_min(0)], -1)
    active = k >= 0
    n_act = max(int(active.sum()), 1)
    y = values[k.clamp_min(0)]
    with torch.no_grad():
        if inp.logits is not None:
            z = inp.logits.detach().index_select(-1, inp.ids).double()
        else:
            z = inp.hidden.detach().double() @ inp.weight.detach()[inp.ids].double().T  # type: ignore[union-attr]
        q = torch.softmax(z, -1)
        rows = {"mse": (q @ values - y).square(), "w1": (q * (values[None] - y[:, None]).abs()).sum(-1)}
        out = {m: float(torch.where(active, r, 0.0).sum() / n_act) for m, r in rows.items()}
        if inp.logits is None:
            return {"w1": out["w1"]}
        # full-vocabulary log-sum-exp in float64, a chunk of rows at a time
        lse = torch.empty(inp.N, dtype=torch.float64, device=inp.device)
        for s in range(0, inp.N, hidden_chunk):
            lse[s:s + hidden_chunk] = torch.logsumexp(inp.logits.detach()[s:s + hidden_chunk].double(), -1)
        valid = labels != -100
        tgt = inp.logits.detach().gather(1, labels.clamp_min(0)[:, None])[:, 0].double()
        ce = float(torch.where(valid, lse - tgt, 0.0).sum() / max(int(valid.sum()), 1))
        mass = torch.exp(torch.logsumexp(z, -1) - lse)
        for m, D in (("mse", 81.0), ("w1", 9.0)):
            rw = rows[m] * mass + 1.01 * D * (1 - mass)
            out[f"{m}-rw"] = float(torch.where(active, rw, 0.0).sum() / n_act)
        out["ce"] = ce
        out["ce+w1"] = ce + NTL_WEIGHT * out["w1"]
        out["ce+w1-rw"] = ce + NTL_WEIGHT * out["w1-rw"]
        out["ce/ga"] = ce / GA_STEPS
        out["ce+w1/ga"] = out["ce+w1"] / GA_STEPS
    return out


def _linear_expected(inp: Inputs, vocab_block: int = 8192) -> dict[str, float]:
    """``ce``, ``w1``, ``ce+w1`` of ``hidden @ W.T`` in float64, a block of vocabulary rows of
    ``W`` at a time (online log-sum-exp), so no float64 copy of ``W`` or ``[N, V]`` logits."""
    labels, lut, values = inp.labels, inp.lut, inp.values.double()
    k = torch.where(labels >= 0, lut[labels.clamp_min(0)], -1)
    active, valid = k >= 0, labels != -100
    with torch.no_grad():
        h = inp.hidden.detach().double()  # type: ignore[union-attr]
        W = inp.weight.detach()  # type: ignore[union-attr]
        z = h @ W[inp.ids].double().T
        q = torch.softmax(z, -1)
        y = values[k.clamp_min(0)]
        w1 = float(torch.where(active, (q * (values[None] - y[:, None]).abs()).sum(-1), 0.0).sum()
                   / max(int(active.sum()), 1))
        m = torch.full((inp.N,), -math.inf, dtype=torch.float64, device=inp.device)
        s = torch.zeros(inp.N, dtype=torch.float64, device=inp.device)
        for v0 in range(0, inp.V, vocab_block):
            x = h @ W[v0:v0 + vocab_block].double().T
            m_new = torch.maximum(m, x.amax(1))
            s = s * torch.exp(m - m_new) + torch.exp(x - m_new[:, None]).sum(1)
            m = m_new
        tgt = (h * W[labels.clamp_min(0)].double()).sum(1)
        ce = float(torch.where(valid, m + s.log() - tgt, 0.0).sum() / max(int(valid.sum()), 1))
    return {"ce": ce, "w1": w1, "ce+w1": ce + NTL_WEIGHT * w1}


# --------------------------------------------------------------------------- context + providers


@dataclass
class Ctx:
    """What providers share across shapes: tokenizer, ntl vocab, ntloss criteria, compiled fns."""

    tokenizer: Any
    vocab: Any
    V: int
    cache: dict[Any, Any] = field(default_factory=dict)

    def ntloss(self, method: str, reweigh: bool) -> Any:
        method = "mse" if method == "mse" else "w1"
        key = ("ntloss", method, reweigh)
        if self.tokenizer is None:
            raise Unavailable("ntloss needs the tokenizer (this process has digit ids only)")
        if not self.vocab.is_digit_vocab:
            raise Unavailable(f"ntloss is compared at digit level (digit_level=True); this run's vocab is a "
                              f"{type(self.vocab).__name__} of K={self.vocab.K} number tokens")
        if key not in self.cache:
            try:
                import ntloss
            except ImportError as e:
                raise Unavailable("ntloss is not installed (pip install ntloss)") from e
            cls = ntloss.NTLossDotProduct if method == "mse" else ntloss.NTLoss
            self.cache[key] = cls(tokenizer=self.tokenizer, vocab_size=self.V, digit_level=True,
                                  reweigh=reweigh)
        return self.cache[key]

    def compiled(self, name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``torch.compile(fn)`` for the current shape: Dynamo's caches are reset first, so
        a run over many (N, dtype) never reaches its recompile limit (and silently runs eager)."""
        import torch._dynamo

        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)


Builder = Callable[[Ctx, Inputs], Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class Provider:
    """One implementation measured in a case."""

    key: str
    label: str
    build: Builder
    expect: str | None  # key of expected_values() the loss must match, None: no check
    gpu_only: bool = False
    quick: bool = True  # part of --quick
    cpu: bool = True  # measured on CPU at all (some are far too slow there)
    inplace: bool = False  # overwrites the logits


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    inputs: str  # "logits" | "hidden"
    providers: tuple[Provider, ...]
    ntl_key: str  # provider the "x ntl" ratios refer to
    ce_ref: tuple[str, str]  # (case, provider) the "x CE" ratios refer to
    quick: bool = True
    quick_cpu: bool = True
    #: extra float64 reference values for this case's providers (merged over expected_values)
    expected: Callable[[Inputs], dict[str, float]] | None = None
    #: (N, V, digit_frac, ignore_frac): the case runs once per dtype at this shape only
    fixed: tuple[int, int, float, float] | None = None
    hidden_size: tuple[int, int] | None = None  # default H (CPU, GPU) when --hidden-size is not given
    cpu_ns: tuple[int, ...] | None = None  # default N on CPU when --n is not given
    #: runs with any number vocab (``--tokenizer llama3``: 1,110 multi-digit number tokens);
    #: False: digit-level only (the ntloss-parity cases compare against ntloss's digit-level losses)
    any_vocab: bool = False


def _ntl_attr(name: str) -> Any:
    import ntl

    fn = getattr(ntl, name, None)
    if fn is None:
        raise Unavailable(f"ntl.{name} is not available in this ntl build")
    return fn


def _gpu_only(inp: Inputs) -> None:
    if inp.device.type != "cuda":
        raise Unavailable("GPU only")


def _liger_ce(inp: Inputs) -> Any:
    _gpu_only(inp)
    try:
        # an optional baseline, not in the lock files (Unavailable when absent)
        from liger_kernel.transformers import LigerCrossEntropyLoss  # pyright: ignore[reportMissingImports]
    except ImportError as e:
        raise Unavailable("liger_kernel is not installed (pip install liger-kernel)") from e
    return LigerCrossEntropyLoss(ignore_index=-100, reduction="mean")


def _req(t: torch.Tensor | None) -> torch.Tensor:
    """``t``, a tensor this input's kind provides (``logits``, or ``hidden`` and ``weight``)."""
    if t is None:
        raise ValueError("this provider needs the inputs of the other kind (logits / hidden)")
    return t


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _ntloss_call(crit: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return crit(logits.view(1, *logits.shape), labels.view(1, -1))


# -- standalone NTL on logits


def _standalone(method: str) -> tuple[Provider, ...]:
    fn_name = "ntl_mse_loss" if method == "mse" else "ntl_wasserstein_loss"
    ref_method = "mse" if method == "mse" else "w1"

    def b_ntl(ctx: Ctx, inp: Inputs):
        f = _ntl_attr(fn_name)
        return lambda: f(inp.logits, inp.labels, ctx.vocab)

    def ref(logits, labels, ids, lut, values):
        return ref_ntl(logits.index_select(-1, ids), labels, lut, values, ref_method)

    def b_ref(ctx: Ctx, inp: Inputs):
        return lambda: ref(inp.logits, inp.labels, inp.ids, inp.lut, inp.values)

    def b_compile(ctx: Ctx, inp: Inputs):
        _gpu_only(inp)
        f = ctx.compiled(f"ntl-{method}", ref)
        return lambda: f(inp.logits, inp.labels, inp.ids, inp.lut, inp.values)

    def b_ntloss(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            crit = ctx.ntloss(method, reweigh)
            return lambda: _ntloss_call(crit, _req(inp.logits), inp.labels)
        return b

    return (
        Provider("ntl", f"ntl.{fn_name}", b_ntl, ref_method),
        Provider("torch-ref", "eager PyTorch reference", b_ref, ref_method),
        Provider("torch-compile", "torch.compile(reference)", b_compile, ref_method, gpu_only=True),
        Provider("ntloss", "ntloss (reweigh=False)", b_ntloss(False), ref_method),
        Provider("ntloss-rw", "ntloss (default reweigh=True)", b_ntloss(True), f"{ref_method}-rw",
                 quick=False),
    )


# -- cross-entropy + NTL


def _ce_ntl() -> tuple[Provider, ...]:
    w = NTL_WEIGHT

    def b_ce(ctx: Ctx, inp: Inputs):
        return lambda: F.cross_entropy(_req(inp.logits), inp.labels)

    def b_fused(inplace: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("cross_entropy_with_ntl")
            kw = {"inplace": True} if inplace else {}
            return lambda: _first(f(inp.logits, inp.labels, ctx.vocab, ntl_weight=w, method="wasserstein", **kw))
        return b

    def b_fused_ga(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("cross_entropy_with_ntl")
        k = GA_STEPS
        return lambda: f(inp.logits, inp.labels, ctx.vocab, ntl_weight=w, method="wasserstein", inplace=True,
                         grad_scale=1.0 / k) / k

    def b_unfused(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("ntl_wasserstein_loss")
        return lambda: F.cross_entropy(_req(inp.logits), inp.labels) + w * f(_req(inp.logits), inp.labels, ctx.vocab)

    def ref(logits, labels, ids, lut, values):
        return F.cross_entropy(logits, labels) + w * ref_ntl(logits.index_select(-1, ids), labels, lut, values, "w1")

    def b_ref(ctx: Ctx, inp: Inputs):
        return lambda: ref(inp.logits, inp.labels, inp.ids, inp.lut, inp.values)

    def b_compile(ctx: Ctx, inp: Inputs):
        _gpu_only(inp)
        f = ctx.compiled("ce+ntl", ref)
        return lambda: f(inp.logits, inp.labels, inp.ids, inp.lut, inp.values)

    def b_ntloss(reweigh: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            crit = ctx.ntloss("w1", reweigh)
            return lambda: F.cross_entropy(_req(inp.logits), inp.labels) + w * _ntloss_call(crit, _req(inp.logits), inp.labels)
        return b

    def b_liger_ga(ctx: Ctx, inp: Inputs):
        ce = _liger_ce(inp)
        return lambda: _first(ce(inp.logits, inp.labels)) / GA_STEPS

    def b_liger(with_ntl: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            ce = _liger_ce(inp)
            if not with_ntl:
                return lambda: _first(ce(inp.logits, inp.labels))
            f = _ntl_attr("ntl_wasserstein_loss")

            def run():  # NTL first: Liger's CE overwrites the logits with their gradient
                n = f(inp.logits, inp.labels, ctx.vocab)
                return _first(ce(inp.logits, inp.labels)) + w * n
            return run
        return b

    return (
        Provider("ce", "F.cross_entropy alone", b_ce, "ce"),
        Provider("ntl-fused", "ntl.cross_entropy_with_ntl", b_fused(False), "ce+w1"),
        Provider("ce+ntl", "F.cross_entropy + ntl.ntl_wasserstein_loss", b_unfused, "ce+w1", quick=False),
        Provider("torch-ref", "eager PyTorch reference (CE + W1)", b_ref, "ce+w1", quick=False),
        Provider("torch-compile", "torch.compile(reference)", b_compile, "ce+w1", gpu_only=True),
        Provider("ce+ntloss", "F.cross_entropy + ntloss (reweigh=False)", b_ntloss(False), "ce+w1"),
        Provider("ce+ntloss-rw", "F.cross_entropy + ntloss (default reweigh=True)", b_ntloss(True), "ce+w1-rw",
                 quick=False),
        Provider("liger-ce", "Liger cross-entropy alone (in place)", b_liger(False), "ce", gpu_only=True,
                 inplace=True),
        Provider("liger-ce+ntl", "Liger cross-entropy + ntl.ntl_wasserstein_loss", b_liger(True), "ce+w1",
                 gpu_only=True, inplace=True),
        Provider("ntl-fused-inplace", "ntl.cross_entropy_with_ntl(inplace=True)", b_fused(True), "ce+w1",
                 inplace=True),
        Provider("ntl-fused-inplace-ga", f"ntl.cross_entropy_with_ntl(inplace=True, grad_scale=1/{GA_STEPS}) "
                 f"/ {GA_STEPS} (a gradient-accumulation step)", b_fused_ga, "ce+w1/ga", gpu_only=True,
                 inplace=True),
        Provider("liger-ce-ga", f"Liger cross-entropy alone / {GA_STEPS} (a gradient-accumulation step)",
                 b_liger_ga, "ce/ga", gpu_only=True, inplace=True),
    )


# -- NTL from hidden states


def _hidden() -> tuple[Provider, ...]:
    def b_lmhead_ce(ctx: Ctx, inp: Inputs):
        return lambda: F.cross_entropy(_req(inp.hidden) @ _req(inp.weight).T, inp.labels)

    def b_from_hidden(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("ntl_loss_from_hidden")
        return lambda: f(inp.hidden, inp.weight, inp.labels, ctx.vocab, method="wasserstein")

    def b_logits_ntl(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("ntl_wasserstein_loss")
        return lambda: f(_req(inp.hidden) @ _req(inp.weight).T, inp.labels, ctx.vocab)

    def ref(hidden, weight, labels, ids, lut, values):
        return ref_ntl(hidden @ weight[ids].T, labels, lut, values, "w1")

    def b_ref(ctx: Ctx, inp: Inputs):
        return lambda: ref(inp.hidden, inp.weight, inp.labels, inp.ids, inp.lut, inp.values)

    def b_compile(ctx: Ctx, inp: Inputs):
        _gpu_only(inp)
        f = ctx.compiled("hidden", ref)
        return lambda: f(inp.hidden, inp.weight, inp.labels, inp.ids, inp.lut, inp.values)

    def b_ntloss(ctx: Ctx, inp: Inputs):
        crit = ctx.ntloss("w1", False)
        return lambda: _ntloss_call(crit, _req(inp.hidden) @ _req(inp.weight).T, inp.labels)

    return (
        Provider("lm-head+ce", "LM head (hidden @ W.T) + F.cross_entropy", b_lmhead_ce, None),
        Provider("ntl-from-hidden", "ntl.ntl_loss_from_hidden", b_from_hidden, "w1"),
        Provider("logits+ntl", "hidden @ W.T then ntl.ntl_wasserstein_loss", b_logits_ntl, "w1"),
        Provider("torch-ref", "eager reference on hidden @ W[ids].T", b_ref, "w1"),
        Provider("torch-compile", "torch.compile(reference)", b_compile, "w1", gpu_only=True),
        Provider("logits+ntloss", "hidden @ W.T then ntloss (reweigh=False)", b_ntloss, "w1", quick=False,
                 cpu=False),
    )


# -- cross-entropy + NTL from hidden states (linear head)


def _linear() -> tuple[Provider, ...]:
    w = NTL_WEIGHT

    def b_logits(inplace: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            f = _ntl_attr("cross_entropy_with_ntl")
            kw = {"inplace": True} if inplace else {}
            return lambda: f(_req(inp.hidden) @ _req(inp.weight).T, inp.labels, ctx.vocab, ntl_weight=w, **kw)
        return b

    def b_ours(ctx: Ctx, inp: Inputs):
        f = _ntl_attr("linear_cross_entropy_with_ntl")
        return lambda: f(inp.hidden, inp.weight, inp.labels, ctx.vocab, ntl_weight=w)

    def b_torch(chunked: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            f = getattr(F, "linear_cross_entropy", None)
            opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
            if f is None or (chunked and opts is None):
                raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy"
                                  + (" options" if f is not None else ""))
            kw = {"options": opts()} if chunked and opts is not None else {}
            return lambda: f(inp.hidden, inp.weight, inp.labels, **kw)
        return b

    def b_liger(with_ntl: bool) -> Builder:
        def b(ctx: Ctx, inp: Inputs):
            _gpu_only(inp)
            try:
                # an optional baseline, not in the lock files (Unavailable when absent)
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # pyright: ignore[reportMissingImports]
            except ImportError as e:
                raise Unavailable("liger_kernel is not installed (pip install liger-kernel)") from e
            flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
            if not with_ntl:
                return lambda: _first(flce(inp.weight, inp.hidden, inp.labels))
            f = _ntl_attr("ntl_loss_from_hidden")
            return lambda: (_first(flce(inp.weight, inp.hidden, inp.labels))
                            + w * f(inp.hidden, inp.weight, inp.labels, ctx.vocab))
        return b

    def b_cce(ctx: Ctx, inp: Inputs):
        _gpu_only(inp)
        try:
            # an optional baseline, not in the lock files (Unavailable when absent)
            from cut_cross_entropy import linear_cross_entropy  # pyright: ignore[reportMissingImports]
        except ImportError as e:
            raise Unavailable("cut-cross-entropy is not installed (pip install cut-cross-entropy)") from e
        return lambda: linear_cross_entropy(inp.hidden, inp.weight, inp.labels)

    return (
        Provider("logits+fused", "hidden @ W.T + ntl.cross_entropy_with_ntl (logits path)", b_logits(False),
                 "ce+w1"),
        Provider("logits+fused-inplace", "hidden @ W.T + ntl.cross_entropy_with_ntl(inplace=True)",
                 b_logits(True), "ce+w1", quick=False),
        Provider("torch-lce", "F.linear_cross_entropy (CE only, options=None: unchunked)", b_torch(False), "ce",
                 quick=False),
        Provider("torch-lce-chunked", "F.linear_cross_entropy (CE only, LinearCrossEntropyOptions())",
                 b_torch(True), "ce"),
        Provider("ntl-linear", "ntl.linear_cross_entropy_with_ntl", b_ours, "ce+w1"),
        Provider("liger-flce", "Liger fused linear CE (CE only)", b_liger(False), "ce", gpu_only=True),
        Provider("liger-flce+ntl", "Liger fused linear CE + ntl.ntl_loss_from_hidden", b_liger(True), "ce+w1",
                 gpu_only=True),
        Provider("cce", "Cut Cross-Entropy (CE only)", b_cce, "ce", gpu_only=True),
    )


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("ntl-mse", "Standalone NTL-MSE on logits [N, V]", "logits", _standalone("mse"), "ntl",
             ("ce+ntl", "ce"), quick=False, any_vocab=True),
        Case("ntl-w1", "Standalone NTL-W1 on logits [N, V]", "logits", _standalone("wasserstein"), "ntl",
             ("ce+ntl", "ce"), any_vocab=True),
        Case("ce+ntl", f"Cross-entropy + {NTL_WEIGHT} x NTL-W1 on logits [N, V]", "logits", _ce_ntl(),
             "ntl-fused", ("ce+ntl", "ce"), any_vocab=True),
        Case("hidden", "NTL-W1 from hidden states [N, H] and the LM head W [V, H]", "hidden", _hidden(),
             "ntl-from-hidden", ("hidden", "lm-head+ce"), quick_cpu=False,
             any_vocab=True),
        Case("linear", f"Cross-entropy + {NTL_WEIGHT} x NTL-W1 from hidden [N, H] and W [V, H]", "linear",
             _linear(), "ntl-linear", ("linear", "logits+fused"), quick_cpu=False, hidden_size=(896, 3584),
             cpu_ns=(2048,), any_vocab=True),
    )
}


def rel_err(value: float, expected: float) -> float:
    """``|value - expected| / max(|expected|, 1e-6)`` (inf for non-finite values)."""
    if not math.isfinite(value):
        return math.inf
    return abs(value - expected) / max(abs(expected), 1e-6)
