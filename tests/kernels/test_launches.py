"""The standalone losses' forward on the Triton path: <= 3 launches, no host sync (issue 18.5).

Counted on CPU: a ``TorchDispatchMode`` records every ATen op the call dispatches and the
Triton kernels are replaced by stubs that count their launches (so nothing runs and the
interpreter's own tensor work is not counted). An ATen op counts as a launch unless it
only makes a view or allocates (``empty``), which on CUDA starts no kernel; host syncs
are ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``), the ops whose output shape
depends on the data (``nonzero``, ...) and ``Tensor.tolist`` / ``Tensor.numpy`` (which read
a CPU tensor without dispatching anything; the log wraps them). With ``set_strict_checks(False)``
a forward must have <= 3 launches and no sync (a training step using it can then be
captured in a CUDA graph: ``test_cuda_graph_capture`` on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from kernel_probe import HostReadMode

import ntl
from ntl.kernels import ntl_loss

KERNELS = ("_ntl_loss_fwd", "_ntl_finalize", "_ntl_loss_bwd", "_ntl_loss_bwd_reweigh")
NO_LAUNCH = {"empty.memory_format", "empty_strided.default", "new_empty.default",
             "new_empty_strided.default", "detach.default", "alias.default", "lift_fresh.default"}
SYNC = {"_local_scalar_dense.default", "item.default", "is_nonzero.default", "equal.default",
        "nonzero.default", "masked_select.default", "unique.default", "_unique2.default",
        "tolist.host", "numpy.host"}


class OpLog(HostReadMode):
    """Every ATen op dispatched inside the ``with`` block, and every host read that bypasses the
    dispatcher on a CPU tensor (``Tensor.tolist``, ``Tensor.numpy``), logged as a sync."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.views = 0

    def on_host_read(self, name: str) -> None:
        self.ops.append(f"{name}.host")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
        if func.is_view:
            self.views += 1
        else:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> list[str]:
        return [o for o in self.ops if o not in NO_LAUNCH]

    @property
    def syncs(self) -> list[str]:
        return [o for o in self.ops if o in SYNC]


class KernelStub:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def __getitem__(self, grid):
        assert all(isinstance(g, int) and g > 0 for g in grid), grid  # a host-side grid
        return lambda *args, **kwargs: self.log.append(self.name)


@pytest.fixture
def stubbed(monkeypatch):
    log: list[str] = []
    for name in KERNELS:
        monkeypatch.setattr(ntl_loss, name, KernelStub(name, log))
    ntl.set_strict_checks(False)
    yield log
    ntl.set_strict_checks(True)


V = 300
VOCAB = ntl.DigitVocab([3, 9, 12, 20, 21, 30, 33, 40, 41, 49], vocab_size=V)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 50, V, generator=g, requires_grad=True)
    y = torch.randint(0, 60, (4, 50), generator=g)
    y[:, ::7] = -100
    w = torch.rand(4, 50, generator=g)
    return x, y, w


SOFT = torch.full((4, 50, 10), 0.1)
CALLS = {
    "mse": lambda x, y, w, **kw: ntl.ntl_mse_loss(x, y, VOCAB, backend="triton", **kw),
    "w1": lambda x, y, w, **kw: ntl.ntl_wasserstein_loss(x, y, VOCAB, backend="triton", **kw),
    "w1-reweigh": lambda x, y, w, **kw: ntl.ntl_wasserstein_loss(x, y, VOCAB, reweigh=True,
                                                                 backend="triton", **kw),
    "w1-squash": lambda x, y, w, **kw: ntl.ntl_wasserstein_loss(x, y, VOCAB, squash_factor=3.0,
                                                                backend="triton", **kw),
    "w1-soft": lambda x, y, w, **kw: ntl.ntl_wasserstein_loss(x, y, VOCAB, target_dist=SOFT,
                                                              backend="triton", **kw),
    "mae": lambda x, y, w, **kw: ntl.ntl_dot_loss(x, y, VOCAB, error="mae", backend="triton", **kw),
    "huber-reweigh": lambda x, y, w, **kw: ntl.ntl_dot_loss(x, y, VOCAB, error="huber", reweigh=True,
                                                            backend="triton", **kw),
    "ntl_loss": lambda x, y, w, **kw: ntl.ntl_loss(x, y, VOCAB, method="mse", backend="triton", **kw),
    "module": lambda x, y, w, **kw: ntl.NumberTokenLoss(VOCAB, backend="triton", **{
        k: v for k, v in kw.items() if k == "reduction"})(x, y, weights=kw.get("weights")),
    "digit-logits": lambda x, y, w, **kw: ntl.ntl_loss_from_digit_logits(
        x[..., :10], y, VOCAB, backend="triton", **kw),
}
WEIGHTS = {"none": lambda w: None, "float": lambda w: w, "bool": lambda w: w > 0.3,
           "int": lambda w: (w > 0.3).long()}


CASES = [(c, r, w) for c in CALLS for r in ("mean", "sum", "none") for w in WEIGHTS
         if c != "module" or w == "none"]


@pytest.mark.parametrize(("call", "reduction", "weights"), CASES)
def test_forward_at_most_3_launches_and_no_sync(stubbed, call, reduction, weights):
    x, y, w = inputs()
    fn = CALLS[call]
    kw = {"reduction": reduction, "weights": WEIGHTS[weights](w)}
    with torch.no_grad():
        fn(x, y, w, **kw)  # warm the vocab's device tensors (built once per device)
    stubbed.clear()
    with OpLog() as log:
        out = fn(x, y, w, **kw)
    kernels = [k for k in stubbed if k in ("_ntl_loss_fwd", "_ntl_finalize")]
    assert kernels[0] == "_ntl_loss_fwd", stubbed  # the Triton path ran
    assert log.syncs == []
    total = len(log.launches) + len(stubbed)
    assert total <= 3, (log.launches, stubbed)
    assert total == (1 if reduction == "none" else 2), (log.launches, stubbed)
    assert out.shape == (y.shape if reduction == "none" else ())
    # backward: a zero gradient and one kernel, no sync either
    stubbed.clear()
    with OpLog() as blog:
        torch.autograd.grad(out.sum(), x)
    assert blog.syncs == []
    assert stubbed in (["_ntl_loss_bwd"], ["_ntl_loss_bwd_reweigh"]), stubbed
    assert "zeros.default" in blog.launches


def test_qwen_tokenizer_resolution_launches_nothing(stubbed, qwen_tok):
    """Tokenizer -> vocab is cached Python: the forward is still the two launches."""
    x = torch.randn(2, 3, 151_936)
    y = torch.tensor([[15, 785, 24], [-100, 20, 151_935]])
    ntl.ntl_wasserstein_loss(x, y, qwen_tok, backend="triton")
    stubbed.clear()
    with OpLog() as log:
        ntl.ntl_wasserstein_loss(x, y, qwen_tok, backend="triton")
    assert log.launches == [] and log.syncs == [] and stubbed == ["_ntl_loss_fwd", "_ntl_finalize"]


def test_strict_checks_are_the_only_sync(stubbed):
    """Positive control: the mode does see a sync, the label check's, with strict checks on."""
    x, y, w = inputs()
    ntl.set_strict_checks(True)
    with OpLog() as log:
        ntl.ntl_mse_loss(x, y, VOCAB, weights=w, backend="triton")
    assert log.syncs == ["tolist.host"]
    ntl.set_strict_checks(False)
    with OpLog() as log:
        ntl.ntl_mse_loss(x, y, VOCAB, weights=w, backend="triton")
    assert log.syncs == []


def test_non_contiguous_inputs_add_only_their_copies(stubbed):
    """A column-strided logits view and strided labels cost one copy each, no more."""
    x, y, _ = inputs()
    xs = torch.cat([x, x], -1)[..., ::2].detach()
    ys = torch.stack([y, y], -1)[..., 0]
    with OpLog() as log:
        ntl.ntl_mse_loss(xs, ys, VOCAB, backend="triton")
    assert sorted(log.launches) == ["clone.default", "clone.default"], log.launches
    assert stubbed == ["_ntl_loss_fwd", "_ntl_finalize"]


# ---------------------------------------------------------------- on a GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture(qwen_tok, reweigh, reduction):
    """A training step (LM head, NTL-W1 + NTL-MSE, backward) captured in a CUDA graph and replayed
    on new data equals the eager step: nothing in it syncs or allocates outside the graph pool."""
    torch.manual_seed(0)
    V, H, N = 151_936, 64, 512
    head = torch.nn.Linear(H, V, bias=False, device="cuda")
    h = torch.randn(N, H, device="cuda")
    y = torch.randint(15, 25, (N,), device="cuda")
    y[::3] = 785
    y[::5] = -100
    w = torch.rand(N, device="cuda")

    def step():
        head.weight.grad = None if head.weight.grad is None else head.weight.grad.zero_()
        logits = head(h)
        loss = ntl.ntl_wasserstein_loss(logits, y, qwen_tok, reweigh=reweigh, reduction=reduction,
                                        weights=w).sum()
        loss = loss + ntl.ntl_mse_loss(logits, y, qwen_tok, reduction=reduction).sum()
        loss.backward()
        return loss.detach()

    ntl.set_strict_checks(False)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()
        for seed in (1, 2):
            g = torch.Generator(device="cuda").manual_seed(seed)
            h.copy_(torch.randn(N, H, device="cuda", generator=g))
            y.copy_(torch.randint(10, 30, (N,), device="cuda", generator=g))
            graph.replay()
            got_loss, got_grad = static_loss.clone(), head.weight.grad.clone()
            want_loss = step()
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_grad, head.weight.grad, rtol=1e-4, atol=1e-6)
    finally:
        ntl.set_strict_checks(True)


# ---------------------------------------------------------------- cross_entropy_with_ntl (fused)
FUSED_KERNELS = ("_ce_ntl_fwd", "_scale_rows")


@pytest.fixture
def fused_stubbed(monkeypatch):
    from ntl.kernels import ce_ntl

    log: list[str] = []
    for name in FUSED_KERNELS:
        monkeypatch.setattr(ce_ntl, name, KernelStub(name, log))
    ntl.set_strict_checks(False)
    yield log
    ntl.set_strict_checks(True)


FUSED_CALLS = [("wasserstein", "mean", False, None), ("mse", "sum", True, None),
               ("wasserstein", "none", True, 3.0), ("wasserstein", "mean", False, 2.0)]


@pytest.mark.parametrize(("method", "reduction", "reweigh", "squash"), FUSED_CALLS)
def test_fused_one_kernel_each_way_and_no_sync(fused_stubbed, method, reduction, reweigh, squash):
    """Triton path, strict checks off: forward is one ``_ce_ntl_fwd`` launch plus a fixed handful
    of ``[N]``-sized ATen ops (label lookup, row scales, the reduction), backward one
    ``_scale_rows`` launch; no host sync either way (CUDA-graph capturable)."""
    x, y, _ = inputs()
    kw = {"method": method, "reduction": reduction, "reweigh": reweigh, "squash_factor": squash,
          "backend": "triton"}
    ntl.cross_entropy_with_ntl(x, y, VOCAB, **kw)  # warm the vocab's device tensors
    fused_stubbed.clear()
    with OpLog() as log:
        loss = ntl.cross_entropy_with_ntl(x, y, VOCAB, **kw)
    assert fused_stubbed == ["_ce_ntl_fwd"]
    assert log.syncs == []
    assert len(log.launches) <= 20, log.launches
    fused_stubbed.clear()
    with OpLog() as blog:
        loss.sum().backward()
    assert fused_stubbed == ["_scale_rows"]
    assert blog.syncs == []


def test_fused_strict_checks_are_the_only_sync(fused_stubbed):
    """Positive control: with strict checks on, the label-range check is the one sync."""
    x, y, _ = inputs()
    ntl.set_strict_checks(True)
    with OpLog() as log:
        ntl.cross_entropy_with_ntl(x, y, VOCAB, backend="triton")
    assert len(log.syncs) == 1, log.syncs
