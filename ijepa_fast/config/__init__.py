"""Typed run configuration: dataclasses validated at load, errors that name the bad key.

A config is five sections (model, mask, data, optim, run) plus ``speed`` (the optimisation
switches) and ``online_probe`` (scoring the encoder while it trains). It loads from our own
YAML/dict form, from the authors' YAML files (sections data, logging, mask, meta, optimization; see
``ijepa_fast.config.authors``), and takes ``key=value`` overrides such as ``optim.lr=5e-4``. The
resolved config is written into every run folder. The choice lists live in ``config.choices``,
which the modules implementing them read: importing the config imports no torch.
The comment beside a field is its documentation (``describe`` prints them for ``--help``).
"""

from ijepa_fast.config.parse import (
    apply_overrides,
    describe,
    field_comments,
    find_config,
    from_dict,
    load,
    packaged_configs,
    save,
    to_yaml,
)
from ijepa_fast.config.schema import (
    AUTHORS_SPEED,
    RESUME_MAY_CHANGE,
    Config,
    DataConfig,
    MaskConfig,
    ModelConfig,
    OnlineProbeConfig,
    OptimConfig,
    RunConfig,
    SpeedConfig,
    differences,
    flatten,
)
from ijepa_fast.runtime.errors import ConfigError

__all__ = [
    "AUTHORS_SPEED",
    "RESUME_MAY_CHANGE",
    "Config",
    "ConfigError",
    "DataConfig",
    "MaskConfig",
    "ModelConfig",
    "OnlineProbeConfig",
    "OptimConfig",
    "RunConfig",
    "SpeedConfig",
    "apply_overrides",
    "describe",
    "differences",
    "field_comments",
    "find_config",
    "flatten",
    "from_dict",
    "load",
    "packaged_configs",
    "save",
    "to_yaml",
]
