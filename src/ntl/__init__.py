"""ntl: the Number Token Loss for PyTorch, with fused Triton kernels.

Quick start::

    import ntl
    loss = ntl.ntl_mse_loss(logits[:, :-1], labels[:, 1:], tokenizer)
"""

from ._checks import set_strict_checks
from .fused import cross_entropy_with_ntl
from .hidden import digit_logits_from_hidden, ntl_loss_from_digit_logits, ntl_loss_from_hidden
from .linear import LinearCrossEntropyWithNTL, linear_cross_entropy_with_ntl
from .losses import gaussian_targets, ntl_loss, ntl_mse_loss, ntl_wasserstein_loss, shift_labels
from .metrics import DigitStats, digit_stats
from .module import NumberTokenLoss
from .vocab import DigitVocab, NumberVocab, resolve_vocab

__version__ = "0.1.0"

__all__ = [
    "DigitStats",
    "DigitVocab",
    "LinearCrossEntropyWithNTL",
    "NumberTokenLoss",
    "NumberVocab",
    "__version__",
    "cross_entropy_with_ntl",
    "digit_logits_from_hidden",
    "digit_stats",
    "gaussian_targets",
    "linear_cross_entropy_with_ntl",
    "ntl_loss",
    "ntl_loss_from_digit_logits",
    "ntl_loss_from_hidden",
    "ntl_mse_loss",
    "ntl_wasserstein_loss",
    "resolve_vocab",
    "set_strict_checks",
    "shift_labels",
]
