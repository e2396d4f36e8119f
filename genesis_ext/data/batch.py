"""Deprecated: renamed :mod:`genesis_ext.data.extraction` (this name goes in the next release)."""

import warnings

from .extraction import *  # noqa: F403
from .extraction import __all__  # noqa: F401

warnings.warn("genesis_ext.data.batch is deprecated, use genesis_ext.data.extraction", DeprecationWarning, stacklevel=2)
