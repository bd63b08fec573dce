"""Argument checks that adapters and user code share with the losses (public, stable).

The losses validate their own arguments; a framework adapter (``ntl_trl``, ``ntl_verl``, a
third one) validates its settings at set-up with these, so a bad value fails at start-up with
the same message the losses would give at the first step.

* :func:`check_method`: a loss method name (``"w1"`` normalised to ``"wasserstein"``).
* :func:`check_ntl_weight`: a finite Python number ``>= 0``.
"""

from __future__ import annotations

from ._checks import check_method, check_ntl_weight

__all__ = ["check_method", "check_ntl_weight"]
