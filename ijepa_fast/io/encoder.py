"""Our encoder from a bare state dict, the piece every checkpoint format shares.

``infer_encoder_spec`` reads the architecture from the tensor shapes (the authors' parameter names),
``EncoderSpec`` holds it and rebuilds the encoder, and ``build_encoder_from_state_dict`` loads the
weights strictly: missing keys, unexpected keys and shape mismatches raise
``CheckpointMismatchError``, which lists every one of them. ``LoadedEncoder`` is what every loader
returns; ``ENCODER_KEYS`` / ``WHICH_ALIASES`` name the two encoders a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ijepa_fast.models.vit import VIT_SIZES, VisionTransformer, grid_size
from ijepa_fast.runtime.errors import ConfigError

ENCODER_KEYS = ("target_encoder", "encoder")
# What the command lines' --which also accepts: context (the encoder the predictor reads) and target (its EMA).
WHICH_ALIASES = {"target": "target_encoder", "context": "encoder"}


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the model; the message lists every missing, unexpected and
    mismatched key."""

    def __init__(
        self,
        what: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple, tuple]],
        hint: str = "",
    ):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{what}: the checkpoint does not fit the model"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es) (checkpoint vs model):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]
        if missing:
            lines.append(f"  {len(missing)} key(s) missing from the checkpoint:")
            lines += [f"    {k}" for k in missing]
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) in the checkpoint:")
            lines += [f"    {k}" for k in unexpected]
        if hint:
            lines.append(f"  {hint}")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- state dicts


def strip_module_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a leading ``prefix`` (DDP's ``module.``; also ``_orig_mod.`` from torch.compile) from every key."""
    out = {}
    for key, value in state_dict.items():
        for p in (prefix, "_orig_mod."):
            if key.startswith(p):
                key = key[len(p) :]
        out[key] = value
    return out


def load_state_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, hint: str = "", assign: bool = False
) -> nn.Module:
    """``module.load_state_dict(state_dict, strict=True)``, but a misfit raises a
    ``CheckpointMismatchError`` that lists every missing / unexpected / mismatched key first."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in sorted(set(own) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched, hint)
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module


# ----------------------------------------------------------------------------- architecture from shapes


@dataclass(frozen=True)
class EncoderSpec:
    """What it takes to rebuild an encoder: widths, depth, heads, patch and image size."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    mlp_ratio: float = 4.0
    name: str = ""  # a VIT_SIZES name when the size is a standard one

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def build(self, device: str | torch.device | None = None, **kwargs) -> VisionTransformer:
        """A VisionTransformer of this shape (``device="meta"``: no memory, no init work)."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return VisionTransformer(
                img_size=self.img_size,
                patch_size=self.patch_size,
                embed_dim=self.embed_dim,
                depth=self.depth,
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                **kwargs,
            )

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> EncoderSpec:
        return cls(
            embed_dim=int(meta["embed_dim"]),
            depth=int(meta["depth"]),
            num_heads=int(meta["num_heads"]),
            patch_size=int(meta["patch_size"]),
            img_size=int(meta["img_size"]),
            mlp_ratio=float(meta.get("mlp_ratio", 4.0)),
            name=meta.get("name", ""),
        )

    @classmethod
    def of(cls, encoder: VisionTransformer) -> EncoderSpec:
        D = encoder.embed_dim
        p = encoder.patch_embed.proj.kernel_size[0]
        hidden = encoder.blocks[0].mlp.fc1.out_features if len(encoder.blocks) else 4 * D
        name = next(
            (
                n
                for n, s in VIT_SIZES.items()
                if (s.embed_dim, s.depth, s.num_heads) == (D, len(encoder.blocks), encoder.num_heads)
            ),
            "",
        )
        return cls(D, len(encoder.blocks), encoder.num_heads, p, encoder.grid * p, _mlp_ratio(hidden, D), name)


def _mlp_ratio(hidden: int, dim: int) -> float:
    """The ratio r with int(dim * r) == hidden; 4.0 and the giant's 48/11 come out exactly."""
    for r in (4.0, 48 / 11):
        if int(dim * r) == hidden:
            return r
    return hidden / dim


def _block_indices(keys, prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def check_stated(where: str, stated: Mapping[str, tuple[Any, Any]]) -> None:
    """Refuse an option (``{"model": (--model, the file's), "patch": ..., "img-size": ...}``) that differs
    from what a file's own config says: the config decides the architecture, and the tensors' misfit
    with another size would be a page of keys for a one-word mistake."""
    for option, (want, have) in stated.items():
        if want is not None and have is not None and want != have:
            raise ConfigError(f"{where} describes {option} {have!r}, not --{option} {want!r}: leave --{option} out")


def infer_encoder_spec(
    state_dict: Mapping[str, torch.Tensor],
    model: str | None = None,
    patch_size: int | None = None,
    img_size: int | None = None,
    depth: int | None = None,
) -> EncoderSpec:
    """The encoder's architecture from its state dict (the authors' names), checked against what
    the caller states.

    Width and patch from ``patch_embed.proj.weight`` [D, 3, p, p]; depth from the highest block
    index; MLP ratio from ``blocks.0.mlp.fc1.weight``; grid from ``pos_embed`` [1, N, D]; heads from
    the size table by width (shapes cannot tell them). ``model`` (a VIT_SIZES name) fixes width,
    depth and heads instead (``depth``: blocks, when the model was built with fewer or more than
    its size's): a checkpoint of another size then fails to load with its keys listed.
    """
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        present = ", ".join(sorted(state_dict)[:8]) + (" ..." if len(state_dict) > 8 else "")
        raise CheckpointMismatchError(
            "encoder",
            [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in state_dict],
            [],
            [],
            f"this is not a ViT encoder state dict with the authors' names (keys: {present})",
        )
    D, _, p, p2 = state_dict["patch_embed.proj.weight"].shape
    if p != p2:
        raise ValueError(f"non-square patches {p}x{p2} are not supported")
    if patch_size is not None and patch_size != p:
        raise CheckpointMismatchError(
            "encoder",
            [],
            [],
            [("patch_embed.proj.weight", (D, 3, p, p), (D, 3, patch_size, patch_size))],
            f"the checkpoint's patch size is {p}, not {patch_size}",
        )
    N = state_dict["pos_embed"].shape[1]
    grid = math.isqrt(N)
    if grid * grid != N:
        raise ValueError(f"pos_embed has {N} positions, not a square grid")
    if img_size is not None and img_size != grid * p:
        wanted = (1, grid_size(img_size, p) ** 2, D)
        raise CheckpointMismatchError(
            "encoder",
            [],
            [],
            [("pos_embed", (1, N, D), wanted)],
            f"the checkpoint was trained at {grid * p} px ({grid}x{grid} patches of {p}); "
            f"drop --img-size or set it to {grid * p}",
        )
    indices = _block_indices(state_dict, "blocks")
    found_depth = indices[-1] + 1 if indices else 0
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state_dict else 4 * D
    if model is not None:
        if model not in VIT_SIZES:
            raise ValueError(f"unknown model name {model!r}: choose one of {list(VIT_SIZES)}")
        size = VIT_SIZES[model]
        blocks = depth or size.depth
        name = model if blocks == size.depth else ""
        return EncoderSpec(size.embed_dim, blocks, size.num_heads, p, grid * p, size.mlp_ratio, name)
    by_width = [(n, s) for n, s in VIT_SIZES.items() if s.embed_dim == D]
    if not by_width:
        raise ValueError(
            f"cannot infer the number of attention heads of a {D}-wide encoder (not a standard size: "
            f"{', '.join(f'{n} {s.embed_dim}' for n, s in VIT_SIZES.items())}); name the model "
            f"(--model) or build it yourself and use load_state_strict"
        )
    name, size = by_width[0]
    return EncoderSpec(
        D, found_depth, size.num_heads, p, grid * p, _mlp_ratio(hidden, D), name if found_depth == size.depth else ""
    )


def infer_predictor_kwargs(state_dict: Mapping[str, torch.Tensor], encoder_spec: EncoderSpec) -> dict[str, Any]:
    """VisionTransformerPredictor kwargs from a predictor state dict (the authors' names)."""
    need = ("predictor_embed.weight", "predictor_pos_embed")
    if any(k not in state_dict for k in need):
        raise CheckpointMismatchError("predictor", [k for k in need if k not in state_dict], [], [])
    Dp, D = state_dict["predictor_embed.weight"].shape
    depth = len(_block_indices(state_dict, "predictor_blocks"))
    hidden = state_dict.get("predictor_blocks.0.mlp.fc1.weight", torch.empty(4 * Dp, 0)).shape[0]
    return dict(
        num_patches=state_dict["predictor_pos_embed"].shape[1],
        embed_dim=D,
        predictor_embed_dim=Dp,
        depth=depth,
        num_heads=encoder_spec.num_heads,
        mlp_ratio=_mlp_ratio(hidden, Dp),
    )


def _materialise(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, hint: str = "") -> nn.Module:
    """Load into a module built on the meta device (no init cost), as fp32 on the CPU."""
    sd = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}
    return load_state_strict(module, sd, what, hint, assign=True)


def build_encoder_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], what: str = "encoder", spec: EncoderSpec | None = None, **spec_kwargs
) -> tuple[VisionTransformer, EncoderSpec]:
    """(encoder with ``state_dict`` loaded strictly, its spec); ``spec_kwargs``: model/patch_size/img_size/depth."""
    spec = spec or infer_encoder_spec(state_dict, **spec_kwargs)
    hint = (
        f"built as {spec.name or 'a custom size'}: width {spec.embed_dim}, depth {spec.depth}, "
        f"{spec.num_heads} heads, patch {spec.patch_size}, {spec.img_size} px"
    )
    encoder = _materialise(spec.build(device="meta"), state_dict, what, hint)
    return encoder, spec


# ----------------------------------------------------------------------------- what a loader returns


@dataclass
class LoadedEncoder:
    encoder: VisionTransformer
    spec: EncoderSpec
    format: str  # ijepa_fast | authors | safetensors | state_dict | hf
    which: str  # target_encoder | encoder
    path: str
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, step, ... (numbers and strings only)
    config: dict[str, Any] | None = None  # the training config the checkpoint records (ours), else None


def _scalar_meta(ckpt: Mapping[str, Any], keys=("epoch", "step", "loss", "batch_size", "world_size", "lr")) -> dict:
    out = {}
    for k in keys:
        v = ckpt.get(k)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, str)):
            out[k] = v
    return out


def _pick(ckpt: Mapping[str, Any], which: str, path: Path) -> Mapping[str, torch.Tensor]:
    if which not in ENCODER_KEYS:
        raise ValueError(f"which={which!r}: choose one of {ENCODER_KEYS}")
    if not isinstance(ckpt.get(which), Mapping):
        have = [k for k in ENCODER_KEYS if isinstance(ckpt.get(k), Mapping)]
        raise KeyError(f"{path} has no '{which}' state dict (it has: {', '.join(have) or 'none'})")
    return strip_module_prefix(ckpt[which])


def weights_label(which: str) -> str:
    """``target`` or ``context``: the name the reports and exports give ``which``."""
    return {v: k for k, v in WHICH_ALIASES.items()}.get(which, which)
