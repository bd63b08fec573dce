"""Every registered method through every entry point, on both backends.

For each method (MSE, MAE, Huber with a non-default delta, W1, squashed W1, DEL with and without
place weights, DIST² with a non-default tau):

* the standalone ``ntl_loss`` equals an independent float64 formula written here (softmax
  over the number columns; MSE/MAE/Huber of ``E[v] - y``; W1 ``sum_k q_k |v_k - y|``, squashed
  ``1 + (d - d_min)(f - 1)/(d_max - d_min)`` for ``d > 0``; ``reweigh``'s ``m L + 1.01 D (1 - m)``
  with ``D`` the method's largest loss; DEL ``pw (1/K) sum_k q_k BCE(sigmoid(z_k), [k = t])``,
  DIST² ``KL(t || q)``), gradient against autograd of that formula; DEL and DIST² are unbounded,
  so every entry point refuses them with ``reweigh=True``;
* the fused (``cross_entropy_with_ntl``) and linear (``linear_cross_entropy_with_ntl``) entry
  points equal ``F.cross_entropy + w * ntl_loss`` in value and gradient; ``ntl_loss_from_hidden``,
  ``ntl_loss_from_digit_logits`` and ``NumberTokenLoss`` equal ``ntl_loss`` itself. The
  references run on the PyTorch backend, the entry points on ``backend="torch"`` and
  ``"triton"`` (the interpreter without a GPU). Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ntl
from ntl.methods import DEL, DIST2, MAE, MSE, W1, Huber, Method

sys.path.insert(0, str(Path(__file__).parent))
from test_methods_del_dist2 import del64, dist64, place_weights_by_loop

V, H, N = 64, 16, 20
IDS = [41, 3, 17, 8, 22, 0, 63, 12, 26, 5]  # '0'..'9'
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)
TEXT = [1, 2, 20, 38]
POINT = 2  # a text id that DEL's place weights take for the decimal point
W_NTL = 0.4
TOL: dict[str, Any] = {"rtol": 2e-5, "atol": 2e-5}
GTOL: dict[str, Any] = {"rtol": 2e-5, "atol": 1e-4}  # weight gradients sum over rows

METHODS: dict[str, Method] = {
    "mse": MSE(), "mae": MAE(), "huber-2.5": Huber(delta=2.5), "w1": W1(), "w1-squash-3": W1(squash_factor=3.0),
    "del": DEL(decimal_point_id=POINT), "del-flat": DEL(place_weights=False), "dist2-0.5": DIST2(tau=0.5),
}


def refuses_reweigh(method: Method, reweigh: bool, call) -> bool:
    """Unbounded methods refuse ``reweigh=True`` (True: refused, the case is done)."""
    if not (reweigh and not method.bounded):
        return False
    with pytest.raises(ValueError, match=f"method '{method.name}' is unbounded"):
        call()
    return True
BACKENDS = ["torch", "triton"]


def batch(seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [N, V], labels [N], weights [N])``: digits, text and one ignored label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g) * scale
    d = torch.tensor(IDS)[torch.randint(0, 10, (N,), generator=g)]
    t = torch.tensor(TEXT)[torch.randint(0, len(TEXT), (N,), generator=g)]
    y = torch.where(torch.rand(N, generator=g) < 0.7, d, t)
    y[1] = -100
    y[0] = IDS[6]
    y[3:7] = torch.tensor([IDS[1], IDS[2], POINT, IDS[5]])  # '12.5': integer and decimal places
    w = torch.rand(N, generator=g) * 2
    return x, y, w


# --------------------------------------------------------------------------- float64 formula
def formula64(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, method: Method, reweigh: bool) -> torch.Tensor:
    """The weighted-mean NTL in float64, written out from the paper's / ntloss's definitions."""
    values = torch.arange(10, dtype=torch.float64)
    lab = {tid: k for k, tid in enumerate(IDS)}
    rows = [i for i in range(N) if int(y[i]) in lab]
    xs = x.double()[rows]
    q = torch.softmax(xs[:, IDS], -1)
    yv = values[[lab[int(y[i])] for i in rows]]
    r = q @ values - yv
    dmax = 9.0
    D = 0.0
    if isinstance(method, DEL):
        seq = torch.tensor([[lab.get(int(t), 10 if int(t) == POINT else 11) for t in y]])
        pw = place_weights_by_loop(seq, 10)[0, rows] if method.place_weights else None
        L = del64(xs[:, IDS], torch.tensor([lab[int(y[i])] for i in rows]), pw)
    elif isinstance(method, DIST2):
        L = dist64(xs[:, IDS], yv, values, method.tau)
    elif isinstance(method, MSE):
        L, D = r * r, dmax * dmax
    elif isinstance(method, MAE):
        L, D = r.abs(), dmax
    elif isinstance(method, Huber):
        dl = 2.5
        L = torch.where(r.abs() < dl, 0.5 * r * r, dl * (r.abs() - 0.5 * dl))
        D = dl * (dmax - 0.5 * dl)
    else:
        d = (values[None, :] - yv[:, None]).abs()
        f = method.squash_factor if isinstance(method, W1) else None
        if f is not None:  # closest distinct value 1, farthest f (digits: d_min = 1, d_max = 9)
            d = torch.where(d > 0, 1.0 + (d - 1.0) * (f - 1.0) / (dmax - 1.0), 0.0)
        L, D = (q * d).sum(-1), (f if f is not None else dmax)
    if reweigh:
        m = torch.softmax(xs, -1)[:, IDS].sum(-1)
        L = m * L + 1.01 * D * (1 - m)
    ww = w.double()[rows]
    return (ww * L).sum() / ww.sum()


@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(METHODS))
def test_standalone_matches_float64_formula(name, backend, reweigh):
    method = METHODS[name]
    x, y, w = batch(1)
    if refuses_reweigh(method, reweigh, lambda: ntl.ntl_loss(x, y, VOCAB, method=method, reweigh=True,
                                                             backend=backend)):
        return
    xa = x.clone().requires_grad_(True)
    got = ntl.ntl_loss(xa, y, VOCAB, method=method, weights=w, reweigh=reweigh, backend=backend)
    got.backward()
    xr = x.double().requires_grad_(True)
    ref = formula64(xr, y, w, method, reweigh)
    ref.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)


def test_the_formula_sees_every_branch():
    """Positive control: Huber's rows fall on both sides of delta, and the methods differ."""
    x, y, w = batch(1)
    vals = [float(formula64(x, y, w, m, False)) for m in METHODS.values()]
    assert len({round(v, 6) for v in vals}) == len(vals)
    k = VOCAB.digit_index(y, V)
    q = torch.softmax(x[k >= 0][:, IDS], -1)
    r = (q @ torch.arange(10.0) - k[k >= 0].float()).abs()
    assert (r < 2.5).any() and (r > 2.5).any()


# --------------------------------------------------------------------------- the name + keyword forms
def test_names_and_keywords_equal_the_objects():
    x, y, w = batch(2)
    pairs = [({"method": "huber", "huber_delta": 2.5}, Huber(2.5)), ({"method": "w1"}, W1()),
             ({"method": "wasserstein", "squash_factor": 3.0}, W1(3.0)), ({"method": "mae"}, MAE())]
    for kw, obj in pairs:
        a = ntl.ntl_loss(x, y, VOCAB, weights=w, backend="torch", **kw)
        b = ntl.ntl_loss(x, y, VOCAB, weights=w, backend="torch", method=obj)
        assert torch.equal(a, b), kw
        c = ntl.cross_entropy_with_ntl(x, y, VOCAB, backend="torch", **kw)
        d = ntl.cross_entropy_with_ntl(x, y, VOCAB, backend="torch", method=obj)
        assert torch.equal(c, d), kw


# --------------------------------------------------------------------------- fused CE + NTL
FUSED_CASES = [("mean", True, False), ("sum", False, True), ("none", True, False)]


@pytest.mark.parametrize(("reduction", "use_w", "reweigh"), FUSED_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(METHODS))
def test_fused_equals_ce_plus_standalone(name, backend, reduction, use_w, reweigh):
    method = METHODS[name]
    x, y, w = batch(3)
    if refuses_reweigh(method, reweigh, lambda: ntl.cross_entropy_with_ntl(
            x, y, VOCAB, method=method, reweigh=True, backend=backend)):
        return
    wts = w if use_w else None
    up = torch.rand(N, generator=torch.Generator().manual_seed(9)) if reduction == "none" else torch.ones(())
    xa = x.clone().requires_grad_(True)
    got = ntl.cross_entropy_with_ntl(xa, y, VOCAB, ntl_weight=W_NTL, method=method, weights=wts,
                                     reduction=reduction, reweigh=reweigh, backend=backend)
    (got * up).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = (F.cross_entropy(xr, y, reduction=reduction)
           + W_NTL * ntl.ntl_loss(xr, y, VOCAB, method=method, weights=wts, reduction=reduction,
                                  reweigh=reweigh, backend="torch"))
    (ref * up).sum().backward()
    torch.testing.assert_close(got, ref.detach(), **TOL)
    torch.testing.assert_close(xa.grad, xr.grad, **TOL)


def test_fused_weights_change_the_loss():
    """Positive control for the weighted cases: other weights, another loss."""
    x, y, w = batch(3)
    a = ntl.cross_entropy_with_ntl(x, y, VOCAB, weights=w, backend="torch")
    b = ntl.cross_entropy_with_ntl(x, y, VOCAB, weights=w.flip(0), backend="torch")
    assert not torch.allclose(a, b)
    # integer / bool weights (an attention mask) as ntl_loss takes them
    m = (torch.arange(N) % 3 != 0)
    for mask in (m, m.long()):
        got = ntl.cross_entropy_with_ntl(x, y, VOCAB, weights=mask, method="mse", backend="torch")
        ref = F.cross_entropy(x, y) + 0.3 * ntl.ntl_loss(x, y, VOCAB, weights=mask, method="mse")
        torch.testing.assert_close(got, ref, **TOL)


def test_fused_weights_errors():
    x, y, w = batch(3)
    with pytest.raises(ValueError, match="weights shape"):
        ntl.cross_entropy_with_ntl(x, y, VOCAB, weights=w[:5])
    with pytest.raises(ValueError, match="does not differentiate weights"):
        ntl.cross_entropy_with_ntl(x.clone().requires_grad_(True), y, VOCAB, weights=w.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        ntl.cross_entropy_with_ntl(x, y, VOCAB, weights=-w)


# --------------------------------------------------------------------------- linear CE + NTL
LINEAR_CASES = [("mean", False), ("none", True)]


def head(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.6, torch.randn(V, generator=g)


@pytest.mark.parametrize(("reduction", "reweigh"), LINEAR_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(METHODS))
def test_linear_equals_ce_plus_standalone(name, backend, reduction, reweigh):
    method = METHODS[name]
    _, y, _ = batch(4)
    h, Wt, b = head(4)
    if refuses_reweigh(method, reweigh, lambda: ntl.linear_cross_entropy_with_ntl(
            h, Wt, y, VOCAB, method=method, reweigh=True, backend=backend)):
        return
    up = torch.rand(N, generator=torch.Generator().manual_seed(9)) if reduction == "none" else torch.ones(())
    la = [t.clone().requires_grad_(True) for t in (h, Wt, b)]
    got = ntl.linear_cross_entropy_with_ntl(la[0], la[1], y, VOCAB, bias=la[2], ntl_weight=W_NTL,
                                            method=method, reduction=reduction, reweigh=reweigh,
                                            chunk_size=8, backend=backend)
    (got * up).sum().backward()
    lb = [t.clone().requires_grad_(True) for t in (h, Wt, b)]
    x = F.linear(lb[0], lb[1], lb[2])
    ref = (F.cross_entropy(x, y, reduction=reduction)
           + W_NTL * ntl.ntl_loss(x, y, VOCAB, method=method, reduction=reduction, reweigh=reweigh,
                                  backend="torch"))
    (ref * up).sum().backward()
    torch.testing.assert_close(got, ref.detach(), **TOL)
    for ga, gb in zip(la, lb, strict=True):
        torch.testing.assert_close(ga.grad, gb.grad, **GTOL)


# --------------------------------------------------------------------------- hidden / digit logits / module
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(METHODS))
def test_hidden_equals_standalone(name, backend):
    method = METHODS[name]
    _, y, w = batch(5)
    h, Wt, b = head(5)
    la = [t.clone().requires_grad_(True) for t in (h, Wt, b)]
    got = ntl.ntl_loss_from_hidden(la[0], la[1], y, VOCAB, bias=la[2], method=method, weights=w,
                                   temperature=0.8, backend=backend)
    got.backward()
    lb = [t.clone().requires_grad_(True) for t in (h, Wt, b)]
    ref = ntl.ntl_loss(F.linear(lb[0], lb[1], lb[2]) / 0.8, y, VOCAB, method=method, weights=w,
                       backend="torch")
    ref.backward()
    torch.testing.assert_close(got, ref.detach(), **TOL)
    for ga, gb in zip(la, lb, strict=True):
        torch.testing.assert_close(ga.grad, gb.grad, **GTOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(METHODS))
def test_digit_logits_and_module_equal_standalone(name, backend):
    method = METHODS[name]
    x, y, w = batch(6)
    xa = x.clone().requires_grad_(True)
    got = ntl.ntl_loss_from_digit_logits(xa[:, IDS], y, VOCAB, method=method, weights=w,
                                         reduction="sum", backend=backend)
    got.backward()
    xr = x.clone().requires_grad_(True)
    ref = ntl.ntl_loss(xr, y, VOCAB, method=method, weights=w, reduction="sum", backend="torch")
    ref.backward()
    torch.testing.assert_close(got, ref.detach(), **TOL)
    torch.testing.assert_close(xa.grad, xr.grad, **TOL)
    crit = ntl.NumberTokenLoss(VOCAB, method=method, backend=backend)
    torch.testing.assert_close(crit(x, y, weights=w),
                               ntl.ntl_loss(x, y, VOCAB, method=method, weights=w, backend="torch"), **TOL)
