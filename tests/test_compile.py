"""``torch.compile(fullgraph=True)`` of losses calling the standalone NTL losses (issue 18.7).

Under Dynamo every loss is one custom op (``ntl::loss_fwd``, backward ``ntl::loss_bwd``), the
vocab a constant resolved at trace time (tokenizer -> vocab is cached Python). The compiled
result must equal eager in value and gradient, with strict checks on (the checks run inside
the op: no graph break) and off. Compiling is slow on this CPU: tiny shapes, ``aot_eager``
(Dynamo + AOTAutograd, the parts that trace our code) and one ``inductor`` run.
"""

from __future__ import annotations

import pytest
import torch

import ntl

V = 151_936


@pytest.fixture
def fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    ntl.set_strict_checks(True)


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, V, generator=g)
    x[..., 15:25] += 3.0
    y = torch.randint(15, 25, (2, 4), generator=g)
    y[0, 0], y[1, 1], y[1, 3] = 785, -100, 151_900
    w = (torch.rand(2, 4, generator=g) > 0.3).long()  # an attention-mask-like weight
    h = torch.randn(2, 4, 8, generator=g)
    W = torch.randn(V, 8, generator=g) / 3
    return x, y, w, h, W


def total_loss(tok, backend):
    T = None

    def f(x, y, w, h, W):
        nonlocal T
        if T is None:
            T = ntl.gaussian_targets(y, tok, 1.0, vocab_size=V)
        return (ntl.ntl_mse_loss(x, y, tok, weights=w, backend=backend)
                + ntl.ntl_wasserstein_loss(x, y, tok, reweigh=True, backend=backend)
                + ntl.ntl_wasserstein_loss(x, y, tok, squash_factor=3.0, reduction="none",
                                           backend=backend).sum()
                + ntl.ntl_wasserstein_loss(x, y, tok, target_dist=T, reduction="sum", backend=backend)
                + ntl.ntl_dot_loss(x, y, tok, error="huber", huber_delta=0.5, backend=backend)
                + ntl.ntl_loss_from_hidden(h, W, y, tok, method="mse", temperature=0.7,
                                           backend=backend))
    return f


def eager_and_compiled(f, compiler, *inputs):
    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compiler)):
        leaves = [t.clone().requires_grad_(t.dtype.is_floating_point and i in (0, 3, 4))
                  for i, t in enumerate(inputs)]
        out = fn(*leaves)
        out.backward()
        res.append((out.detach(), [leaves[i].grad for i in (0, 3, 4)]))
    return res


@pytest.mark.parametrize(("backend", "strict"), [("torch", False), ("triton", True)])
def test_fullgraph_equals_eager(fresh, qwen_tok, backend, strict):
    ntl.set_strict_checks(strict)
    f = total_loss(qwen_tok, backend)
    (a, ga), (b, gb) = eager_and_compiled(f, "aot_eager", *case())
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(gb, ga, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)


def test_compiled_checks_still_raise(fresh, qwen_tok):
    """Strict checks on: a label >= V raises inside the compiled graph (the check is in the op)."""
    x, y, *_ = case()
    y = y.clone()
    y[0, 1] = V + 3
    f = torch.compile(lambda x, y: ntl.ntl_mse_loss(x, y, qwen_tok), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V=151936\)"):
        f(x, y)


def test_dynamic_batch_and_module(fresh):
    """NumberTokenLoss (squash_factor) compiled; new batch sizes recompile once with a symbolic N
    (automatic dynamic shapes: the ops' fake implementations take symbolic sizes)."""
    vocab = ntl.DigitVocab(list(range(10)), 64)
    crit = ntl.NumberTokenLoss(vocab, squash_factor=4.0, reweigh=True)
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    for n in (5, 9, 13):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 64, generator=g)
        y = torch.randint(0, 20, (n,), generator=g)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a, b = crit(xa, y), compiled(xb, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.slow
def test_inductor_fullgraph(fresh):
    """The default compiler (inductor, C++ on this CPU) around the ops."""
    vocab = ntl.DigitVocab(list(range(10)), 40)
    ntl.set_strict_checks(False)

    def f(x, y):
        return ntl.ntl_wasserstein_loss(x, y, vocab) + 0.5 * ntl.ntl_mse_loss(x, y, vocab)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g)
    y = torch.randint(0, 14, (6,), generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = f(xa, y)
    b = torch.compile(f, fullgraph=True)(xb, y)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("strict", [False, True])
def test_gpu_fullgraph_inductor(fresh, qwen_tok, strict):
    """On a GPU: inductor around the Triton-path ops, equal to eager."""
    ntl.set_strict_checks(strict)
    f = total_loss(qwen_tok, "auto")
    inputs = [t.cuda() for t in case()]
    (a, ga), (b, gb) = eager_and_compiled(f, "inductor", *inputs)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(gb, ga, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
