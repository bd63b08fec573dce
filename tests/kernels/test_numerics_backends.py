"""Extreme logits on every backend: ±200 in fp32, ±6e4 in fp16 (near fp16's max).

``exp(200)`` overflows fp32 and ``exp(-200)`` underflows it, so any softmax that does not
subtract its maximum gives NaN here. Every backend — the PyTorch path, the Triton kernels
in the CPU interpreter, and on a GPU the compiled kernels (``gpu``) — must give finite
losses and gradients, equal to the PyTorch path on the same logits and to the values the
rows are built to have (point masses: NTL 0; a digit at +S and the target at -S: the
distance between them). Through the public API only: the standalone losses
(``ntl_mse_loss``, ``ntl_wasserstein_loss``, soft targets, ``reweigh``) and the fused
``cross_entropy_with_ntl`` (``reweigh``, ``inplace``, every reduction).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ntl

V = 300
IDS = [7, 33, 2, 41, 19, 25, 11, 48, 30, 14]  # '0'..'9'
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)
TEXT = 150

BACKENDS = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "triton", id="cpu-triton-interpreter"),
    pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.gpu),
    pytest.param("cuda", "torch", id="cuda-torch", marks=pytest.mark.gpu),
]
SCALES = [pytest.param(torch.float32, 200.0, id="fp32-200"),
          pytest.param(torch.float16, 6e4, id="fp16-6e4")]


def extreme_batch(S: float, dtype: torch.dtype, device: str):
    """Rows built at ±S and the NTL-W1 value each must have (None: no closed form)."""
    x = torch.zeros(10, V)
    y = torch.full((10,), TEXT)
    w1: list[float | None] = [None] * 10
    x[0, IDS[3]] = S                                  # point mass on the target
    y[0], w1[0] = IDS[3], 0.0
    x[1] = -S                                          # everything at -S but one digit
    x[1, IDS[8]] = 0.0
    y[1], w1[1] = IDS[8], 0.0
    x[2, IDS] = torch.linspace(-S, S, 10)              # '9' dominates
    y[2], w1[2] = IDS[0], 9.0
    x[3] = -S                                          # a text row with one huge text logit
    x[3, TEXT] = S
    x[4, 5] = S                                        # a non-digit at +S, the digits at -S
    x[4, IDS] = -S
    x[4, IDS[6]] = -S / 2
    y[4], w1[4] = IDS[6], 0.0
    x[5, ::2], x[5, 1::2] = S, -S                      # ignored
    y[5] = -100
    x[6, IDS] = S                                      # all digits tied at +S: uniform
    y[6], w1[6] = IDS[0], 4.5
    x[7, IDS[2]], x[7, IDS[9]] = -S, S                 # target at -S, '9' at +S
    y[7], w1[7] = IDS[2], 7.0
    x[8] = S                                           # every logit at +S
    y[8], w1[8] = IDS[5], 2.5
    x[9] = -S                                          # every logit at -S, label text
    return x.to(dtype).to(device), y.to(device), w1


def run(fn, x: torch.Tensor, up: torch.Tensor | None = None):
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf)
    (out * up if up is not None else out).sum().backward()
    return out.detach(), leaf.grad


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(a).all(), f"{what}: not finite: {a}"
    a, b = a.float(), b.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=what)


def _device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,S", SCALES)
def test_standalone_losses_at_extreme_logits(device, backend, dtype, S):
    _device(device)
    x, y, w1 = extreme_batch(S, dtype, device)
    up = torch.linspace(0.5, 1.5, 10, device=device)
    soft = ntl.gaussian_targets(y, VOCAB, sigma=1.0)
    for name, fn in (("mse", ntl.ntl_mse_loss), ("wasserstein", ntl.ntl_wasserstein_loss)):
        for kw in ({}, {"reweigh": True}, {"target_dist": soft} if name == "wasserstein" else None):
            if kw is None:
                continue
            what = f"{name} {kw and list(kw)} {backend} {device}"
            got = run(lambda z, fn=fn, kw=kw: fn(z, y, VOCAB, reduction="none", backend=backend, **kw), x, up)
            ref = run(lambda z, fn=fn, kw=kw: fn(z, y, VOCAB, reduction="none", backend="torch", **kw),
                      x, up)
            close(got[0], ref[0], dtype, what + " loss")
            close(got[1], ref[1], dtype, what + " grad")
            if name == "wasserstein" and not kw:
                for i, want in enumerate(w1):
                    if want is not None:
                        assert abs(got[0][i].item() - want) <= 1e-3, (what, i, got[0][i].item(), want)
        mean = fn(x, y, VOCAB, backend=backend)
        assert torch.isfinite(mean)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,S", SCALES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_ce_ntl_at_extreme_logits(device, backend, dtype, S, reduction):
    _device(device)
    x, y, w1 = extreme_batch(S, dtype, device)
    y = y.clone()
    y[9] = -100  # an all -S row that is ignored (the text row 3 keeps CE at +-S in play)
    up = torch.linspace(0.5, 1.5, 10, device=device) if reduction == "none" else None
    for reweigh in (False, True):
        for inplace in (False, True):
            what = f"ce+ntl reweigh={reweigh} inplace={inplace} {backend} {device} {reduction}"

            def fused(z, reweigh=reweigh, inplace=inplace):
                return ntl.cross_entropy_with_ntl(z * 1 if inplace else z, y, VOCAB, reweigh=reweigh,
                                                  inplace=inplace, reduction=reduction, backend=backend)

            def ref(z, reweigh=reweigh):
                return ntl.cross_entropy_with_ntl(z, y, VOCAB, reweigh=reweigh, reduction=reduction,
                                                  backend="torch")

            got, want = run(fused, x, up), run(ref, x, up)
            close(got[0], want[0], dtype, what + " loss")
            close(got[1], want[1], dtype, what + " grad")
    # the torch path itself: CE equals F.cross_entropy on the upcast logits (stable there too)
    parts = ntl.cross_entropy_with_ntl(x, y, VOCAB, reduction="none", return_parts=True, backend=backend)
    ce = F.cross_entropy(x.float(), y, reduction="none")
    close(parts[1], ce, torch.float32, "ce part")
    w1_rows = parts[2].cpu()
    for i, want_w1 in enumerate(w1):
        if want_w1 is not None:
            assert abs(w1_rows[i].item() - want_w1) <= 1e-3, (i, w1_rows[i].item(), want_w1)
