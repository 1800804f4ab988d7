"""The authors' checkpoint (``.pth.tar``): ``module.``-prefixed ``encoder`` / ``target_encoder`` /
``predictor`` state dicts and no config, so the model size is inferred from the tensor shapes or
given by the caller. ``load_authors_checkpoint`` loads all three; ``load_encoder`` reads one encoder
of it through ``_detect_authors`` / ``_load_authors``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ijepa_fast.io.checkpoint import load_file
from ijepa_fast.io.encoder import (
    ENCODER_KEYS,
    EncoderSpec,
    LoadedEncoder,
    _materialise,
    _pick,
    _scalar_meta,
    build_encoder_from_state_dict,
    infer_encoder_spec,
    infer_predictor_kwargs,
    strip_module_prefix,
)
from ijepa_fast.io.paths import resolve_checkpoint_path
from ijepa_fast.models.vit import VisionTransformer, VisionTransformerPredictor


@dataclass
class AuthorsCheckpoint:
    """The authors' checkpoint, loaded strictly into our modules (prefixes stripped)."""

    encoder: VisionTransformer
    target_encoder: VisionTransformer
    predictor: VisionTransformerPredictor | None
    spec: EncoderSpec
    meta: dict[str, Any]  # epoch, loss, batch_size, world_size, lr
    opt: dict[str, Any] | None = None  # their AdamW state dict, untouched


def _detect_authors(ckpt: Any) -> bool:
    return (
        isinstance(ckpt, Mapping)
        and "format" not in ckpt
        and any(isinstance(ckpt.get(k), Mapping) for k in ENCODER_KEYS)
    )


def _load_authors(
    ckpt: Mapping[str, Any], which: str, path: Path, model=None, patch_size=None, img_size=None
) -> LoadedEncoder:
    encoder, spec = build_encoder_from_state_dict(
        _pick(ckpt, which, path), f"{path} [{which}]", model=model, patch_size=patch_size, img_size=img_size
    )
    return LoadedEncoder(encoder, spec, "authors", which, str(path), _scalar_meta(ckpt))


def load_authors_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    patch_size: int | None = None,
    img_size: int | None = None,
    predictor: bool = True,
    trust: bool = False,
) -> AuthorsCheckpoint:
    """The authors' ``.pth.tar``: context encoder, target encoder and predictor, strictly loaded.

    Shapes give the architecture (see ``infer_encoder_spec``); the predictor's depth, width and MLP
    ratio come from its own tensors and its heads are the encoder's (as the authors build it).
    """
    path = resolve_checkpoint_path(path)
    ckpt = load_file(path, trust=trust)
    if not _detect_authors(ckpt):
        raise ValueError(
            f"{path} is not in the authors' format (encoder / target_encoder / predictor state dicts "
            f"without a 'format' key)"
        )
    target_sd = _pick(ckpt, "target_encoder", path)
    spec = infer_encoder_spec(target_sd, model=model, patch_size=patch_size, img_size=img_size)
    target, _ = build_encoder_from_state_dict(target_sd, f"{path} [target_encoder]", spec=spec)
    encoder, _ = build_encoder_from_state_dict(_pick(ckpt, "encoder", path), f"{path} [encoder]", spec=spec)
    pred = None
    if predictor:
        if not isinstance(ckpt.get("predictor"), Mapping):
            raise KeyError(f"{path} has no 'predictor' state dict (pass predictor=False to skip it)")
        pred_sd = strip_module_prefix(ckpt["predictor"])
        kwargs = infer_predictor_kwargs(pred_sd, spec)
        with torch.device("meta"):
            module = VisionTransformerPredictor(**kwargs)
        pred = _materialise(
            module, pred_sd, f"{path} [predictor]", f"built with {json.dumps({k: v for k, v in kwargs.items()})}"
        )
    opt = ckpt.get("opt") if isinstance(ckpt.get("opt"), Mapping) else None
    return AuthorsCheckpoint(encoder, target, pred, spec, _scalar_meta(ckpt), opt)
