"""Number-mass kernel (``ntl.kernels.number_mass``) under TRITON_INTERPRET=1 against its twin and float64.

Reference: the float64 softmax by hand (``softmax(x)[ids].sum()``) and its autograd
gradient; the plain-PyTorch twin ``number_mass_torch`` is checked against the same.
fp32 / bf16 / fp16; V not a multiple of the block (and > one interpreter block of
65,536); non-contiguous rows; ``N = 0``; -inf padding columns.
"""

from typing import Any

import pytest
import torch

from ntl.kernels.number_mass import number_mass_triton
from ntl.kernels.reference import number_mass_torch

TOL32: dict[str, Any] = {"rtol": 2e-6, "atol": 1e-7}


def case(N, V, dtype, seed, stride_pad=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(N, V + stride_pad, generator=g) * 3.0
    ids = torch.randperm(V, generator=g)[:10].sort().values
    wide[:, ids[::2]] += 6.0  # varied number mass
    x = wide.to(dtype)[:, :V]
    gz = torch.randn(N, 10, generator=g)
    gm = torch.randn(N, generator=g)
    return x, ids, gz, gm


def truth(x, ids, gz, gm):
    """float64 values and gradient of sum(gz * z) + sum(gm * m)."""
    x64 = x.double().detach().requires_grad_(True)
    z = x64[:, ids]
    m = torch.softmax(x64, -1)[:, ids].sum(-1)
    ((z * gz.double()).sum() + (m * gm.double()).sum()).backward()
    return z.detach(), m.detach(), x64.grad


def run(fn, x, ids, gz, gm):
    leaf = x.detach().clone().requires_grad_(True)
    z, m = fn(leaf, ids)
    ((z * gz).sum() + (m * gm).sum()).backward()
    return z, m, leaf.grad


@pytest.mark.parametrize("N,V", [(5, 50), (37, 4000), (3, 70_001)])
@pytest.mark.parametrize("fn", [number_mass_triton, number_mass_torch], ids=["triton", "torch"])
def test_fp32_against_float64(fn, N, V):
    x, ids, gz, gm = case(N, V, torch.float32, seed=N)
    z, m, grad = run(fn, x, ids, gz, gm)
    tz, tm, tg = truth(x, ids, gz, gm)
    assert z.dtype == m.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(z.double(), tz, rtol=0, atol=0)
    torch.testing.assert_close(m.double(), tm, **TOL32)
    torch.testing.assert_close(grad.double(), tg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """Math in fp32 on the half-precision values; the gradient is cast once to the input dtype."""
    x, ids, gz, gm = case(19, 3000, dtype, seed=2)
    z, m, grad = run(number_mass_triton, x, ids, gz, gm)
    tz, tm, tg = truth(x, ids, gz, gm)
    assert grad.dtype == dtype
    torch.testing.assert_close(z.double(), tz, rtol=0, atol=0)
    torch.testing.assert_close(m.double(), tm, **TOL32)
    torch.testing.assert_close(grad.double(), tg.to(dtype).double(), rtol=1e-2, atol=1e-5)
    z2, m2, g2 = run(number_mass_torch, x, ids, gz, gm)
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    torch.testing.assert_close(m, m2, **TOL32)
    torch.testing.assert_close(grad.float(), g2.float(), rtol=1e-2, atol=1e-5)


def test_non_contiguous_rows_and_empty():
    x, ids, gz, gm = case(7, 300, torch.float32, seed=3, stride_pad=13)
    assert x.stride(0) == 313
    z, m, grad = run(number_mass_triton, x, ids, gz, gm)
    tz, tm, tg = truth(x, ids, gz, gm)
    torch.testing.assert_close(z.double(), tz, rtol=0, atol=0)
    torch.testing.assert_close(m.double(), tm, **TOL32)
    torch.testing.assert_close(grad.double(), tg, rtol=1e-5, atol=1e-6)
    e = torch.zeros(0, 300, requires_grad=True)
    z, m = number_mass_triton(e, ids)
    assert z.shape == (0, 10) and m.shape == (0,)
    (z.sum() + m.sum()).backward()
    assert e.grad.shape == (0, 300)


def test_minus_inf_padding_and_qwen_width():
    """Padded vocab columns at -inf take no mass; V = 151,936 (3 interpreter blocks)."""
    x, ids, gz, gm = case(2, 151_936, torch.float32, seed=4)
    x[:, 151_665:] = float("-inf")
    z, m, grad = run(number_mass_triton, x, ids, gz, gm)
    tz, tm, tg = truth(x, ids, gz, gm)
    torch.testing.assert_close(z.double(), tz, rtol=0, atol=0)
    torch.testing.assert_close(m.double(), tm, **TOL32)
    torch.testing.assert_close(grad.double(), tg, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[:, 151_665:] == 0)


def test_double_backward_refused():
    x, ids, _, _ = case(2, 64, torch.float32, seed=5)
    leaf = x.clone().requires_grad_(True)
    _, m = number_mass_triton(leaf, ids)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(m.sum(), leaf, create_graph=True)


def test_torch_twin_with_rows_leaves_the_incoming_gradient_alone():
    """``rows`` given: the twin's backward must not write into autograd's fp32 ``dz``."""
    x, ids, gz, gm = case(6, 40, torch.float32, seed=11)
    rows = torch.tensor([True, False, True, False, False, True])
    leaf = x.clone().requires_grad_(True)
    z, m = number_mass_torch(leaf, ids, rows)
    gz0 = gz.clone()
    torch.autograd.grad((z, m), leaf, (gz, gm))
    assert torch.equal(gz, gz0)
    leaf2 = x.clone().requires_grad_(True)
    z2, m2 = number_mass_torch(leaf2, ids, rows)
    (z2.sum() + m2.sum()).backward()  # expanded ones as incoming gradients: no in-place write into them
    ref = x.clone().requires_grad_(True)
    p = torch.softmax(ref, -1)
    (ref[:, ids].sum() + torch.where(rows, p[:, ids].sum(-1), torch.zeros(())).sum()).backward()
    torch.testing.assert_close(leaf2.grad, ref.grad, rtol=1e-5, atol=1e-7)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_kernel_real_width(dtype):
    """Compiled kernel at Qwen's width (and N x V > 2^31 for bf16) against the twin."""
    V = 151_936
    N = 2048 if dtype == torch.float32 else 2**31 // V + 64
    x, ids, gz, gm = case(N, V, dtype, seed=7)
    x, ids, gz, gm = x.cuda(), ids.cuda(), gz.cuda(), gm.cuda()
    z, m, grad = run(number_mass_triton, x, ids, gz, gm)
    z2, m2, g2 = run(number_mass_torch, x, ids, gz, gm)
    torch.testing.assert_close(z, z2, rtol=0, atol=0)
    torch.testing.assert_close(m, m2, rtol=1e-5, atol=1e-7)
    tol: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(grad.float(), g2.float(), **tol)
    assert grad.dtype == dtype


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ntl.kernels import number_mass

common = {"ids_ptr": "*i64", "mass_ptr": "*fp32", "top_ptr": "*fp32", "sum_ptr": "*fp32",
          "V": "i32", "K": "i32", "stride_x": "i32", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"}
fwd = dict(common, x_ptr="*bf16", z_ptr="*fp32")
bwd = dict(common, x_ptr="*bf16", gz_ptr="*fp32", gm_ptr="*fp32", g_ptr="*bf16", stride_g="i32")
for fn, sig in ((number_mass._mass_fwd, fwd), (number_mass._mass_bwd, bwd)):
    order = [a for a in fn.arg_names]
    src = ASTSource(fn=fn, signature={a: sig[a] for a in order}, constexprs={"BLOCK_V": 8192, "BLOCK_K": 16})
    for cc in (80, 90):
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 8})
        assert len(k.asm["cubin"]) > 1000
        print(fn.__name__, cc, "ok")
"""


def test_kernels_compile_offline_for_sm80_and_sm90():
    """The interpreter does not type-check like the compiler: compile both kernels (bf16) to
    cubin for A100 and H100 targets with the wheel's ptxas, no GPU needed."""
    import os
    import sys

    import ntl

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    src = os.path.dirname(os.path.dirname(os.path.abspath(ntl.__file__)))  # this checkout's ntl
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    import ranks

    # ~3 s warm, ~30 s with a cold Triton cache on 2 loaded cores
    out = ranks.run_process([sys.executable, "-c", _COMPILE], env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split().count("ok") == 4


# ---------------------------------------------------------------- the twin's row selection
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_twin_selected_rows(dtype):
    """``number_mass_torch(x, ids, rows)``: the mass on the selected rows (float64 truth), 0 on
    the others, whose logits beyond the K number columns are never read (an all -inf row there
    stays finite); the gradient is the truth's with the mass's upstream gradient masked the
    same way; without grad the same values."""
    x, ids, gz, gm = case(23, 3000, dtype, seed=8)
    rows = torch.rand(23, generator=torch.Generator().manual_seed(9)) < 0.4
    rows[0], rows[1] = True, False
    x[1] = float("-inf")
    x[1, ids] = 0.5  # its number logits are still read (z)
    leaf = x.clone().requires_grad_(True)
    z, m = number_mass_torch(leaf, ids, rows)
    ((z * gz).sum() + (m * gm).sum()).backward()
    clean = x.clone()
    clean[1] = 0.0
    clean[1, ids] = 0.5
    tz, tm, tg = truth(clean, ids, gz, torch.where(rows, gm, 0.0))
    torch.testing.assert_close(z.double(), tz, rtol=0, atol=0)
    torch.testing.assert_close(m.double(), torch.where(rows, tm, 0.0), **TOL32)
    assert torch.equal(m[~rows], torch.zeros(int((~rows).sum())))
    tol: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(leaf.grad.double(), tg.to(dtype).double(), **tol)
    with torch.no_grad():
        z2, m2 = number_mass_torch(x, ids, rows)
        _, m3 = number_mass_torch(clean, ids)
    torch.testing.assert_close(m2, m, rtol=0, atol=0)
    torch.testing.assert_close(z2, z.detach(), rtol=0, atol=0)
    torch.testing.assert_close(m3.double(), tm, **TOL32)


def test_torch_twin_backward_once_in_place():
    """The twin's backward turns its exp buffer into the gradient in place: a second backward
    of the same graph raises instead of returning a wrong gradient; no double backward."""
    x, ids, gz, gm = case(4, 200, torch.float32, seed=10)
    leaf = x.clone().requires_grad_(True)
    z, m = number_mass_torch(leaf, ids)
    loss = (z * gz).sum() + (m * gm).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()
    leaf.grad = None
    _, m = number_mass_torch(leaf, ids)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(m.sum(), leaf, create_graph=True)
