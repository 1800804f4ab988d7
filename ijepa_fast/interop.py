"""Deprecated: ``ijepa_fast.interop`` moved to ``ijepa_fast.io``. Importing it warns once and gives
the same objects as ``ijepa_fast.io.interop``."""

import warnings

from ijepa_fast.io.interop import *  # noqa: F403 (the old module's public names)
from ijepa_fast.io.interop import __all__ as __all__

warnings.warn(
    "ijepa_fast.interop moved to ijepa_fast.io; import from ijepa_fast.io.load (load_encoder), "
    "ijepa_fast.io.authors, ijepa_fast.io.safetensors_timm, ijepa_fast.io.hf or ijepa_fast.io.interop",
    DeprecationWarning,
    stacklevel=2,
)
