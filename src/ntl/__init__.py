"""ntl: the Number Token Loss for PyTorch, with fused Triton kernels.

Quick start::

    import ntl
    # causal LM: logits [B, T, V] predict the next token; shift the labels, not the logits
    loss = ntl.ntl_mse_loss(logits, ntl.shift_labels(labels), tokenizer)
    loss = ntl.cross_entropy_with_ntl(logits, ntl.shift_labels(labels), tokenizer, ntl_weight=0.3)
"""

from typing import TYPE_CHECKING

from . import methods
from ._checks import set_strict_checks
from .fused import cross_entropy_with_ntl
from .hidden import digit_logits_from_hidden, ntl_loss_from_digit_logits, ntl_loss_from_hidden
from .linear import LinearCrossEntropyWithNTL, linear_cross_entropy_with_ntl
from .losses import (
    gaussian_targets,
    ntl_dot_loss,
    ntl_loss,
    ntl_mse_loss,
    ntl_wasserstein_loss,
    shift_labels,
)
from .module import NumberTokenLoss
from .number_level import number_level_loss, predict_numbers
from .parallel import vocab_parallel_ntl_loss, vocab_parallel_ntl_loss_from_hidden
from .rl.metrics import DigitStats, digit_stats
from .vocab import DigitVocab, NumberVocab, resolve_vocab, vocab_for_tokenizer

if TYPE_CHECKING:  # the lazy submodules below, for type checkers (loaded on first use)
    from . import answers as answers
    from . import rewards as rewards
    from . import rl as rl
    from . import targets as targets
    from . import tokenizers as tokenizers

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
    "methods",
    "ntl_dot_loss",
    "ntl_loss",
    "ntl_loss_from_digit_logits",
    "ntl_loss_from_hidden",
    "ntl_mse_loss",
    "ntl_wasserstein_loss",
    "number_level_loss",
    "predict_numbers",
    "resolve_vocab",
    "set_strict_checks",
    "shift_labels",
    "vocab_for_tokenizer",
    "vocab_parallel_ntl_loss",
    "vocab_parallel_ntl_loss_from_hidden",
]


def __getattr__(name: str) -> object:
    """Documented submodules (``ntl.tokenizers.qwen2_tokenizer()``, ``ntl.answers``, ...) load
    on first use (PEP 562), so ``import ntl`` stays light."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ntl' has no attribute {name!r}")


_SUBMODULES = ("answers", "checks", "rewards", "rl", "targets", "tokenizers")
