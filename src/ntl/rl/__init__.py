"""The RL pieces of ntl: what a trainer adapter (``ntl_trl``, ``ntl_verl``) builds on.

* :mod:`ntl.rl.answers` - final-answer extraction and numeric comparison;
* :mod:`ntl.rl.targets` - number-token targets for sampled responses;
* :mod:`ntl.rl.metrics` - digit accuracy / confidence / probability metrics;
* :mod:`ntl.rl.rewards` - correctness and NTL-aware reward scoring;
* :mod:`ntl.rl.normalization` - verl's loss aggregation modes and the gradient-accumulation
  normaliser;
* :mod:`ntl.rl.logit_transform` - the model's logit map (logit scale, soft-cap, temperature);
* :mod:`ntl.rl.capture` - number-token logits from a backbone's last hidden state (the hook,
  the causal shift, the logit map, the number rows of a plain or sharded LM head).

Functions with a framework's signature live in its adapter. ``ntl.answers``, ``ntl.targets``,
``ntl.metrics``, ``ntl.rewards``, ``ntl.aggregation``, ``ntl.accumulation`` and
``ntl.logit_transform`` are aliases of these modules (the same module objects).
Submodules load on first use.
"""

from __future__ import annotations

from typing import Any

_SUBMODULES = ("answers", "capture", "logit_transform", "metrics", "normalization", "rewards", "targets")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
