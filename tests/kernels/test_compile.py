"""``torch.compile(fullgraph=True)`` of losses calling the NTL losses (issue 18.7).

Under Dynamo every standalone loss is one custom op (``ntl::loss_fwd``, backward
``ntl::loss_bwd``) and ``cross_entropy_with_ntl`` is ``ntl::ce_ntl_fwd`` (its backward a
traceable multiply of the saved gradient buffer); the vocab is a constant resolved at trace
time (tokenizer -> vocab is cached Python). The compiled result must equal eager in value and
gradient, with strict checks on (the checks run inside the op: no graph break) and off.
Compiling is slow on this CPU: tiny shapes, ``aot_eager`` (Dynamo + AOTAutograd, the parts
that trace our code) and ``inductor`` runs marked slow.
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


def same_over_batch_sizes(eager, compiled, sizes=(5, 9, 13)):
    """``compiled`` equals ``eager`` in value and gradient at each batch size (V = 64)."""
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 64, generator=g)
        y = torch.randint(0, 20, (n,), generator=g)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a, b = eager(xa, y), compiled(xb, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(xb.grad, xa.grad)


def test_dynamic_batch_and_module(fresh):
    """NumberTokenLoss (squash_factor) compiled; new batch sizes recompile once with a symbolic N
    (automatic dynamic shapes: the ops' fake implementations take symbolic sizes)."""
    vocab = ntl.DigitVocab(list(range(10)), 64)
    crit = ntl.NumberTokenLoss(vocab, squash_factor=4.0, reweigh=True)
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    same_over_batch_sizes(crit, compiled)


def test_vocab_argument_compiled_first_and_guarded(fresh):
    """A vocab object passed as an argument, compiled before any eager call: its constants are
    derived at trace time (on every torch >= 2.8) and a different vocab is not served the first
    one's (Dynamo guards on the object): each call equals the plain-PyTorch MSE over its digits."""
    V_ = 48
    a_vocab = ntl.DigitVocab(list(range(10)), V_)
    b_vocab = ntl.DigitVocab(list(range(30, 40))[::-1], V_)  # other ids, reversed values
    f = torch.compile(lambda x, y, voc: ntl.ntl_mse_loss(x, y, voc, backend="torch"),
                      fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, V_, generator=g)
    for vocab, ids in ((a_vocab, list(range(10))), (b_vocab, list(range(30, 40))[::-1]), (a_vocab, list(range(10)))):
        y = torch.tensor(ids[:7])
        ref = (torch.softmax(x[:, ids], -1) @ torch.arange(10.0) - torch.arange(7.0)).pow(2).mean()
        torch.testing.assert_close(f(x, y, vocab), ref)


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


# ---------------------------------------------------------------- cross_entropy_with_ntl (fused)
def fused_loss(tok, backend):
    """Every reduction, both methods, reweigh, squash_factor and return_parts in one graph;
    returns the differentiable total and the (detached) parts, which are compared too."""

    def f(x, y):
        up = torch.linspace(0.5, 2.0, y.numel(), device=x.device).view(y.shape)
        a, ce_a, nt_a = ntl.cross_entropy_with_ntl(x, y, tok, reweigh=True, return_parts=True,
                                                   backend=backend)
        b, ce_b, nt_b = ntl.cross_entropy_with_ntl(x, y, tok, method="mse", reduction="none",
                                                   reweigh=True, ntl_weight=0.05, return_parts=True,
                                                   backend=backend)
        c = ntl.cross_entropy_with_ntl(x, y, tok, squash_factor=3.0, reduction="sum", ntl_weight=0.5,
                                       backend=backend)
        d = ntl.cross_entropy_with_ntl(x, y, tok, method="mse", ntl_weight=0.1, backend=backend)
        return a + (b * up).sum() + 0.1 * c + d, torch.stack([ce_a, nt_a, ce_b.sum(), nt_b.sum()])
    return f


def fused_eager_and_compiled(f, compiler, x, y):
    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compiler)):
        leaf = x.clone().requires_grad_(True)
        out, parts = fn(leaf, y)
        out.backward()
        res.append((out.detach(), parts, leaf.grad))
    return res


@pytest.mark.parametrize(("backend", "strict"), [("torch", False), ("triton", True)])
def test_fused_fullgraph_equals_eager(fresh, qwen_tok, backend, strict):
    """cross_entropy_with_ntl compiled (aot_eager): value, parts and gradient equal eager."""
    ntl.set_strict_checks(strict)
    x, y, *_ = case(1)
    (a, pa, ga), (b, pb, gb) = fused_eager_and_compiled(fused_loss(qwen_tok, backend), "aot_eager", x, y)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-7)
    # and eager is the unfused sum (so both are right, not just equal)
    xr = x.clone().requires_grad_(True)
    ref = (torch.nn.functional.cross_entropy(xr.view(-1, V), y.view(-1))
           + 0.3 * ntl.ntl_wasserstein_loss(xr, y, qwen_tok, reweigh=True))
    torch.testing.assert_close(pa[0] + 0.3 * pa[1], ref.detach(), rtol=1e-5, atol=1e-5)


def test_fused_compiled_checks_and_no_grad(fresh, qwen_tok):
    """Strict checks on: a label >= V raises inside the compiled graph. Under no_grad the compiled
    call builds no gradient (the op's read-only path) and equals eager."""
    x, y, *_ = case(2)
    bad = y.clone()
    bad[0, 1] = V + 3
    f = torch.compile(lambda x, y: ntl.cross_entropy_with_ntl(x, y, qwen_tok, method="mse"),
                      fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, V=151936\)"):
        f(x.clone().requires_grad_(True), bad)

    def ev(x, y):
        with torch.no_grad():
            return ntl.cross_entropy_with_ntl(x, y, qwen_tok, reduction="none", reweigh=True)
    got = torch.compile(ev, fullgraph=True, backend="aot_eager")(x, y)
    torch.testing.assert_close(got, ev(x, y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_fused_inplace_under_compile_raises(fresh, fullgraph):
    """inplace=True cannot be honoured in a compiled graph (the gradient would overwrite a
    functionalised copy, not the caller's logits): the compiled call raises, with or without
    fullgraph (no graph break that would run it eagerly on a copy), never a silent copy. Under
    no_grad (nothing is written) and eagerly, inplace=True works."""
    vocab = ntl.DigitVocab(list(range(10)), 40)
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    y = torch.tensor([1, 2, 30, -100, 7, 9])

    def f(h, W, y):
        logits = h @ W.T
        return ntl.cross_entropy_with_ntl(logits, y, vocab, inplace=True), logits

    compiled = torch.compile(f, fullgraph=fullgraph, backend="aot_eager")
    with pytest.raises(ValueError, match=r"inplace=True is not supported under torch\.compile"):
        compiled(h.clone().requires_grad_(True), W, y)
    loss, logits = compiled(h, W, y)  # no gradient to build: the logits are left untouched
    ref = torch.nn.functional.cross_entropy(h @ W.T, y) + 0.3 * ntl.ntl_wasserstein_loss(h @ W.T, y, vocab)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, h @ W.T)
    leaf = h.clone().requires_grad_(True)
    loss, logits = f(leaf, W, y)  # eagerly: the logits now hold the gradient
    loss.backward()
    torch.testing.assert_close(leaf.grad, logits @ W)


def test_fused_dynamic_batch(fresh):
    """New batch sizes recompile once with a symbolic N (the op's fake takes symbolic sizes)."""
    vocab = ntl.DigitVocab(list(range(10)), 64)

    def f(x, y):
        return ntl.cross_entropy_with_ntl(x, y, vocab, squash_factor=2.0, reweigh=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    same_over_batch_sizes(f, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_inductor_fullgraph(fresh, dtype):
    """Inductor (C++ on this CPU) around the fused op, both backends, strict checks off; the
    backward's multiply is generated code. bf16: the same stored bf16 gradient times 1."""
    vocab = ntl.DigitVocab(list(range(10)), 40)
    ntl.set_strict_checks(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g).to(dtype)
    y = torch.tensor([1, 2, 30, -100, 7, 9])
    for backend in ("torch", "triton"):
        torch._dynamo.reset()

        def f(x, y, backend=backend):
            return (ntl.cross_entropy_with_ntl(x, y, vocab, reweigh=True, backend=backend)
                    + ntl.cross_entropy_with_ntl(x, y, vocab, method="mse", reduction="none",
                                                 backend=backend).sum() * 0.5)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a = f(xa, y)
        b = torch.compile(f, fullgraph=True)(xb, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(xb.grad.float(), xa.grad.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("strict", [False, True])
def test_gpu_fused_fullgraph_inductor(fresh, qwen_tok, strict):
    """On a GPU: inductor around the fused op (the Triton kernel inside), equal to eager."""
    ntl.set_strict_checks(strict)
    x, y, *_ = case(3)
    (a, pa, ga), (b, pb, gb) = fused_eager_and_compiled(fused_loss(qwen_tok, "auto"), "inductor",
                                                       x.cuda(), y.cuda())
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
