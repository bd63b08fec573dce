"""TRL adapter for ntl: the Number Token Loss in GRPO/RLOO (mixin), any trainer (callback),
and supervised fine-tuning (SFT mixin).

* :class:`NTLConfig` - RL options (weight, method, labels, answer column).
* :class:`NTLTrainerMixin`, :class:`NTLGRPOTrainer`, :class:`NTLRLOOTrainer` - TRL 1.16.
* :class:`NTLSFTConfig`, :class:`NTLSFTMixin` - NTL on the supervised number tokens;
  :class:`NTLSFTTrainer` (``trl.SFTTrainer``) and :class:`NTLTrainer` (plain
  ``transformers.Trainer``, no TRL needed).
* :class:`NTLCallback` - gradient injection; also ``trl.experimental.ppo.PPOTrainer`` (TRL <= 1.12).
* :mod:`ntl_trl._capture` - NTL inside the policy forward from the backbone's hidden states
  (:class:`~ntl_trl._capture.HiddenNTLCapture`), shared by every route.
* :mod:`ntl_trl.rewards` - TRL reward functions (correctness, proximity bonus).

Every route uses the model's whole number vocabulary (:func:`ntl.vocab_for_tokenizer`: the ten
digits for Qwen2.5-style tokenizers, all 1,110 number tokens ``'0'..'999'`` for Llama-3).
All NTL math lives in :mod:`ntl`; see adapters/trl/README.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import NTLConfig, NTLSFTConfig

if TYPE_CHECKING:  # the lazy names below, for type checkers (imported on first use at run time)
    from .callback import NTLCallback
    from .sft import NTLSFTTrainer
    from .supervised import NTLSFTMixin, NTLTrainer
    from .trainer import NTLGRPOTrainer, NTLRLOOTrainer, NTLTrainerMixin

__all__ = [
    "NTLCallback",
    "NTLConfig",
    "NTLGRPOTrainer",
    "NTLRLOOTrainer",
    "NTLSFTConfig",
    "NTLSFTMixin",
    "NTLSFTTrainer",
    "NTLTrainer",
    "NTLTrainerMixin",
]

_LAZY = {
    "NTLCallback": "callback",
    "NTLTrainerMixin": "trainer",
    "NTLGRPOTrainer": "trainer",
    "NTLRLOOTrainer": "trainer",
    "NTLSFTMixin": "supervised",
    "NTLTrainer": "supervised",
    "NTLSFTTrainer": "sft",
}


def __getattr__(name: str) -> Any:  # trl/transformers are imported on first use only
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
