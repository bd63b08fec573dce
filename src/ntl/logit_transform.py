"""Alias of :mod:`ntl.rl.logit_transform`, where this module moved.

``ntl.logit_transform`` *is* that module object (``sys.modules``), so ``from ntl.logit_transform import x``
and monkeypatching ``ntl.logit_transform.x`` keep working.
"""

import sys

from .rl import logit_transform as _module
from .rl.logit_transform import *  # noqa: F403  (the names for type checkers; replaced below at run time)

sys.modules[__name__] = _module
