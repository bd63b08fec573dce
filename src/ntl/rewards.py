"""Alias of :mod:`ntl.rl.rewards`, where this module moved.

``ntl.rewards`` *is* that module object (``sys.modules``), so ``from ntl.rewards import x``
and monkeypatching ``ntl.rewards.x`` keep working.
"""

import sys
from typing import TYPE_CHECKING

from .rl import rewards as _module
from .rl.rewards import *  # noqa: F403  (the names for type checkers; replaced below at run time)

if TYPE_CHECKING:  # the moved framework signatures (handed out by ntl.rl.rewards.__getattr__)
    from ntl_trl.rewards import TRUTH_COLUMNS as TRUTH_COLUMNS
    from ntl_trl.rewards import completion_text as completion_text
    from ntl_trl.rewards import correctness_reward as correctness_reward
    from ntl_trl.rewards import make_ntl_reward as make_ntl_reward
    from ntl_trl.rewards import proximity_reward as proximity_reward
    from ntl_verl.batch import scatter_to_last_token as scatter_to_last_token

sys.modules[__name__] = _module
