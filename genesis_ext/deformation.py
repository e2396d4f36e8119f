"""Deprecated: renamed :mod:`genesis_ext.user_deformations` (this name goes in the next release)."""

import warnings

from ._util import deprecated_aliases
from .streams import Purpose
from .user_deformations import *  # noqa: F403
from .user_deformations import __all__  # noqa: F401

warnings.warn(
    "genesis_ext.deformation is deprecated, use genesis_ext.user_deformations", DeprecationWarning, stacklevel=2
)
__getattr__ = deprecated_aliases(__name__, {"USER_PURPOSE": ("genesis_ext.streams.Purpose.USER", lambda: Purpose.USER)})
