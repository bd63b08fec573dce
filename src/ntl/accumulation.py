"""Alias of :mod:`ntl.rl.normalization`, where this module moved.

``ntl.accumulation`` *is* that module object (``sys.modules``), so ``from ntl.accumulation import x``
and monkeypatching ``ntl.accumulation.x`` keep working.
"""

import sys

from .rl import normalization as _module
from .rl.normalization import *  # noqa: F403  (the names for type checkers; replaced below at run time)

sys.modules[__name__] = _module
