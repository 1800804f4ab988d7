"""Deprecated: ``ijepa_fast.trainer`` moved to ``ijepa_fast.train.trainer``. Importing it warns once
and gives the same objects."""

import warnings

from ijepa_fast.train.trainer import (
    RUN_FILES,
    RUN_FOLDER_SETTINGS,
    Aborted,
    NonFiniteLossError,
    RunResult,
    Trainer,
)

__all__ = ["RUN_FILES", "RUN_FOLDER_SETTINGS", "Aborted", "NonFiniteLossError", "RunResult", "Trainer"]

warnings.warn(
    "ijepa_fast.trainer moved to ijepa_fast.train; import from ijepa_fast.train.trainer",
    DeprecationWarning,
    stacklevel=2,
)
