"""linear_cross_entropy_with_ntl never holds an ``[N, V]`` tensor, and its peak memory.

Two independent observers:

* a ``TorchDispatchMode`` that sees every ATen op run in forward and backward and
  fails on any output of at least ``N x V`` elements of the input dtype, counted in bytes
  (the logits, their softmax or their gradient would all be that big; bytes, because
  Triton's interpreter views buffers as bytes); the plain ``hidden @ W.T`` route trips it;
* ``torch.profiler`` allocator events (see tests/test_memory.py): the peak live bytes
  during forward + backward are the gradients that must exist (``dL/dh``, ``dL/dW``,
  ``dL/db``) plus one ``[chunk, V]`` logits buffer plus small ``[chunk]``/``[chunk, K]``
  temporaries; under ``torch.no_grad()`` no gradient buffer is allocated at all.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ntl

IDS = list(range(100, 110))
V = 151_936  # Qwen2.5's padded vocabulary
N, H = 128, 8  # the automatic CPU chunk is 32 rows here (its minimum): 4 chunks


class NoBigTensors(TorchDispatchMode):
    """Fails on any op output of ``>= n * v`` elements of ``dtype`` (in bytes); records the
    largest output seen (bytes)."""

    def __init__(self, n, v, dtype=torch.float32):
        super().__init__()
        self.limit, self.largest, self.ops = n * v * dtype.itemsize, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                nbytes = t.numel() * t.element_size()
                self.largest = max(self.largest, nbytes)
                if nbytes >= self.limit:
                    raise AssertionError(f"{func} produced a {t.dtype} tensor of shape {tuple(t.shape)} "
                                         f"(>= N x V = {self.limit} bytes)")
        return out


def inputs(dtype=torch.float32, seed=0, n=N, v=V, h=H):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype).requires_grad_(True)
    W = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_(True)
    b = torch.randn(v, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = torch.tensor(IDS)[torch.randint(0, 10, (len(y[::3]),), generator=g)]
    y[1::7] = -100
    vocab = ntl.DigitVocab(IDS, vocab_size=v)
    vocab.lookup(v)  # warm the vocab's cached lookup table (a one-off [V] int64 tensor)
    return hid, W, b, y, vocab


@pytest.mark.parametrize(("dtype", "reduction", "reweigh"), [
    (torch.float32, "mean", False), (torch.float32, "sum", True), (torch.float32, "none", True),
    (torch.bfloat16, "mean", True), (torch.float16, "mean", False), (torch.float16, "none", False),
])
def test_no_NxV_tensor_in_forward_and_backward(dtype, reduction, reweigh):
    hid, W, b, y, vocab = inputs(dtype)
    mode = NoBigTensors(N, V, dtype)
    with mode:
        loss = ntl.linear_cross_entropy_with_ntl(hid, W, y, vocab, bias=b, reduction=reduction,
                                                 reweigh=reweigh)
        fwd_ops = mode.ops
        loss.sum().backward()
    assert fwd_ops > 20  # the mode saw the chunk loop ...
    if reduction == "none":  # ... and the backward's chunk pass
        assert mode.ops > 2 * fwd_ops - 10
    assert hid.grad is not None and W.grad is not None and b.grad is not None
    assert mode.largest >= V * H * dtype.itemsize  # it saw the [V, H] weight gradient ...
    assert mode.largest < N * V * dtype.itemsize  # ... and nothing as big as the logits


def test_no_NxV_tensor_under_no_grad_and_triton():
    hid, W, b, y, vocab = inputs()
    mode = NoBigTensors(N, V)
    with mode, torch.no_grad():
        ntl.linear_cross_entropy_with_ntl(hid, W, y, vocab, bias=b, reweigh=True)
    n, v = 24, 4096  # interpreter: few programs
    hid, W, b, y, vocab = inputs(n=n, v=v)
    mode = NoBigTensors(n, v)
    with mode:
        ntl.linear_cross_entropy_with_ntl(hid, W, y, vocab, bias=b, chunk_size=8, backend="triton").backward()
    assert mode.largest < n * v * 4 and W.grad is not None


def test_the_observer_catches_the_plain_route():
    hid, W, b, y, vocab = inputs()
    with pytest.raises(AssertionError, match="N x V"), NoBigTensors(N, V):
        (F.cross_entropy(F.linear(hid, W, b), y) + 0.3 * ntl.ntl_wasserstein_loss(
            F.linear(hid, W, b), y, vocab)).backward()


def peak_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    raw = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                 key=lambda e: e.start_ns())
    live = peak = 0
    for e in raw:
        live += e.nbytes()  # pyright: ignore[reportAttributeAccessIssue] (torch's stub lacks it)
        peak = max(peak, live)
    return peak


def test_peak_memory_is_gradients_plus_one_chunk():
    hid, W, b, y, vocab = inputs()
    rows = ntl.linear.linear_chunk_rows(N, H, V, hid.device)
    assert rows == 32

    def step():
        ntl.linear_cross_entropy_with_ntl(hid, W, y, vocab, bias=b).backward()

    step()  # warm-up
    hid.grad = W.grad = b.grad = None
    peak = peak_bytes(step)
    grads = (N * H + V * H + V) * 4  # dL/dh, dL/dW, dL/db (fp32 bias accumulator)
    chunk = rows * V * 4
    assert grads + chunk <= peak <= grads + 1.15 * chunk, (peak - grads) / chunk
    assert peak < 0.5 * N * V * 4  # the fp32 logits alone would be twice this
    # the logits route for comparison: at least the logits and their gradient
    hid.grad = W.grad = b.grad = None
    plain = peak_bytes(lambda: ntl.cross_entropy_with_ntl(F.linear(hid, W, b), y, vocab).backward())
    assert plain >= 2 * N * V * 4 > 3 * peak


def test_no_grad_allocates_one_chunk_only():
    hid, W, b, y, vocab = inputs()
    rows = ntl.linear.linear_chunk_rows(N, H, V, hid.device)
    with torch.no_grad():
        ntl.linear_cross_entropy_with_ntl(hid, W, y, vocab, bias=b)
        peak = peak_bytes(lambda: ntl.linear_cross_entropy_with_ntl(hid, W, y, vocab, bias=b, reweigh=True))
    assert rows * V * 4 <= peak <= 1.15 * rows * V * 4  # the logits chunk, no V x H gradient
