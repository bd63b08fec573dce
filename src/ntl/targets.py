"""Alias of :mod:`ntl.rl.targets`, where this module moved.

``ntl.targets`` *is* that module object (``sys.modules``), so ``from ntl.targets import x``
and monkeypatching ``ntl.targets.x`` keep working.
"""

import sys

from .rl import targets as _module
from .rl.targets import *  # noqa: F403  (the names for type checkers; replaced below at run time)

sys.modules[__name__] = _module
