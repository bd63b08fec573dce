"""ntl_trl._capture: NTL inside the backbone's forward (no trainer). Only the targeted rows
reach the digit matmul, digit logits are computed once, fp32 under autocast, chunked forwards
are consumed in order, and mismatches are errors."""

import math

import pytest
import torch
from ntl_trl._capture import HiddenNTLCapture, digit_logits_for_rows, ntl_sums_from_hidden
from ntl_trl._common import resolve_model_vocab
from ntl_trl._model import find_lm_parts
from trl_tiny import char_tokenizer, digit_ids, tiny_qwen2

import ntl
from ntl.logit_transform import LogitTransform


def _setup():
    tok = char_tokenizer()
    model = tiny_qwen2(tok)
    parts = find_lm_parts(model)
    return tok, model, parts, resolve_model_vocab(tok, parts.vocab_size)


def _targets(tok, B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, len(tok), (B, L), generator=g)
    t[0, :2] = -100
    return t


def _w1_reference(model, ids, targets, tok, start, T):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    dig = digit_ids(tok)
    terms = []
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            y = int(targets[b, t])
            if y in dig:
                q = torch.softmax(logits[b, start + t, dig] / T, -1)
                terms.append(sum(q[k] * abs(k - dig.index(y)) for k in range(10)))
    return torch.stack(terms).sum(), len(terms)


def test_capture_equals_full_logit_w1_and_consumes_chunked_forwards():
    tok, model, parts, vocab = _setup()
    ids = torch.randint(3, len(tok), (3, 9), generator=torch.Generator().manual_seed(1))
    targets = _targets(tok)
    cap = HiddenNTLCapture(parts, vocab, method="wasserstein")
    cap.arm(targets, start=1, transform=LogitTransform(temperature=0.8))
    for rows in (slice(0, 2), slice(2, 3)):  # TRL chunks the batch by rows
        model(input_ids=ids[rows])
    res = cap.disarm()
    ref, n = _w1_reference(model, ids, targets, tok, 1, 0.8)
    assert res.forwards == 2 and float(res.sums[0]) == n > 0
    torch.testing.assert_close(res.loss_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.sums[1], ref, rtol=1e-5, atol=1e-5)  # n * mean loss
    model(input_ids=ids)  # disarmed: nothing happens
    with pytest.raises(RuntimeError, match="without arm"):
        cap.disarm()
    cap.remove()


def test_capture_errors_are_loud():
    tok, model, parts, vocab = _setup()
    ids = torch.randint(3, len(tok), (2, 9))
    cap = HiddenNTLCapture(parts, vocab, method="mse")
    cap.arm(_targets(tok, B=2), start=0, transform=LogitTransform())
    with pytest.raises(RuntimeError, match="did not fire"):
        cap.disarm()
    cap.arm(_targets(tok, B=2), start=5, transform=LogitTransform())  # 5 + 7 > 9 positions
    with pytest.raises(RuntimeError, match="do not match"):
        model(input_ids=ids)
    cap.arm(_targets(tok, B=2, L=3), start=0, transform=LogitTransform())
    model(input_ids=ids)
    with pytest.raises(RuntimeError, match="rows are left"):
        model(input_ids=ids)  # a second forward through the same backbone
    cap.arm(_targets(tok, B=3, L=3), start=0, transform=LogitTransform())
    model(input_ids=ids)
    with pytest.raises(RuntimeError, match="covered 2 of 3 rows"):
        cap.disarm()
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        cap.arm(torch.zeros(3, dtype=torch.long), start=0, transform=LogitTransform())


def test_only_targeted_rows_are_saved_and_digit_logits_are_computed_once(monkeypatch):
    """Item 6: no [B*L, H] fp32 copy for backward, one digit-logit matmul for loss + metrics."""
    tok, model, parts, vocab = _setup()
    H = model.config.hidden_size
    hidden = torch.randn(4, 50, H, requires_grad=True)
    targets = torch.full((4, 50), -100)
    dig = digit_ids(tok)
    targets[0, 3], targets[2, 10], targets[3, 49] = dig[1], dig[7], dig[0]
    calls = []
    real = ntl.digit_logits_from_hidden
    monkeypatch.setattr(ntl, "digit_logits_from_hidden",
                        lambda h, *a, **k: calls.append(tuple(h.shape)) or real(h, *a, **k))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, sums = ntl_sums_from_hidden(parts, hidden, targets, vocab, method="wasserstein",
                                          transform=LogitTransform(temperature=0.9))
    assert calls == [(3, H)]  # 3 targeted rows of 200, one call for loss and metrics
    assert float(sums[0]) == 3
    rows_with_h = [s for s in saved if len(s) == 2 and s[-1] == H]
    assert rows_with_h and max(s[0] for s in rows_with_h) == 3
    assert all(math.prod(s) < 200 * H for s in saved)  # nothing the size of all rows
    loss.backward()
    assert hidden.grad[targets == -100].abs().max() == 0 and hidden.grad.abs().max() > 0


def test_digit_logits_are_fp32_under_autocast():
    tok, model, parts, vocab = _setup()
    rows = torch.randn(5, model.config.hidden_size)
    ref = digit_logits_for_rows(parts, rows, vocab, LogitTransform(temperature=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = digit_logits_for_rows(parts, rows, vocab, LogitTransform(temperature=0.5))
        plain = torch.nn.functional.linear(rows, model.lm_head.weight[digit_ids(tok)])
    assert plain.dtype == torch.bfloat16  # what an unguarded matmul would give
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6)
