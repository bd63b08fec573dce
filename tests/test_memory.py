"""Memory of fused CE + NTL (PyTorch CPU path) and NTL-from-hidden, measured with the profiler.

Measurement: ``torch.profiler.profile(profile_memory=True)`` records one event per CPU
allocation (+bytes) and free (-bytes) with a timestamp (the raw kineto "[memory]"
events). Sorting them by time and summing gives the live bytes allocated *during*
forward + backward; we assert on

* ``peak``: the maximum of that running sum (the logits themselves exist before and
  are not counted; the gradient that ends up in ``logits.grad`` is counted), and
* ``big``: the number of single allocations of at least one ``N x V`` buffer.

Sizes: ``N x V`` fp32 = 64 x 65,536 = 16 MiB, so one extra ``N x V`` buffer dwarfs the
per-row-block temporaries of the fp32 fused path (``[rows, K]`` and ``[rows]``: the
exponentials are written straight into the gradient buffer). For bf16 the block
temporaries are fp32 row blocks (``ntl.fused._CHUNK_ELEMS`` elements), so there we
check how the memory *scales with N* instead: in place, the extra memory does not
grow with N at all; out of place it grows by exactly one ``N x V`` bf16 buffer.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ntl
import ntl.fused

IDS = list(range(100, 110))


def allocation_stream(prof):
    """Signed allocation sizes in time order (+alloc, -free)."""
    try:
        raw = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        raw.sort(key=lambda e: e.start_ns())
        return [e.nbytes() for e in raw]
    except AttributeError:  # pragma: no cover - older/newer profiler API: per-op attribution
        evs = [e for e in prof.events() if e.self_cpu_memory_usage or e.name == "[memory]"]
        evs.sort(key=lambda e: e.time_range.start)
        return [e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage for e in evs]


def measure(fn):
    """(peak live bytes, list of allocation sizes) while running ``fn``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    allocs = []
    for b in allocation_stream(prof):
        live += b
        peak = max(peak, live)
        if b > 0:
            allocs.append(b)
    return peak, allocs


def case(N, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::2] = torch.tensor(IDS)[torch.randint(0, 10, (N // 2,), generator=g)]
    y[1::7] = -100
    vocab = ntl.DigitVocab(IDS, vocab_size=V)
    vocab.lookup(V)  # warm the vocab's cached lookup table (a one-off [V] int64 tensor)
    return x, y, vocab


def run(kind, x, y, vocab):
    leaf = x.clone().requires_grad_(True)

    def step():
        if kind == "fused":
            loss = ntl.cross_entropy_with_ntl(leaf, y, vocab, method="wasserstein")
        elif kind == "inplace":
            loss = ntl.cross_entropy_with_ntl(leaf, y, vocab, method="wasserstein", inplace=True)
        else:  # the unfused sum: F.cross_entropy + NTL, two dense gradients added by autograd
            loss = F.cross_entropy(leaf, y) + 0.3 * ntl.ntl_wasserstein_loss(leaf, y, vocab)
        loss.backward()

    step_peak, allocs = measure(step)
    return step_peak, allocs, leaf


@pytest.fixture(scope="module")
def fp32_runs():
    N, V = 64, 65_536
    x, y, vocab = case(N, V)
    run("fused", x, y, vocab)  # warm-up (first profiler session, lazy inits)
    nv = N * V * 4
    return nv, {k: run(k, x, y, vocab) for k in ("fused", "inplace", "unfused")}


def test_fused_holds_one_NxV_buffer(fp32_runs):
    nv, runs = fp32_runs
    peak, allocs, leaf = runs["fused"]
    assert sum(a >= nv for a in allocs) == 1  # the gradient buffer (becomes leaf.grad)
    assert nv <= peak <= 1.25 * nv, peak / nv
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape


def test_fused_inplace_holds_no_NxV_buffer(fp32_runs):
    nv, runs = fp32_runs
    peak, allocs, _ = runs["inplace"]
    assert max(allocs, default=0) < 0.25 * nv
    assert peak <= 0.25 * nv, peak / nv


def test_unfused_sum_allocates_more(fp32_runs):
    nv, runs = fp32_runs
    peak, allocs, leaf = runs["unfused"]
    fused_peak = runs["fused"][0]
    assert sum(a >= nv for a in allocs) >= 3  # log-softmax, its grad, the NTL's dense grad, ...
    assert peak >= 2 * nv
    assert peak >= fused_peak + 0.9 * nv
    # same gradient as the fused path (the memory saving is not a different answer)
    torch.testing.assert_close(runs["fused"][2].grad, leaf.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(runs["inplace"][2].grad, leaf.grad, rtol=1e-5, atol=1e-7)


def test_bf16_extra_memory_scaling_with_N():
    V = 65_536
    rows = max(1, ntl.fused._CHUNK_ELEMS // V)  # rows per block on the CPU path
    peaks = {}
    for N in (2 * rows, 4 * rows):
        x, y, vocab = case(N, V, torch.bfloat16, seed=N)
        run("fused", x, y, vocab)
        peaks[N] = {k: run(k, x, y, vocab)[0] for k in ("fused", "inplace")}
    n1, n2 = 2 * rows, 4 * rows
    delta_nv = (n2 - n1) * V * 2  # bytes of the extra rows' N x V bf16 buffer
    # in place: no N x V buffer at all, so the extra memory does not depend on N
    assert abs(peaks[n2]["inplace"] - peaks[n1]["inplace"]) <= 0.05 * delta_nv
    # out of place: exactly one N x V buffer, so it grows by one buffer's worth
    growth = peaks[n2]["fused"] - peaks[n1]["fused"]
    assert 0.9 * delta_nv <= growth <= 1.1 * delta_nv, growth / delta_nv


def test_ntl_from_hidden_never_allocates_NxV():
    N, V, H = 64, 65_536, 16
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.tensor(IDS)[torch.randint(0, 10, (N,), generator=g)]
    vocab = ntl.DigitVocab(IDS, vocab_size=V)
    vocab.lookup(V)
    ntl.ntl_loss_from_hidden(h, W, y, vocab).backward()  # warm-up
    h.grad = W.grad = None
    peak, allocs = measure(lambda: ntl.ntl_loss_from_hidden(h, W, y, vocab).backward())
    nv = N * V * 4
    wgrad = V * H * 4  # W.grad is dense [V, H] (zero outside the K number rows)
    assert max(allocs) <= wgrad
    assert peak <= 1.25 * wgrad < nv
    # the plain route materialises [N, V] logits
    W.grad = None
    peak_plain, allocs_plain = measure(lambda: ntl.ntl_wasserstein_loss(h @ W.T, y, vocab).backward())
    assert max(allocs_plain) >= nv and peak_plain >= nv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
def test_reweigh_reads_only_number_rows(method, dtype):
    """reweigh=True (issue 18.6): the full-vocabulary mass is computed on the rows whose label is a
    number token only, so forward + backward hold no extra N x V buffer: the peak stays within
    1.1x of reweigh=False and the only N x V allocation is the gradient (in the logits' dtype)."""
    N, V = 256, 16_384
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, V, generator=g).to(dtype)
    y = torch.randint(200, V, (N,), generator=g)
    y[::50] = torch.tensor(IDS)[torch.randint(0, 10, (len(y[::50]),), generator=g)]  # 2% numbers
    vocab = ntl.DigitVocab(IDS, vocab_size=V)
    peaks, bigs = {}, {}
    for reweigh in (False, True, False, True):  # the first two warm up
        leaf = x.clone().requires_grad_(True)
        peak, allocs = measure(lambda leaf=leaf, rw=reweigh: ntl.ntl_loss(
            leaf, y, vocab, method=method, reweigh=rw).backward())
        peaks[reweigh], bigs[reweigh] = peak, [a for a in allocs if a >= N * V * x.element_size()]
    grad_bytes = N * V * x.element_size()
    assert bigs[False] == [grad_bytes] and bigs[True] == [grad_bytes], bigs
    assert peaks[True] <= 1.1 * peaks[False], (peaks[True] / peaks[False])
