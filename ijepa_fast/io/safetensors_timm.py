"""Safetensors and timm: our encoder in and out of ``.safetensors`` files, and under timm's names.

``export_safetensors(encoder, path)`` writes the state dict (the authors' parameter names) and the
architecture as string metadata; ``load_safetensors_encoder`` rebuilds it.
``to_timm_state_dict(encoder)`` and ``timm_kwargs(encoder)`` give a state dict and the constructor
arguments of timm's ``VisionTransformer`` that computes the same features (see ``TIMM_KEY_MAP``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ijepa_fast.io.checkpoint import NotACheckpointError
from ijepa_fast.io.encoder import EncoderSpec, build_encoder_from_state_dict, check_stated, load_state_strict
from ijepa_fast.io.outputs import write_files
from ijepa_fast.models.vit import VisionTransformer
from ijepa_fast.runtime.optional import require

SAFETENSORS_FORMAT = "ijepa_fast-encoder/1"


# ----------------------------------------------------------------------------- safetensors


def _safetensors_torch(feature: str):
    """``safetensors.torch`` (save_file, safe_open), or a clear error naming the install command."""
    require("safetensors", feature)
    import safetensors.torch

    return safetensors.torch


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None):
    """``safetensors.torch.save_file``, a failed write (a full disk) raised as the OSError it is:
    safetensors reports one as a SafetensorError, the OS error's number only in its message."""
    st = _safetensors_torch("writing safetensors files")
    from safetensors import SafetensorError

    try:
        st.save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def export_safetensors(encoder: VisionTransformer, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the encoder's state dict (the authors' names, fp32 unless the model is otherwise) and its
    architecture (``EncoderSpec`` fields, strings) to ``path``, atomically."""
    _safetensors_torch("exporting to safetensors")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {"format": SAFETENSORS_FORMAT, **EncoderSpec.of(encoder).to_metadata(), **(metadata or {})}
    meta = {k: str(v) for k, v in meta.items()}
    path = Path(path)
    write_files([(path, lambda tmp: save_safetensors(tensors, tmp, meta))])
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a damaged one is a ``NotACheckpointError``."""
    st = _safetensors_torch("reading safetensors files")
    from safetensors import SafetensorError

    try:
        with st.safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SafetensorError as err:
        raise NotACheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    return tensors, meta


def load_safetensors_encoder(
    path: str | Path, model: str | None = None, patch_size: int | None = None, img_size: int | None = None
) -> tuple[VisionTransformer, EncoderSpec, dict[str, str]]:
    """(encoder, spec, metadata) from ``export_safetensors``' file, whose metadata give the architecture
    (a ``model``, ``patch_size`` or ``img_size`` that differs is refused), or from any safetensors file
    holding an encoder state dict with the authors' names (the size from the shapes and those three)."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != SAFETENSORS_FORMAT:
        spec_kwargs = {"model": model, "patch_size": patch_size, "img_size": img_size}
        return (*build_encoder_from_state_dict(tensors, str(path), **spec_kwargs), meta)
    spec = EncoderSpec.from_metadata(meta)
    stated = {"model": (model, spec.name or "custom"), "patch": (patch_size, spec.patch_size)}
    check_stated(str(path), {**stated, "img-size": (img_size, spec.img_size)})
    encoder, spec = build_encoder_from_state_dict(tensors, str(path), spec=spec)
    return encoder, spec, meta


# ----------------------------------------------------------------------------- timm

# Our (the authors') parameter name -> timm VisionTransformer's, as regex substitutions applied in
# order. The names coincide: patch_embed.proj, pos_embed [1, N, D] (no class-token slot because
# class_token=False), blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm. The
# table is the documentation and the place to change should either side rename a parameter.
TIMM_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^pos_embed$", "pos_embed"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", r"blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
)


# The registered timm model an export loads into, with ``timm_kwargs`` setting its size: timm's
# ViTs without class token and with average pooling (the I-JEPA ones are vit_huge_patch14_gap_224
# and kin). Its own defaults are not ours (16 heads at width 768), so the kwargs always go with it.
TIMM_GAP_MODEL = "vit_base_patch16_gap_224"


def timm_key(name: str) -> str:
    for pattern, repl in TIMM_KEY_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f"no timm name for parameter {name!r}")


def to_timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names (``TIMM_KEY_MAP``), for the model of ``timm_kwargs``."""
    return {timm_key(k): v.detach().clone() for k, v in encoder.state_dict().items()}


def timm_kwargs(encoder: VisionTransformer | EncoderSpec) -> dict[str, Any]:
    """Constructor kwargs of ``timm.models.vision_transformer.VisionTransformer`` that compute our
    average-pooled features: ``model(x) == encoder(x).mean(1)``.

    - ``class_token=False``, ``no_embed_class=True``: no class token; pos_embed is [1, N, D].
    - ``global_pool="avg"`` with ``fc_norm=False``: timm keeps ``norm`` on every token and pools
      after it (``fc_norm=None`` would move the LayerNorm after the pooling, which is not I-JEPA's
      feature: the average of the normed tokens).
    - ``num_classes=0``: no head. ``qkv_bias=True``, LayerNorm eps 1e-6, exact GELU, as the authors.
    The position embedding becomes a learnable parameter in timm holding the fixed sin-cos table.
    """
    spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.of(encoder)
    return dict(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=3,
        num_classes=0,
        global_pool="avg",
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        class_token=False,
        no_embed_class=True,
        fc_norm=False,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    )


def build_timm_model(encoder: VisionTransformer) -> nn.Module:
    """timm's VisionTransformer with the encoder's weights (strict); needs timm."""
    require("timm", "building a timm model")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = TimmViT(**timm_kwargs(encoder))
    return load_state_strict(model, to_timm_state_dict(encoder), "timm VisionTransformer")
