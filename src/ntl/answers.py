"""Alias of :mod:`ntl.rl.answers`, where this module moved.

``ntl.answers`` *is* that module object (``sys.modules``), so ``from ntl.answers import x``
and monkeypatching ``ntl.answers.x`` keep working.
"""

import sys

from .rl import answers as _module
from .rl.answers import *  # noqa: F403  (the names for type checkers; replaced below at run time)

sys.modules[__name__] = _module
