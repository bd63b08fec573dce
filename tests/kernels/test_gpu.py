"""On a CUDA GPU, with the compiled Triton kernels (``gpu``: skipped without a GPU).

Run them with ``TRITON_INTERPRET=0 pytest -m gpu`` (``scripts/gpu_check.sh`` does); the
conftest guard fails a ``gpu`` test when the interpreter is on. Shapes are Qwen2.5's
(``V = 151,936``). Tolerances as in ``test_kernels.py`` / ``test_fused.py``.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import require_compiled_kernels
from kernel_cases import GRAD_TOL, loss_and_grad, make_batch, rel_close
from kernel_probe import BigOps, HostSyncs, count_launches
from test_fused import flush_and_error, fp32_reference_grad, mixed_batch

import ntl
from ntl.kernels import interpreting

gpu = pytest.mark.gpu
V = 151_936


def test_gpu_tests_fail_under_the_interpreter():
    """The conftest guard (runs everywhere): a gpu-marked test fails when the interpreter is on."""

    class Node:
        def __init__(self, marked: bool) -> None:
            self.marked = marked

        def get_closest_marker(self, name: str):
            return object() if self.marked and name == "gpu" else None

    require_compiled_kernels(Node(False))  # unmarked tests are never failed by it
    if interpreting():
        with pytest.raises(pytest.fail.Exception, match="TRITON_INTERPRET=1"):
            require_compiled_kernels(Node(True))
    else:
        require_compiled_kernels(Node(True))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def no_host_sync():
    """Strict checks off and CUDA's sync debug mode set to raise on any host sync."""
    ntl.set_strict_checks(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        ntl.set_strict_checks(True)


@pytest.fixture(scope="module")
def qwen_vocab(qwen_tok):
    return ntl.DigitVocab.from_tokenizer(qwen_tok, vocab_size=V)


@gpu
def test_gpu_kernels_are_compiled():
    from ntl.kernels import ce_ntl, ntl_loss, number_columns

    assert not interpreting()
    for k in (ce_ntl._ce_ntl_fwd, ce_ntl._scale_rows, ntl_loss._ntl_loss_fwd, number_columns._gather_fwd):
        assert type(k).__name__ == "JITFunction", type(k)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_losses_real_sizes(dtype, qwen_vocab):
    vocab = qwen_vocab
    logits, labels = make_batch(4096, V, vocab, dtype)
    logits, labels = logits.cuda(), labels.cuda()
    for method in ("mse", "wasserstein"):
        a, ga = loss_and_grad(lambda x, m=method: ntl.ntl_loss(x, labels, vocab, method=m), logits)
        b, gb = loss_and_grad(lambda x, m=method: ntl.ntl_loss(x, labels, vocab, method=m, backend="torch"), logits)
        rel_close(a, b, 1e-5)
        rel_close(ga, gb, GRAD_TOL[dtype])
    for reweigh in (False, True):
        a, ga = loss_and_grad(lambda x, r=reweigh: ntl.cross_entropy_with_ntl(x, labels, vocab, reweigh=r), logits)
        b, gb = loss_and_grad(lambda x, r=reweigh: F.cross_entropy(x.float(), labels)
                              + 0.3 * ntl.ntl_wasserstein_loss(x, labels, vocab, reweigh=r, backend="torch"),
                              logits)
        rel_close(a, b, 1e-5)
        rel_close(ga, gb, GRAD_TOL[dtype])


@gpu
def test_gpu_more_than_2_31_elements(qwen_vocab):
    """N x V > 2^31 (int32 offsets would wrap): the standalone loss, the fused training path
    (out of place and in place, backward with a non-unit upstream gradient, so the scale
    kernel runs there too) and the no-grad kernel, checked row by row against the PyTorch
    path on the first and last rows (reduction="sum": rows are independent)."""
    vocab = qwen_vocab
    N = (2**31 // V) + 64
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.full((N,), 785, device="cuda")
    idx = torch.tensor([0, 1, 2, N - 5, N - 4, N - 3, N - 2, N - 1], device="cuda")
    labels[idx] = torch.tensor([15, 785, -100, 15, 16, 17, 785, 24], device="cuda")
    sub_x, sub_y = logits[idx].clone(), labels[idx]
    assert logits[-1:].storage_offset() + V > 2**31

    rows = ntl.ntl_wasserstein_loss(logits, labels, vocab, reduction="none")
    rel_close(rows[idx], ntl.ntl_wasserstein_loss(sub_x, sub_y, vocab, reduction="none", backend="torch"), 1e-5)

    with torch.no_grad():
        ev = ntl.cross_entropy_with_ntl(logits, labels, vocab, reduction="none")
    ref_rows = (F.cross_entropy(sub_x.float(), sub_y, reduction="none")
                + 0.3 * ntl.ntl_wasserstein_loss(sub_x, sub_y, vocab, reduction="none", backend="torch"))
    rel_close(ev[idx], ref_rows, 1e-5)

    xr = sub_x.float().requires_grad_(True)
    ((F.cross_entropy(xr, sub_y, reduction="sum")
      + 0.3 * ntl.ntl_wasserstein_loss(xr, sub_y, vocab, reduction="sum", backend="torch")) * 2.0).backward()
    for inplace in (False, True):  # (in place last: it overwrites the logits)
        x = logits.requires_grad_(True) if inplace else logits.clone().requires_grad_(True)
        loss = ntl.cross_entropy_with_ntl(x, labels, vocab, reduction="sum", inplace=inplace)
        assert torch.isfinite(loss)
        (loss * 2.0).backward()
        rel_close(x.grad[idx], xr.grad, GRAD_TOL[torch.bfloat16])
        assert rel_l2(x.grad[idx], xr.grad) < 1e-2
        del x, loss
        torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_fp16_gradients_survive_gradscaler(backend):
    """The issue's case (N = 16,384, V = 1,000, scale 2^16): <= 1% of the nonzero entries of
    the fp32 gradient flushed, relative L2 error <= 1.2x the fp32-cast-once error."""
    Vx = 1000
    vocab = ntl.DigitVocab(list(range(10, 20)), vocab_size=Vx)
    x, y = mixed_batch(16384, Vx, seed=1, dtype=torch.float16, ids=list(range(10, 20)))
    x, y = x.cuda(), y.cuda()
    ref32 = fp32_reference_grad(x, y, vocab, 2.0**16)
    _, cast_err = flush_and_error(ref32.half(), ref32)
    xh = x.clone().requires_grad_(True)
    (ntl.cross_entropy_with_ntl(xh, y, vocab, backend=backend) * 2.0**16).backward()
    flushed, err = flush_and_error(xh.grad, ref32)
    assert flushed <= 0.01 and err <= 1.2 * cast_err, (flushed, err, cast_err)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_step_is_sync_free_and_unit_backward_touches_nothing(dtype, qwen_vocab):
    """Strict checks off: forward and backward of the fused loss make no host sync; the forward
    is one kernel launch; a backward with grad_out == 1 runs one launch and (bf16) no N x V
    op; grad_out == 2 gives twice the gradient."""
    vocab = qwen_vocab
    logits, labels = make_batch(2048, V, vocab, dtype, seed=2)
    logits, labels = logits.cuda(), labels.cuda()
    grads = []
    for scale in (1.0, 2.0):
        leaf = logits.clone().requires_grad_(True)
        (ntl.cross_entropy_with_ntl(leaf, labels, vocab) * scale).backward()  # warm-up: compile, caches
        leaf.grad = None
        ops = BigOps(leaf.numel())
        with no_host_sync(), count_launches() as launches, ops:
            loss = ntl.cross_entropy_with_ntl(leaf, labels, vocab)
            assert dict(launches) == {"_ce_ntl_fwd": 1}
            (loss * scale if scale != 1.0 else loss).backward()
        assert dict(launches) == {"_ce_ntl_fwd": 1, "_scale_rows": 1}
        assert [n for n, _ in ops.big] == ["empty"]  # the gradient buffer
        grads.append(leaf.grad.float())  # pyright: ignore[reportAttributeAccessIssue] (backward set it)
    # doubling is exact (fp16: up to one rounding of a subnormal result)
    torch.testing.assert_close(grads[1], 2.0 * grads[0], rtol=0, atol=1.2e-7 if dtype == torch.float16 else 0)
    ref = loss_and_grad(lambda x: F.cross_entropy(x.float(), labels)
                        + 0.3 * ntl.ntl_wasserstein_loss(x, labels, vocab, backend="torch"), logits)[1]
    rel_close(grads[0], ref, GRAD_TOL[dtype])


@gpu
@pytest.mark.parametrize("reweigh", [False, True])
def test_gpu_no_grad_is_one_read_only_launch(reweigh, qwen_vocab):
    vocab = qwen_vocab
    logits, labels = make_batch(4096, V, vocab, torch.bfloat16, seed=3)
    logits, labels = logits.cuda(), labels.cuda()
    keep = logits.clone()
    with torch.no_grad():
        ntl.cross_entropy_with_ntl(logits, labels, vocab, reweigh=reweigh)  # warm-up
        ops = BigOps(logits.numel())
        with no_host_sync(), count_launches() as launches, ops:
            got = ntl.cross_entropy_with_ntl(logits, labels, vocab, reweigh=reweigh, inplace=True)
    assert dict(launches) == {"_ce_ntl_fwd": 1} and ops.big == []
    assert torch.equal(logits, keep)
    ref = (F.cross_entropy(logits.float(), labels)
           + 0.3 * ntl.ntl_wasserstein_loss(logits, labels, vocab, reweigh=reweigh, backend="torch"))
    rel_close(got, ref, 1e-5)


@gpu
def test_gpu_rows_in_neither_loss_are_not_read(qwen_vocab):
    """Ignored rows full of NaN / inf get exactly zero gradient; the rest matches the reference."""
    vocab = qwen_vocab
    logits, labels = make_batch(64, V, vocab, torch.bfloat16, seed=4)
    labels[[3, 4, 5]] = -100
    logits[3], logits[4], logits[5] = float("nan"), float("inf"), float("-inf")
    logits, labels = logits.cuda(), labels.cuda()
    clean = logits.clone()
    clean[[3, 4, 5]] = 0
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1 if inplace else leaf
        ntl.cross_entropy_with_ntl(x, labels, vocab, inplace=inplace).backward()
        assert torch.equal(leaf.grad[[3, 4, 5]], torch.zeros_like(leaf.grad[[3, 4, 5]]))
        ref = loss_and_grad(lambda z: F.cross_entropy(z.float(), labels)
                            + 0.3 * ntl.ntl_wasserstein_loss(z, labels, vocab, backend="torch"), clean)[1]
        rel_close(leaf.grad, ref, GRAD_TOL[torch.bfloat16])



# ---------------------------------------------------------------- sync freedom: standalone, linear
# Each step runs on a GPU (gpu tests: Qwen's V, compiled kernels, CUDA's sync debug mode raises
# at a host sync) and on CPU (the same function at a small V: the kernels in Triton's
# interpreter, kernel_probe.HostSyncs records what would be a sync on a GPU).


@contextlib.contextmanager
def host_syncs(device: torch.device):
    """Strict checks off; yields the list of host syncs seen: on CUDA the sync debug mode raises
    at the sync itself (the list stays empty), on CPU a dispatch observer fills it."""
    if device.type == "cuda":
        with no_host_sync():
            yield []
        return
    ntl.set_strict_checks(False)
    try:
        with HostSyncs() as obs:
            yield obs.syncs
    finally:
        ntl.set_strict_checks(True)


def _up(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """A non-unit incoming gradient made on the device (no host copy inside the checked region)."""
    return torch.rand(shape, device=device, generator=torch.Generator(device=device).manual_seed(seed)) + 0.5


STANDALONE = {
    "mse": lambda x, y, v, **kw: ntl.ntl_mse_loss(x, y, v, **kw),
    "w1": lambda x, y, v, **kw: ntl.ntl_wasserstein_loss(x, y, v, **kw),
    "w1-reweigh": lambda x, y, v, **kw: ntl.ntl_wasserstein_loss(x, y, v, reweigh=True, **kw),
    "w1-squash": lambda x, y, v, **kw: ntl.ntl_wasserstein_loss(x, y, v, squash_factor=3.0, **kw),
}
REDUCTIONS = ["mean", "sum", "none"]


def standalone_step(call: str, reduction: str, vocab: ntl.NumberVocab, Vx: int, N: int,
                    device: torch.device) -> None:
    """Strict checks off, bf16, per-row weights, a non-unit incoming gradient: forward and
    backward make no host sync; the forward is at most 3 launches, the backward one kernel
    (as test_launches.py's stub count); value and gradient equal the PyTorch path's."""
    fn = STANDALONE[call]
    logits, labels = make_batch(N, Vx, vocab, torch.bfloat16, seed=5)
    logits, labels = logits.to(device), labels.to(device)
    up = _up(labels.shape if reduction == "none" else (), 7, device)
    kw = {"weights": _up(labels.shape, 6, device), "reduction": reduction, "backend": "triton"}
    leaf = logits.clone().requires_grad_(True)
    (fn(leaf, labels, vocab, **kw) * up).sum().backward()  # warm-up: compile, caches
    leaf.grad = None
    with count_launches() as launches:
        with host_syncs(device) as fwd_syncs:
            out = fn(leaf, labels, vocab, **kw)
        fwd = dict(launches)
        with host_syncs(device) as bwd_syncs:
            (out * up).sum().backward()
    assert fwd_syncs == [] and bwd_syncs == [], (fwd_syncs, bwd_syncs)
    assert "_ntl_loss_fwd" in fwd and sum(fwd.values()) <= 3, fwd
    bwd = dict(launches - Counter(fwd))
    assert sum(bwd.values()) == 1, bwd
    x = logits.clone().requires_grad_(True)
    ref = fn(x, labels, vocab, **{**kw, "backend": "torch"})
    (ref * up).sum().backward()
    rel_close(out.detach(), ref.detach(), 1e-5)
    rel_close(leaf.grad, x.grad, GRAD_TOL[torch.bfloat16])


@gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("call", list(STANDALONE))
def test_gpu_standalone_step_is_sync_free(call, reduction, qwen_vocab):
    """ntl_mse_loss / ntl_wasserstein_loss at Qwen's V: :func:`standalone_step`."""
    standalone_step(call, reduction, qwen_vocab, V, 2048, torch.device("cuda"))


SMALL_V = 300
SMALL_VOCAB = ntl.DigitVocab([3, 9, 12, 20, 21, 30, 33, 40, 41, 49], vocab_size=SMALL_V)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("call", list(STANDALONE))
def test_standalone_step_is_sync_free_on_cpu(call, reduction):
    """The same step on CPU (Triton's interpreter, V = 300): no op that would sync a GPU."""
    standalone_step(call, reduction, SMALL_VOCAB, SMALL_V, 48, torch.device("cpu"))


LINEAR = [("mean", False, False), ("sum", True, True), ("none", False, False), ("none", True, True)]


def linear_step(reduction: str, reweigh: bool, bias: bool, dtype: torch.dtype, vocab: ntl.NumberVocab,
                Vx: int, N: int, H: int, chunk: int, device: torch.device) -> None:
    """Strict checks off, several chunks, a non-unit incoming gradient, with and without bias
    and reweigh: linear_cross_entropy_with_ntl's forward and backward make no host sync (the
    backward's scaling by the incoming gradient is decided on the device); the fused kernel runs once per
    chunk in forward (and once more per chunk in backward for reduction="none"; otherwise
    backward only scales each stored gradient by the incoming one); value and gradients equal the logits path's (fp32 logits, PyTorch backend)."""
    g = torch.Generator().manual_seed(21)
    h = torch.randn(N, H, generator=g).to(device, dtype)
    W = (torch.randn(Vx, H, generator=g) * H ** -0.5).to(device, dtype)
    b = (0.1 * torch.randn(Vx, generator=g)).to(device, dtype) if bias else None
    y = torch.randint(0, Vx, (N,), generator=g)
    y[::4] = torch.tensor(vocab.token_ids)[torch.randint(0, vocab.K, (N // 4,), generator=g)]
    y[1::9] = -100
    y = y.to(device)
    up = _up(y.shape if reduction == "none" else (), 23, device)
    kw = {"reduction": reduction, "reweigh": reweigh, "chunk_size": chunk, "backend": "triton"}
    leaves = [t.clone().requires_grad_(True) for t in (h, W, b) if t is not None]

    def call(hh, ww, bb=None):
        return ntl.linear_cross_entropy_with_ntl(hh, ww, y, vocab, bias=bb, **kw)

    (call(*leaves) * up).sum().backward()  # warm-up: compile, caches
    for t in leaves:
        t.grad = None
    with count_launches() as launches:
        with host_syncs(device) as fwd_syncs:
            out = call(*leaves)
        fwd = dict(launches)
        with host_syncs(device) as bwd_syncs:
            (out * up).sum().backward()
    assert fwd_syncs == [], fwd_syncs
    assert bwd_syncs == [], bwd_syncs
    assert fwd == {"_ce_ntl_fwd": N // chunk}, fwd
    bwd = dict(launches - Counter(fwd))
    if reduction == "none":
        assert bwd == {"_ce_ntl_fwd": N // chunk}, bwd
    else:  # the stored gradients scaled by the (non-unit) incoming gradient, at most one each
        assert set(bwd) <= {"_scale_rows"} and sum(bwd.values()) <= len(leaves), bwd
    refs = [t.clone().requires_grad_(True) for t in (h, W, b) if t is not None]
    logits = refs[0].float() @ refs[1].float().T + (refs[2].float() if bias else 0.0)
    ref = ntl.cross_entropy_with_ntl(logits, y, vocab, reduction=reduction, reweigh=reweigh, backend="torch")
    (ref * up).sum().backward()
    # bf16: logits rounded to bf16; fp16: computed in fp32, gradients rounded to fp16
    tol, gtol = (1e-2, 3e-2) if dtype == torch.bfloat16 else (1e-3, 1e-2)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=tol, atol=tol)
    for a, r in zip(leaves, refs, strict=True):
        err = (a.grad.float() - r.grad.float()).abs().max() / r.grad.float().abs().max()
        assert err <= gtol, float(err)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("reduction", "reweigh", "bias"), LINEAR)
def test_gpu_linear_step_is_sync_free(reduction, reweigh, bias, dtype, qwen_vocab):
    """linear_cross_entropy_with_ntl at Qwen's V, H = 896, 4 chunks: :func:`linear_step`."""
    linear_step(reduction, reweigh, bias, dtype, qwen_vocab, V, 2048, 896, 512, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("reduction", "reweigh", "bias"), LINEAR)
def test_linear_step_is_sync_free_on_cpu(reduction, reweigh, bias, dtype):
    """The same step on CPU (Triton's interpreter, V = 300, H = 32, 4 chunks)."""
    linear_step(reduction, reweigh, bias, dtype, SMALL_VOCAB, SMALL_V, 64, 32, 16, torch.device("cpu"))


def test_host_syncs_sees_a_sync_on_cpu():
    """Positive control of the CPU observer: strict checks (on) read the labels on the host, and
    an explicit ``.item()`` is seen; the interpreter's own work inside a launch is not."""
    logits, labels = make_batch(16, SMALL_V, SMALL_VOCAB, seed=8)
    seen = []
    for strict in (True, False):
        ntl.set_strict_checks(strict)
        try:
            with count_launches() as launches, HostSyncs() as obs:
                ntl.ntl_mse_loss(logits, labels, SMALL_VOCAB, backend="triton").item()
        finally:
            ntl.set_strict_checks(True)
        assert launches["_ntl_loss_fwd"] == 1
        seen.append(obs.syncs)
    assert len(seen[0]) >= 2 and seen[1] == ["_local_scalar_dense"], seen
