"""Alias of :mod:`ntl.kernels.ce_ntl` (this module's former name): the same module object."""

import sys

from . import ce_ntl

sys.modules[__name__] = ce_ntl
