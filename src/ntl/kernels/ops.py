"""Alias of :mod:`ntl.kernels.ntl_loss` (the standalone loss's autograd Function and custom ops
now live beside its kernels): the same module object."""

import sys

from . import ntl_loss

sys.modules[__name__] = ntl_loss
