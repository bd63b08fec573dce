"""Alias of :mod:`ntl.kernels.number_columns` (this module's former name): the same module object."""

import sys

from . import number_columns

sys.modules[__name__] = number_columns
