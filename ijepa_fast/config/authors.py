"""The authors' YAML format (facebookresearch/ijepa ``configs/*.yaml``), translated to ours.

Their files have five sections: ``data``, ``logging``, ``mask``, ``meta``, ``optimization``.
``translate`` maps every key they read to our ``{section: {key: value}}`` form; ``config.from_dict``
then type-checks and validates the values as for any of our own files. Keys outside their schema
are errors that name ``section.key`` and the nearest key of theirs.

Keys they have and we do not need:
- ``data.use_color_distortion``, ``use_gaussian_blur``, ``use_horizontal_flip``,
  ``color_jitter_strength``: I-JEPA uses no hand-crafted view augmentations, and all four are
  off in every config of theirs. Off is accepted; on is an error (we do not implement them).
- ``meta.load_checkpoint``, ``meta.read_checkpoint``: resuming is ``--resume`` on our command
  line, from the run folder's latest checkpoint; a warning says so when either is set.
- ``meta.copy_data``: their cluster's copy of the data to local disk; ignored.

Their ``mask.min_keep`` is read as ours plus one: their sampler redraws a context of ``min_keep``
patches or fewer, ours keeps at least ``min_keep`` (their 10 is our 11).

Their placeholder ``logging.folder: $replace_this_with_path...`` is not a folder name: it leaves
``run.out_dir`` as it is (the default, or a command-line override), with a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from ijepa_fast.runtime.errors import ConfigError, nearest_hint

AUTHORS_SECTIONS = ("data", "logging", "mask", "meta", "optimization")
# Sections only ours have; a file with any of them is in our format.
_OUR_ONLY_SECTIONS = ("model", "optim", "speed", "run")

# Their key -> our "section.key" (None: handled by a rule in ``translate``).
_RENAMES: dict[str, dict[str, str | None]] = {
    "data": {
        "batch_size": "data.batch_size",
        "crop_size": "data.crop_size",
        "crop_scale": "data.crop_scale",
        "num_workers": "data.num_workers",
        "pin_mem": "data.pin_memory",
        "root_path": None,  # data.root = root_path / image_folder, as their ImageNet reader joins them
        "image_folder": None,
        "use_color_distortion": None,
        "use_gaussian_blur": None,
        "use_horizontal_flip": None,
        "color_jitter_strength": None,
    },
    "logging": {
        "folder": None,  # run.out_dir, unless it is their placeholder
        "write_tag": "run.name",
    },
    "mask": {
        "patch_size": "model.patch_size",
        "aspect_ratio": "mask.aspect_ratio",
        "enc_mask_scale": "mask.enc_scale",
        "pred_mask_scale": "mask.pred_scale",
        "min_keep": None,  # mask.min_keep = min_keep + 1: they keep a context of more than min_keep patches
        "num_enc_masks": None,  # must be 1: the method samples one context block
        "num_pred_masks": "mask.num_pred_masks",
        "allow_overlap": "mask.allow_overlap",
    },
    "meta": {
        "model_name": "model.name",
        "pred_depth": "model.pred_depth",
        "pred_emb_dim": "model.pred_emb_dim",
        "use_bfloat16": None,  # true: run.dtype auto (bf16 where the device has native bf16); false: fp32
        "load_checkpoint": None,
        "read_checkpoint": None,
        "copy_data": None,
    },
    "optimization": {
        "ema": "optim.ema",
        "epochs": "optim.epochs",
        "final_lr": "optim.final_lr",
        "final_weight_decay": "optim.final_weight_decay",
        "ipe_scale": "optim.ipe_scale",
        "lr": "optim.lr",
        "start_lr": "optim.start_lr",
        "warmup": "optim.warmup_epochs",
        "weight_decay": "optim.weight_decay",
    },
}

# The authors' files hold "$replace_this_with_..." where the user must put a path.
_PLACEHOLDER = "$replace_this"

_AUGMENTATIONS = ("use_color_distortion", "use_gaussian_blur", "use_horizontal_flip", "color_jitter_strength")


def is_authors_format(raw: dict[str, Any]) -> bool:
    """True when ``raw`` reads as one of the authors' files.

    That is: it has ``meta``, ``optimization`` or ``logging`` (sections only theirs have) and none
    of ``model``, ``optim``, ``speed``, ``run`` (only ours). A misspelt section in an authors'
    file (``optimisation``) is then reported by ``translate`` against their section names.
    """
    sections = set(raw)
    return bool(sections & {"meta", "optimization", "logging"}) and not sections & set(_OUR_ONLY_SECTIONS)


def translate(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Map an authors' config dict to our ``{section: {key: value}}`` form (values unchecked)."""
    out: dict[str, dict[str, Any]] = {}

    def put(dotted: str, value: Any) -> None:
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = value

    for section, values in raw.items():
        if section not in _RENAMES:
            raise ConfigError(
                f"unknown section '{section}' in an authors' config{nearest_hint(section, list(AUTHORS_SECTIONS))}"
            )
        if values is None:  # an empty section (`logging:` with nothing under it)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        schema = _RENAMES[section]
        for key, value in values.items():
            if key not in schema:
                raise ConfigError(
                    f"unknown config key '{section}.{key}' in an authors' config{nearest_hint(key, list(schema))}"
                )
            if schema[key] is not None:
                put(schema[key], value)

    data = raw.get("data") or {}
    for key in _AUGMENTATIONS:
        value = data.get(key)
        if value not in (None, False, 0):  # 0 and 0.0 compare equal to False
            raise ConfigError(
                f"data.{key}={value!r} is not supported: I-JEPA here uses no hand-crafted "
                f"view augmentations (set it to {'0.0' if key == 'color_jitter_strength' else 'false'})"
            )
    if "root_path" in data or "image_folder" in data:
        # Kept as given, placeholders included: the trainer's data check rejects a missing folder.
        parts = [str(data[k]) for k in ("root_path", "image_folder") if data.get(k) not in (None, "")]
        put("data.root", os.path.join(*parts) if parts else "")

    mask = raw.get("mask") or {}
    if "min_keep" in mask:  # their sampler redraws while len(mask) <= min_keep; ours keeps at least min_keep
        keep = mask["min_keep"]
        put("mask.min_keep", keep + 1 if isinstance(keep, int) and not isinstance(keep, bool) else keep)
    enc_masks = mask.get("num_enc_masks", 1)
    if enc_masks != 1:  # several context blocks would only repeat the targets; every config of theirs has 1
        raise ConfigError(f"mask.num_enc_masks={enc_masks!r} is not supported: the method samples one context block")

    folder = (raw.get("logging") or {}).get("folder")
    if isinstance(folder, str) and folder.startswith(_PLACEHOLDER):
        warnings.warn(
            f"logging.folder={folder!r} is the authors' placeholder, not a folder: run folders go under "
            "run.out_dir (default 'runs'; set run.out_dir=DIR to choose)",
            UserWarning,
            stacklevel=2,
        )
    elif folder is not None:
        put("run.out_dir", folder)

    meta = raw.get("meta") or {}
    if "use_bfloat16" in meta:
        bf16 = meta["use_bfloat16"]
        if not isinstance(bf16, bool):
            raise ConfigError(f"meta.use_bfloat16={bf16!r} is invalid: expected true or false")
        put("run.dtype", "auto" if bf16 else "fp32")
    if meta.get("load_checkpoint") or meta.get("read_checkpoint"):
        warnings.warn(
            "meta.load_checkpoint / meta.read_checkpoint are ignored: pass --resume to continue "
            "the run folder's latest checkpoint",
            UserWarning,
            stacklevel=2,
        )
    return out
