"""Alias of :mod:`ntl.kernels.number_mass` (this module's former name): the same module object."""

import sys

from . import number_mass

sys.modules[__name__] = number_mass
