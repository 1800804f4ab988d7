"""The one place where optional dependencies are detected.

Each probe imports lazily (on first call, never at import of this module) and caches the result.
``require(name, feature)`` raises a clear error naming what to install when a requested feature
needs a package that is missing.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

# name -> (import name, install hint). The hints name the setup.py extra that declares the package;
# the core dependencies (tensorboard, matplotlib, safetensors) are probed too, for a broken install.
_PACKAGES: dict[str, tuple[str, str]] = {
    "triton": ("triton", "pip install 'ijepa_fast[gpu]'  (or: pip install triton)"),
    "deepspeed": ("deepspeed", "pip install 'ijepa_fast[gpu]'  (or: pip install deepspeed==0.19.8)"),
    "dali": ("nvidia.dali", "pip install 'ijepa_fast[gpu]'  (nvidia-dali-cuda130; CUDA 12: nvidia-dali-cuda120)"),
    "flash_attn": ("flash_attn", "pip install 'ijepa_fast[flash]' --no-build-isolation  (needs a CUDA GPU)"),
    # FlashAttention-3 (Hopper): built from the flash-attention repository's hopper/ folder.
    "flash_attn_interface": (
        "flash_attn_interface",
        "cd flash-attention/hopper && python setup.py install  (needs a Hopper GPU)",
    ),
    "xformers": ("xformers.ops", "pip install 'ijepa_fast[xformers]'  (needs a CUDA GPU)"),
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    "matplotlib": ("matplotlib", "pip install matplotlib"),
    "safetensors": ("safetensors", "pip install safetensors"),
    "timm": ("timm", "pip install 'ijepa_fast[timm]'"),
    "wandb": ("wandb", "pip install 'ijepa_fast[wandb]'"),
    # float8 for the target encoder (speed.fp8_target); the float8 module is what it uses
    "torchao": ("torchao.float8", "pip install 'ijepa_fast[fp8]'"),
    # The CPU loader's JPEG decoder (libjpeg-turbo, reduced-scale decode); Pillow stands in without it.
    "simplejpeg": ("simplejpeg", "pip install simplejpeg"),
}


class MissingDependencyError(ImportError):
    """A requested feature needs an optional package that is not installed."""


@functools.cache
def _try_import(name: str) -> ModuleType | None:
    if name not in _PACKAGES:
        raise KeyError(f"unknown optional dependency {name!r}; known: {sorted(_PACKAGES)}")
    try:
        return importlib.import_module(_PACKAGES[name][0])
    except Exception:  # a broken install (e.g. missing CUDA libs) counts as missing
        return None


def known() -> list[str]:
    """The names ``available`` and ``require`` accept, in a fixed order."""
    return list(_PACKAGES)


def import_name(name: str) -> str:
    """The module ``available(name)`` imports."""
    return _PACKAGES[name][0]


def install_hint(name: str) -> str:
    """What to run to install the optional package ``name``."""
    return _PACKAGES[name][1]


def available(name: str) -> bool:
    """True when the optional package ``name`` (a key of ``_PACKAGES``) imports."""
    return _try_import(name) is not None


def require(name: str, feature: str) -> ModuleType:
    """Return the imported module, or raise naming the feature and the install command."""
    module = _try_import(name)
    if module is None:
        hint = _PACKAGES[name][1]
        raise MissingDependencyError(f"{feature} needs the optional package '{name}', which is not installed: {hint}")
    return module
