"""Alias of :mod:`ntl.kernels.ntl_loss` (this module's former name): the same module object."""

import sys

from . import ntl_loss

sys.modules[__name__] = ntl_loss
