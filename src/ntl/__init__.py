"""ntl: the Number Token Loss for PyTorch, with fused Triton kernels.

Quick start::

    import ntl
    loss = ntl.ntl_mse_loss(logits[:, :-1], labels[:, 1:], tokenizer)
"""

from ._checks import set_strict_checks
from .losses import gaussian_targets, ntl_loss, ntl_mse_loss, ntl_wasserstein_loss
from .module import NumberTokenLoss
from .vocab import DigitVocab, NumberVocab, resolve_vocab

__version__ = "0.1.0"

__all__ = [
    "DigitVocab",
    "NumberTokenLoss",
    "NumberVocab",
    "__version__",
    "gaussian_targets",
    "ntl_loss",
    "ntl_mse_loss",
    "ntl_wasserstein_loss",
    "resolve_vocab",
    "set_strict_checks",
]
