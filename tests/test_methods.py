"""ntl.methods: the registry, resolution of names / objects / legacy keywords, errors,
hashability and torch.compile, and that a new method is one registered subclass."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import ntl
from ntl import checks
from ntl.methods import (
    MAE,
    MSE,
    REGISTRY,
    W1,
    Huber,
    Method,
    RowScalars,
    register,
    resolve,
    unregister,
)

DIGITS = list(range(10))  # token id k is digit k (V = 12: ids 10, 11 are text)
VOCAB = ntl.DigitVocab(DIGITS, vocab_size=12)


def batch(seed: int = 0, N: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 12, generator=g) * 2
    y = torch.randint(0, 12, (N,), generator=g)
    y[0], y[1] = 7, -100
    return x, y


# --------------------------------------------------------------------------- registry and resolve
def test_registry_names_codes_and_aliases():
    assert list(REGISTRY) == ["mse", "mae", "huber", "wasserstein", "del", "dist2"]
    assert {n: c.code for n, c in REGISTRY.items()} == {"mse": 0, "mae": 2, "huber": 3, "wasserstein": 1,
                                                         "del": 4, "dist2": 5}
    assert REGISTRY["wasserstein"].aliases == ("w1",)
    assert ntl.methods is __import__("ntl.methods").methods
    # the kernels read the codes from the registry: no table of their own
    import ntl.kernels.ce_ntl as ce_ntl
    import ntl.kernels.ntl_loss as ntl_loss

    assert not hasattr(ntl_loss, "_METHOD") and not hasattr(ce_ntl, "_METHOD")
    assert ntl.methods.kernel_code("w1") == 1 and ntl.methods.kernel_code("huber") == 3


@pytest.mark.parametrize(("arg", "kw", "want"), [
    ("mse", {}, MSE()),
    ("mae", {}, MAE()),
    ("huber", {}, Huber(1.0)),
    ("huber", {"huber_delta": 2}, Huber(2.0)),
    ("wasserstein", {}, W1()),
    ("w1", {}, W1()),
    ("w1", {"squash_factor": 3}, W1(3.0)),
    (Huber(2.0), {}, Huber(2.0)),
    (Huber(2.0), {"huber_delta": 2.0}, Huber(2.0)),  # agreeing keyword: fine
    (W1(3.0), {"squash_factor": 3}, W1(3.0)),
])
def test_resolve(arg, kw, want):
    got = resolve(arg, **kw)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(("arg", "kw", "err", "match"), [
    (W1(squash_factor=3.0), {"squash_factor": 2.0}, ValueError, r"squash_factor=2.0 conflicts with method=W1\(squash_factor=3.0\)"),
    (W1(), {"squash_factor": 2.0}, ValueError, "conflicts"),
    (Huber(2.0), {"huber_delta": 1.0}, ValueError, "huber_delta=1.0 conflicts"),
    (MSE(), {"squash_factor": 2.0}, ValueError, "squash_factor applies to the Wasserstein loss only, not method='mse'"),
    ("mse", {"huber_delta": 2.0}, ValueError, "huber_delta applies to the Huber loss only, not method='mse'"),
    ("huber", {"squash_factor": 2.0}, ValueError, "squash_factor applies to the Wasserstein loss only"),
    ("l2", {}, ValueError, r"method must be one of \['mse', 'mae', 'huber', 'wasserstein', 'del', 'dist2'\] \(or 'w1', an alias of 'wasserstein'\)"),
    (3, {}, ValueError, "method must be one of"),
    (None, {}, ValueError, "got None"),
    ("huber", {"huber_delta": 0}, ValueError, "huber_delta must be a positive finite number, got 0"),
    ("huber", {"huber_delta": "1"}, TypeError, "huber_delta must be a positive number, got str"),
    ("w1", {"squash_factor": 1.0}, ValueError, r"squash_factor must be a finite number > 1 \(1 would be cross-entropy\)"),
    ("w1", {"squash_factor": True}, TypeError, "squash_factor must be a number > 1 or None, got bool"),
])
def test_resolve_errors(arg, kw, err, match):
    with pytest.raises(err, match=match):
        resolve(arg, **kw)


def test_method_objects_validate_their_parameters():
    with pytest.raises(ValueError, match="huber_delta must be a positive finite number"):
        Huber(float("nan"))
    with pytest.raises(TypeError, match="huber_delta must be a positive number, got str"):
        Huber("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="squash_factor must be a finite number > 1"):
        W1(0.5)
    assert Huber(2) == Huber(2.0) and Huber(2).delta == 2.0 and isinstance(Huber(2).delta, float)


def test_check_method_returns_the_canonical_name_for_strings():
    # ntl.checks.check_method is what the adapters store: a string stays a string
    assert checks.check_method("w1") == "wasserstein"
    for n in ("mse", "mae", "huber", "wasserstein"):
        assert checks.check_method(n) == n
    assert checks.check_method(Huber(2.0)) == Huber(2.0)
    with pytest.raises(ValueError, match=r"NTLConfig\.ntl_method must be one of"):
        checks.check_method("l1", "NTLConfig.ntl_method")


def test_entry_points_refuse_conflicts():
    x, y = batch()
    for call in (lambda: ntl.ntl_loss(x, y, VOCAB, method=W1(3.0), squash_factor=2.0),
                 lambda: ntl.cross_entropy_with_ntl(x, y, VOCAB, method=W1(3.0), squash_factor=2.0),
                 lambda: ntl.NumberTokenLoss(VOCAB, method=Huber(2.0), huber_delta=3.0),
                 lambda: ntl.ntl_dot_loss(x, y, VOCAB, error=Huber(2.0), huber_delta=3.0),
                 lambda: ntl.ntl_loss_from_digit_logits(x[:, :10], y, VOCAB, method="mse", huber_delta=2.0)):
        with pytest.raises(ValueError, match=r"conflicts|applies to"):
            call()
    with pytest.raises(ValueError, match="error must be one of"):
        ntl.ntl_dot_loss(x, y, VOCAB, error=W1())


def test_target_dist_only_with_a_method_that_takes_it():
    x, y = batch()
    soft = torch.full((9, 10), 0.1)
    with pytest.raises(ValueError, match="target_dist is only supported with method='wasserstein', not 'huber'"):
        ntl.ntl_loss(x, y, VOCAB, method=Huber(2.0), target_dist=soft)


# --------------------------------------------------------------------------- per-method constants
def test_max_loss_and_kernel_scalars_by_hand():
    # digits: d = v_max - v_min = 9
    assert MSE().max_loss(VOCAB) == 81.0
    assert MAE().max_loss(VOCAB) == 9.0
    assert Huber(2.5).max_loss(VOCAB) == pytest.approx(2.5 * (9 - 1.25))  # delta (d - delta / 2)
    assert Huber(20.0).max_loss(VOCAB) == pytest.approx(0.5 * 81)  # d < delta: d^2 / 2
    assert W1().max_loss(VOCAB) == 9.0
    assert W1(3.0).max_loss(VOCAB) == 3.0
    # squashed W1: b = (3 - 1) / (9 - 1) = 0.25, a = 1 - b * 1 = 0.75
    assert W1(3.0).kernel_scalars(VOCAB) == RowScalars(sq_a=0.75, sq_b=0.25, delta=1.0)
    assert Huber(2.5).kernel_scalars(VOCAB) == RowScalars(0.0, 1.0, 2.5)
    assert MSE().kernel_scalars(VOCAB) == RowScalars()


def test_reweigh_ceiling_per_method_by_hand():
    # a row whose whole mass sits on a text token: m = 0, so L' = D = 1.01 max_loss
    x = torch.full((1, 12), -30.0)
    x[0, 11] = 30.0
    y = torch.tensor([4])
    for m, d in ((MSE(), 81.0), (MAE(), 9.0), (Huber(2.5), 19.375), (W1(), 9.0), (W1(3.0), 3.0)):
        got = ntl.ntl_loss(x, y, VOCAB, method=m, reweigh=True, backend="torch")
        assert got.item() == pytest.approx(1.01 * d, rel=1e-5), m


# --------------------------------------------------------------------------- objects
def test_methods_are_frozen_and_hashable():
    assert len({MSE(), MSE(), Huber(2.0), Huber(2), W1(3.0), W1(3), W1(), MAE()}) == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        Huber(2.0).delta = 3.0  # type: ignore[misc]
    assert MSE() != MAE() and Huber(1.0) != Huber(2.0)
    assert Huber(2.0).describe() == "Huber(delta=2.0)" and MSE().describe() == "'mse'"
    crit = ntl.NumberTokenLoss(VOCAB, method=Huber(2.0))
    assert crit.method == "huber" and crit.loss_method == Huber(2.0) and "Huber(delta=2.0)" in repr(crit)


def test_huber_object_under_torch_compile():
    x, y = batch(1)

    def f(z):
        return ntl.ntl_loss(z, y, VOCAB, method=Huber(2.0), backend="torch")

    xa = x.clone().requires_grad_(True)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(xa)
    got.backward()
    xr = x.clone().requires_grad_(True)
    ref = f(xr)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(xa.grad, xr.grad)
    # Huber(2.0) is not Huber(1.0): the delta reached the compiled graph
    assert not torch.allclose(ref, ntl.ntl_loss(x, y, VOCAB, method="huber", backend="torch"))


# --------------------------------------------------------------------------- adding a method
@dataclasses.dataclass(frozen=True)
class Cubic(Method):
    """Test-only: ``L = |r|^3`` of ``r = E[v] - y``, ``dL/dz_j = 3 r |r| q_j (v_j - E[v])``;
    no Triton branch (``code = None``)."""

    name: ClassVar[str] = "cubic-test"

    @classmethod
    def row_loss_grad(cls, row, s):
        q, values = row.q, row.values
        yhat = q @ values
        r = yhat[:, None] - row.y
        return r.abs().pow(3).squeeze(1), 3.0 * r * r.abs() * q * (values - yhat[:, None])

    def max_loss(self, vocab):
        return float(vocab.max_distance) ** 3


@pytest.fixture
def cubic():
    register(Cubic)
    yield Cubic
    unregister("cubic-test")


def test_a_new_method_is_one_registered_subclass(cubic):
    x, y = batch(2)
    lab = [i for i in range(9) if 0 <= int(y[i]) < 10]
    xr = x.double().requires_grad_(True)
    q = torch.softmax(xr[lab][:, :10], -1)
    ref = ((q @ torch.arange(10.0, dtype=torch.float64) - y[lab].double()).abs() ** 3).mean()
    ref.backward()
    for method in ("cubic-test", Cubic()):
        xa = x.clone().requires_grad_(True)
        got = ntl.ntl_loss(xa, y, VOCAB, method=method, backend="torch")
        got.backward()
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    assert checks.check_method("cubic-test") == "cubic-test"
    # the fused entry point and the module take it too (PyTorch backend)
    fused = ntl.cross_entropy_with_ntl(x, y, VOCAB, method="cubic-test", backend="torch", ntl_weight=0.5)
    want = torch.nn.functional.cross_entropy(x, y) + 0.5 * ntl.ntl_loss(x, y, VOCAB, method=Cubic())
    torch.testing.assert_close(fused, want)
    # reweigh reads its max_loss: D = 1.01 * 9^3
    far = torch.full((1, 12), -30.0)
    far[0, 11] = 30.0
    assert ntl.ntl_loss(far, torch.tensor([4]), VOCAB, method=Cubic(), reweigh=True).item() == \
        pytest.approx(1.01 * 729, rel=1e-5)
    # no Triton branch: "auto" runs PyTorch (on a CPU anyway), "triton" is refused with the reason
    with pytest.raises(ValueError, match="has no Triton kernel"):
        ntl.ntl_loss(x, y, VOCAB, method=Cubic(), backend="triton")
    with pytest.raises(ValueError, match="has no Triton kernel"):
        ntl.cross_entropy_with_ntl(x, y, VOCAB, method=Cubic(), backend="triton")


def test_registration_errors(cubic):
    with pytest.raises(ValueError, match="already registered"):
        register(Cubic)

    @dataclasses.dataclass(frozen=True)
    class Clash(Method):
        name: ClassVar[str] = "clash-test"
        code: ClassVar[int | None] = 0  # MSE's

    with pytest.raises(ValueError, match="code 0 is already taken"):
        register(Clash)
    with pytest.raises(TypeError, match="Method subclass"):
        register(int)  # type: ignore[arg-type]


def test_unregistered_objects_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Stray(Method):
        name: ClassVar[str] = "stray-test"

    with pytest.raises(ValueError, match="not a registered method"):
        resolve(Stray())
    with pytest.raises(ValueError, match="method must be one of"):
        resolve("cubic-test")  # unregistered after its fixture
