"""Malformed calls raise the documented TypeError / ValueError naming the argument and shapes."""

import re

import pytest
import torch

import ntl

V = 12
IDS = list(range(10))
VOCAB = ntl.DigitVocab(IDS, vocab_size=V)


def logits(*shape, dtype=torch.float32):
    return torch.randn(*shape, V).to(dtype)


def labels(*shape):
    return torch.randint(0, 10, shape)


W1, MSE = ntl.ntl_wasserstein_loss, ntl.ntl_mse_loss

# (id, exception, regex on the message, thunk)
CASES = [
    ("rank-mismatch", ValueError, r"labels shape \(2, 3, 1\) does not match logits.shape\[:-1\] \(2, 3\)",
     lambda: W1(logits(2, 3), labels(2, 3, 1), VOCAB)),
    ("shape-mismatch", ValueError, r"labels shape \(2, 4\) does not match logits.shape\[:-1\] \(2, 3\)",
     lambda: MSE(logits(2, 3), labels(2, 4), VOCAB)),
    ("labels>=V", ValueError, r"labels must be token ids in \[0, V=12\).*got values in \[\d+, 12\]",
     lambda: W1(logits(3), torch.tensor([1, 12, 3]), VOCAB)),
    ("negative-label", ValueError, r"labels must be token ids in \[0, V=12\) or ignore_index=-100; got values in \[-5",
     lambda: W1(logits(3), torch.tensor([1, -5, 3]), VOCAB)),
    ("-100-with-other-ignore_index", ValueError, r"ignore_index=-1",
     lambda: W1(logits(3), torch.tensor([1, -100, 3]), VOCAB, ignore_index=-1)),
    ("float-labels", TypeError, r"labels must be an integer tensor of token ids, got torch.float32",
     lambda: W1(logits(3), torch.tensor([1.0, 2.0, 3.0]), VOCAB)),
    ("bool-labels", TypeError, r"labels must be an integer tensor",
     lambda: W1(logits(3), torch.tensor([True, False, True]), VOCAB)),
    ("list-labels", TypeError, r"labels must be a torch.Tensor of token ids, got list",
     lambda: W1(logits(3), [1, 2, 3], VOCAB)),
    ("int-logits", TypeError, r"logits must be a floating-point tensor .*got torch.int64",
     lambda: MSE(torch.randint(0, 5, (3, V)), labels(3), VOCAB)),
    ("numpy-logits", TypeError, r"logits must be a torch.Tensor, got ndarray",
     lambda: MSE(torch.randn(3, V).numpy(), labels(3), VOCAB)),
    ("empty-V", ValueError, r"logits must have shape \[\.\.\., V\] with V > 0, got \(3, 0\)",
     lambda: MSE(torch.randn(3, 0), labels(3), VOCAB)),
    ("vocab-id>=V", ValueError, r"token id 50 but logits have only V=12.*vocab larger than the logits",
     lambda: W1(logits(3), labels(3), ntl.NumberVocab([2, 50], [0.0, 1.0], vocab_size=51))),
    ("dict-id>=V", ValueError, r"token ids must lie in \[0, vocab_size=12\), got min 2 and max 50",
     lambda: W1(logits(3), labels(3), {50: 1.0, 2: 0.0})),
    ("vocab_size>V", ValueError, r"vocab_size=64 but logits have V=12 .*vocab larger than the logits",
     lambda: W1(logits(3), labels(3), ntl.DigitVocab(IDS, vocab_size=64))),
    ("weights-shape", ValueError, r"weights shape \(4,\) does not match labels shape \(3,\)",
     lambda: W1(logits(3), labels(3), VOCAB, weights=torch.ones(4))),
    ("negative-weights", ValueError, r"weights must be >= 0",
     lambda: W1(logits(3), labels(3), VOCAB, weights=torch.tensor([1.0, -0.5, 1.0]))),
    ("complex-weights", TypeError, r"weights must be a real \(bool, integer or float\) tensor, got torch.complex64",
     lambda: W1(logits(3), labels(3), VOCAB, weights=torch.ones(3, dtype=torch.complex64))),
    ("negative-int-weights", ValueError, r"weights must be >= 0",
     lambda: W1(logits(3), labels(3), VOCAB, weights=torch.tensor([1, -1, 1]))),
    ("nan-weights", ValueError, r"weights must be >= 0 \(and not NaN\)",
     lambda: W1(logits(3), labels(3), VOCAB, weights=torch.tensor([1.0, float("nan"), 1.0]))),
    ("target_dist-negative", ValueError, r"target_dist must be finite and >= 0",
     lambda: W1(logits(3), labels(3), VOCAB, target_dist=torch.full((3, 10), 0.1) - torch.eye(3, 10))),
    ("target_dist-nan", ValueError, r"target_dist must be finite and >= 0",
     lambda: W1(logits(3), labels(3), VOCAB, target_dist=torch.full((3, 10), float("nan")))),
    ("target_dist-not-normalised", ValueError, r"target_dist rows must sum to 1",
     lambda: W1(logits(3), labels(3), VOCAB, target_dist=torch.full((3, 10), 0.5))),
    ("fused-tensor-weight", ValueError, r"ntl_weight must be a Python number >= 0, got a tensor",
     lambda: ntl.cross_entropy_with_ntl(logits(3), labels(3), VOCAB,  # pyright: ignore[reportCallIssue]
                                        ntl_weight=torch.tensor(0.3))),  # (a wrong type on purpose)
    ("shift-float-labels", TypeError, r"labels must be an integer tensor of token ids, got torch.float32",
     lambda: ntl.shift_labels(torch.zeros(2, 4))),
    ("strict-checks-string", TypeError, r"set_strict_checks takes True or False, got 'false'",
     lambda: ntl.set_strict_checks("false")),
    ("list-weights", TypeError, r"weights must be a torch.Tensor or None, got list",
     lambda: W1(logits(3), labels(3), VOCAB, weights=[1.0, 1.0, 1.0])),
    ("bad-reduction", ValueError, r"reduction must be one of \['mean', 'sum', 'none'\], got 'avg'",
     lambda: W1(logits(3), labels(3), VOCAB, reduction="avg")),
    ("bad-backend", ValueError, r"backend must be one of \['auto', 'torch', 'triton'\], got 'cuda'",
     lambda: MSE(logits(3), labels(3), VOCAB, backend="cuda")),
    ("bad-method", ValueError, r"method must be one of \['mse', 'mae', 'huber', 'wasserstein', 'del', 'dist2'\] \(or 'w1', an alias of 'wasserstein'\) or an ntl.methods.Method object, got 'l2'",
     lambda: ntl.ntl_loss(logits(3), labels(3), VOCAB, method="l2")),
    ("str-vocab", TypeError, r"vocab_or_tokenizer must be a tokenizer.*got str",
     lambda: W1(logits(3), labels(3), "Qwen/Qwen2.5-0.5B")),
    ("int-vocab", TypeError, r"vocab_or_tokenizer must be a tokenizer.*got int",
     lambda: W1(logits(3), labels(3), 10)),
    ("object-vocab", TypeError, r"vocab_or_tokenizer must be a Hugging Face tokenizer.*got object",
     lambda: W1(logits(3), labels(3), object())),
    ("empty-id-list", ValueError, r"vocab_or_tokenizer: the list of digit ids is empty",
     lambda: W1(logits(3), labels(3), [])),
    ("empty-id-dict", ValueError, r"vocab_or_tokenizer: the \{id: value\} mapping is empty",
     lambda: W1(logits(3), labels(3), {})),
    ("nine-ids", ValueError, r"DigitVocab needs exactly 10 token ids .*got 9",
     lambda: W1(logits(3), labels(3), list(range(9)))),
    ("float-id-tensor", TypeError, r"digit ids must be a 1-D integer tensor, got dtype torch.float32",
     lambda: W1(logits(3), labels(3), torch.arange(10.0))),
    ("target_dist-shape", ValueError, r"target_dist shape \(3, 9\) must be labels.shape \+ \(K,\) = \(3, 10\)",
     lambda: W1(logits(3), labels(3), VOCAB, target_dist=torch.full((3, 9), 1 / 9))),
    ("target_dist-int", TypeError, r"target_dist must be a floating-point torch.Tensor",
     lambda: W1(logits(3), labels(3), VOCAB, target_dist=torch.ones(3, 10, dtype=torch.long))),
    ("target_dist-with-mse", ValueError, r"target_dist is only supported with method='wasserstein'",
     lambda: ntl.ntl_loss(logits(3), labels(3), VOCAB, method="mse", target_dist=torch.full((3, 10), 0.1))),
    ("ignore_index-float", TypeError, r"ignore_index must be an int, got float",
     lambda: W1(logits(3), labels(3), VOCAB, ignore_index=-100.0)),
    ("reweigh-str", TypeError, r"reweigh must be a bool, got str",
     lambda: W1(logits(3), labels(3), VOCAB, reweigh="yes")),
    ("labels-other-device", ValueError, r"labels is on meta but logits are on cpu",
     lambda: W1(logits(3), torch.empty(3, dtype=torch.long, device="meta"), VOCAB)),
    ("module-bad-method", ValueError, r"method must be one of",
     lambda: ntl.NumberTokenLoss(VOCAB, method="l2")),
    ("module-bad-reduction", ValueError, r"reduction must be one of",
     lambda: ntl.NumberTokenLoss(VOCAB, reduction="max")),
    # squash_factor (ntloss.NTLoss(squash_factor=...))
    ("squash-1", ValueError, r"squash_factor must be a finite number > 1 \(1 would be cross-entropy\), got 1",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor=1)),
    ("squash-0.5", ValueError, r"squash_factor must be a finite number > 1 .*got 0.5",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor=0.5)),
    ("squash-nan", ValueError, r"squash_factor must be a finite number > 1 .*got nan",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor=float("nan"))),
    ("squash-inf", ValueError, r"squash_factor must be a finite number > 1 .*got inf",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor=float("inf"))),
    ("squash-str", TypeError, r"squash_factor must be a number > 1 or None, got str",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor="9")),
    ("squash-bool", TypeError, r"squash_factor must be a number > 1 or None, got bool",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor=True)),
    ("squash-with-mse", ValueError, r"squash_factor applies to the Wasserstein loss only, not method='mse'",
     lambda: ntl.ntl_loss(logits(3), labels(3), VOCAB, method="mse", squash_factor=3.0)),
    ("squash-with-target_dist", ValueError, r"squash_factor is not supported with target_dist",
     lambda: W1(logits(3), labels(3), VOCAB, squash_factor=3.0, target_dist=torch.full((3, 10), 0.1))),
    ("squash-two-values", ValueError, r"squash_factor needs number values with at least two different nonzero distances",
     lambda: W1(logits(3), labels(3), ntl.NumberVocab([1, 2], [0.0, 5.0], V), squash_factor=3.0)),
    ("module-squash-1", ValueError, r"squash_factor must be a finite number > 1",
     lambda: ntl.NumberTokenLoss(VOCAB, squash_factor=1.0)),
    ("module-squash-mse", ValueError, r"squash_factor applies to the Wasserstein loss only",
     lambda: ntl.NumberTokenLoss(VOCAB, method="mse", squash_factor=2.0)),
    ("module-squash-one-value", ValueError, r"at least two different nonzero distances",
     lambda: ntl.NumberTokenLoss(ntl.NumberVocab([1, 2], [3.0, 3.0], V), squash_factor=2.0)),
    # ntl_dot_loss
    ("dot-bad-error", ValueError, r"error must be one of \['mse', 'mae', 'huber'\], got 'l2'",
     lambda: ntl.ntl_dot_loss(logits(3), labels(3), VOCAB, error="l2")),
    ("dot-huber_delta-0", ValueError, r"huber_delta must be a positive finite number, got 0",
     lambda: ntl.ntl_dot_loss(logits(3), labels(3), VOCAB, error="huber", huber_delta=0)),
    ("dot-huber_delta-str", TypeError, r"huber_delta must be a positive number, got str",
     lambda: ntl.ntl_dot_loss(logits(3), labels(3), VOCAB, error="huber", huber_delta="1")),
    ("dot-labels>=V", ValueError, r"labels must be token ids in \[0, V=12\) or ignore_index=-100; got values in \[40, 40\] outside that \(V is logits.shape\[-1\]\)",
     lambda: ntl.ntl_dot_loss(logits(3), torch.tensor([1, 40, 3]), VOCAB, error="mae")),
    ("dot-weights-shape", ValueError, r"weights shape \(2,\) does not match labels shape \(3,\)",
     lambda: ntl.ntl_dot_loss(logits(3), labels(3), VOCAB, weights=torch.ones(2))),
    ("digit-logits-vocab_size-float", ValueError, r"vocab_size must be a positive int or None, got 12.0",
     lambda: ntl.ntl_loss_from_digit_logits(torch.randn(3, 10), labels(3), IDS, vocab_size=12.0)),
    # fused CE + NTL
    ("fused-negative-weight", ValueError, r"ntl_weight must be a finite non-negative number, got -0.1",
     lambda: ntl.cross_entropy_with_ntl(logits(3), labels(3), VOCAB, ntl_weight=-0.1)),
    ("fused-inplace-int", TypeError, r"inplace must be a bool, got int",
     lambda: ntl.cross_entropy_with_ntl(logits(3), labels(3), VOCAB,  # pyright: ignore[reportCallIssue]
                                        inplace=1)),  # (a wrong type on purpose)
    ("fused-bad-method", ValueError, r"method must be one of",
     lambda: ntl.cross_entropy_with_ntl(logits(3), labels(3), VOCAB, method="ce")),
    ("fused-labels>=V", ValueError, r"labels must be token ids in \[0, V=12\)",
     lambda: ntl.cross_entropy_with_ntl(logits(3), torch.tensor([0, 1, 99]), VOCAB)),
    ("fused-int-logits", TypeError, r"logits must be a floating-point tensor",
     lambda: ntl.cross_entropy_with_ntl(torch.ones(3, V, dtype=torch.long), labels(3), VOCAB)),
    # NTL from hidden states
    ("hidden-W-shape", ValueError, r"lm_head_weight shape \(12, 5\) does not match hidden size 4 .*expected \[V, 4\]",
     lambda: ntl.ntl_loss_from_hidden(torch.randn(3, 4), torch.randn(V, 5), labels(3), VOCAB)),
    ("hidden-W-1d", TypeError, r"lm_head_weight must be a 2-D float tensor \[V, H\]",
     lambda: ntl.ntl_loss_from_hidden(torch.randn(3, 4), torch.randn(V * 4), labels(3), VOCAB)),
    ("hidden-int", TypeError, r"hidden must be a floating-point tensor",
     lambda: ntl.ntl_loss_from_hidden(torch.ones(3, 4, dtype=torch.long), torch.randn(V, 4), labels(3), VOCAB)),
    ("hidden-temperature", ValueError, r"temperature must be a positive number, got 0",
     lambda: ntl.ntl_loss_from_hidden(torch.randn(3, 4), torch.randn(V, 4), labels(3), VOCAB, temperature=0)),
    ("hidden-bias-shape", ValueError, r"bias shape \(\d+,?\) must be \[V=12\]",
     lambda: ntl.ntl_loss_from_hidden(torch.randn(3, 4), torch.randn(V, 4), labels(3), VOCAB, bias=torch.zeros(10))),
    ("hidden-labels-shape", ValueError, r"labels shape \(4,\) does not match hidden.shape\[:-1\] \(3,\)",
     lambda: ntl.ntl_loss_from_hidden(torch.randn(3, 4), torch.randn(V, 4), labels(4), VOCAB)),
    ("hidden-vocab>V", ValueError, r"vocab larger than the logits",
     lambda: ntl.ntl_loss_from_hidden(torch.randn(3, 4), torch.randn(8, 4), labels(3), VOCAB)),
    ("digit-logits-W-shape", ValueError, r"lm_head_weight shape",
     lambda: ntl.digit_logits_from_hidden(torch.randn(3, 4), torch.randn(V, 3), VOCAB)),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "pattern", "thunk"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_call_raises(exc, pattern, thunk):
    with pytest.raises(exc, match=pattern) as info:
        thunk()
    assert type(info.value) is exc  # exactly the documented class, not a subclass surprise


def test_at_least_ten_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 10


def test_padded_vocab_is_not_an_error(qwen_tok):
    """Logits wider than the tokenizer (Qwen2.5: 151,936 vs 151,665) are fine; narrower is not."""
    x = torch.randn(2, 151_936)
    y = torch.tensor([15, 151_900])  # a digit and a padding id
    assert torch.isfinite(ntl.ntl_wasserstein_loss(x, y, qwen_tok))
    with pytest.raises(ValueError, match=re.escape("vocab_size=151665 but logits have V=1000")):
        ntl.ntl_wasserstein_loss(torch.randn(2, 1000), torch.tensor([15, 3]), qwen_tok)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("method", ["wasserstein", "mse"])
@pytest.mark.parametrize("reweigh", [False, True])
def test_no_number_labels_gives_attached_zero(method, reduction, reweigh):
    x = torch.randn(2, 3, V, requires_grad=True)
    y = torch.tensor([[10, -100, 11], [-100, -100, 10]])  # text and ignored only
    loss = ntl.ntl_loss(x, y, VOCAB, method=method, reduction=reduction, reweigh=reweigh)
    assert loss.dtype == torch.float32
    assert torch.equal(loss.detach(), torch.zeros(y.shape if reduction == "none" else ()))
    assert loss.requires_grad
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # zero, never NaN


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_number_labels_with_weights_and_empty_batch(reduction):
    x = torch.randn(0, V, requires_grad=True)
    loss = ntl.ntl_mse_loss(x, torch.zeros(0, dtype=torch.long), VOCAB, reduction=reduction,
                            weights=torch.zeros(0))
    assert not torch.isnan(loss).any()
    loss.sum().backward()
    assert x.grad.shape == (0, V)


@pytest.mark.parametrize("method", ["wasserstein", "mse"])
def test_non_participating_row_with_masked_digits_gets_zero_grad(method):
    x = torch.randn(3, V)
    x[1, :10] = float("-inf")  # this position cannot emit a digit (e.g. grammar-constrained)
    x.requires_grad_(True)
    y = torch.tensor([-100, -100, 10])  # nothing takes part
    loss = ntl.ntl_loss(x, y, VOCAB, method=method)
    assert loss.item() == 0.0
    loss.backward()
    assert not torch.isnan(x.grad).any()


def test_ignore_index_outside_vocab_is_accepted():
    x = torch.randn(4, V)
    y = torch.tensor([1, 3, 11, V + 1])
    ref = torch.nn.functional.cross_entropy(x, y, ignore_index=V + 1)
    assert torch.isfinite(ref)
    loss = ntl.ntl_wasserstein_loss(x, y, VOCAB, ignore_index=V + 1)
    torch.testing.assert_close(loss, ntl.ntl_wasserstein_loss(x[:3], y[:3], VOCAB))


def test_module_rejects_non_bool_reweigh():
    with pytest.raises(TypeError, match="reweigh must be a bool"):
        ntl.NumberTokenLoss(VOCAB, reweigh="no")
