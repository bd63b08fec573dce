"""Alias of :mod:`ntl.rl.metrics`, where this module moved.

``ntl.metrics`` *is* that module object (``sys.modules``), so ``from ntl.metrics import x``
and monkeypatching ``ntl.metrics.x`` keep working.
"""

import sys

from .rl import metrics as _module
from .rl.metrics import *  # noqa: F403  (the names for type checkers; replaced below at run time)

sys.modules[__name__] = _module
