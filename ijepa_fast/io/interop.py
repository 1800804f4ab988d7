"""Checkpoints in and out: ours, the authors' ``.pth.tar``, safetensors, timm, and Hugging Face.

Loading
    ``load_encoder(path, which="target_encoder")`` opens any supported file and returns the encoder
    with its weights loaded strictly. It dispatches on what it finds, one function per format
    (``_FORMATS``): a ``.safetensors`` export, our trainer's checkpoint (``format: "ijepa_fast/1"``,
    with the resolved config inside), the authors' checkpoint (``module.``-prefixed state dicts and
    no config: the model size is inferred from the tensor shapes or given by the caller), or a bare
    encoder state dict. A run folder stands for its ``checkpoints/latest.pt`` (missing, or pointing at
    a deleted file: the newest checkpoint that loads, with a warning). Adding a format (e.g.
    DeepSpeed) is one ``(name, detect, load)`` entry. A Hugging Face IJepa folder (one with a
    ``config.json``) is read by ``load_hf_encoder``.

    Every file is opened with ``checkpoint.load_file`` (``torch.load(weights_only=True)``): it cannot
    run code. A file that holds other objects is refused with a message saying so; ``trust=True``
    (``--trust-checkpoint``) loads it with the full unpickler, which can run arbitrary code: only for
    files you trust. A file that is not a checkpoint, or a damaged one, is a ``NotACheckpointError``.

    Strict loading: missing keys, unexpected keys and shape mismatches raise
    ``CheckpointMismatchError``, which lists every one of them.

Exporting
    ``export_safetensors(encoder, path)`` writes the state dict (the authors' parameter names) and
    the architecture as string metadata; ``load_safetensors_encoder`` rebuilds it.
    ``to_timm_state_dict(encoder)`` and ``timm_kwargs(encoder)`` give a state dict and the
    constructor arguments of timm's ``VisionTransformer`` that computes the same features (see
    ``TIMM_KEY_MAP``). ``export_hf(encoder, folder)`` writes a folder that transformers'
    ``IJepaModel.from_pretrained`` loads (see ``HF_NAMES``).

Command lines: ``ijepa-export`` (safetensors / timm files / Hugging Face folders) and ``ijepa-extract`` (features of a
dataset to .npy or .safetensors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ijepa_fast.io.checkpoint import NotACheckpointError, list_checkpoints, load_file, newest_loadable
from ijepa_fast.io.checkpoint import UntrustedCheckpointError as UntrustedCheckpointError  # part of this API
from ijepa_fast.models.vit import VIT_SIZES, VisionTransformer, VisionTransformerPredictor, grid_size
from ijepa_fast.runtime.optional import require

log = logging.getLogger(__name__)

OURS_FORMAT_PREFIX = "ijepa_fast/"
SAFETENSORS_FORMAT = "ijepa_fast-encoder/1"
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


# ----------------------------------------------------------------------------- formats


@dataclass
class LoadedEncoder:
    encoder: VisionTransformer
    spec: EncoderSpec
    format: str  # ijepa_fast | authors | safetensors | state_dict | hf
    which: str  # target_encoder | encoder
    path: str
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, step, ... (numbers and strings only)


@dataclass
class AuthorsCheckpoint:
    """The authors' checkpoint, loaded strictly into our modules (prefixes stripped)."""

    encoder: VisionTransformer
    target_encoder: VisionTransformer
    predictor: VisionTransformerPredictor | None
    spec: EncoderSpec
    meta: dict[str, Any]  # epoch, loss, batch_size, world_size, lr
    opt: dict[str, Any] | None = None  # their AdamW state dict, untouched


def _scalar_meta(ckpt: Mapping[str, Any], keys=("epoch", "step", "loss", "batch_size", "world_size", "lr")) -> dict:
    out = {}
    for k in keys:
        v = ckpt.get(k)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, str)):
            out[k] = v
    return out


def _detect_ours(ckpt: Any) -> bool:
    return isinstance(ckpt, Mapping) and str(ckpt.get("format", "")).startswith(OURS_FORMAT_PREFIX)


def _detect_authors(ckpt: Any) -> bool:
    return (
        isinstance(ckpt, Mapping)
        and "format" not in ckpt
        and any(isinstance(ckpt.get(k), Mapping) for k in ENCODER_KEYS)
    )


def _detect_state_dict(ckpt: Any) -> bool:
    return isinstance(ckpt, Mapping) and "patch_embed.proj.weight" in strip_module_prefix(ckpt)


def _pick(ckpt: Mapping[str, Any], which: str, path: Path) -> Mapping[str, torch.Tensor]:
    if which not in ENCODER_KEYS:
        raise ValueError(f"which={which!r}: choose one of {ENCODER_KEYS}")
    if not isinstance(ckpt.get(which), Mapping):
        have = [k for k in ENCODER_KEYS if isinstance(ckpt.get(k), Mapping)]
        raise KeyError(f"{path} has no '{which}' state dict (it has: {', '.join(have) or 'none'})")
    return strip_module_prefix(ckpt[which])


def _load_ours(
    ckpt: Mapping[str, Any], which: str, path: Path, model=None, patch_size=None, img_size=None
) -> LoadedEncoder:
    cfg = ckpt.get("config") or {}
    m, d = cfg.get("model", {}), cfg.get("data", {})
    spec_kwargs = dict(
        model=model or m.get("name"),
        patch_size=patch_size or m.get("patch_size"),
        img_size=img_size or d.get("crop_size"),
        depth=m.get("depth") or None,  # model.depth: fewer blocks than the named size's
    )
    encoder, spec = build_encoder_from_state_dict(_pick(ckpt, which, path), f"{path} [{which}]", **spec_kwargs)
    meta = _scalar_meta(ckpt) | {"format_version": ckpt["format"]}
    return LoadedEncoder(encoder, spec, "ijepa_fast", which, str(path), meta)


def _load_authors(
    ckpt: Mapping[str, Any], which: str, path: Path, model=None, patch_size=None, img_size=None
) -> LoadedEncoder:
    encoder, spec = build_encoder_from_state_dict(
        _pick(ckpt, which, path), f"{path} [{which}]", model=model, patch_size=patch_size, img_size=img_size
    )
    return LoadedEncoder(encoder, spec, "authors", which, str(path), _scalar_meta(ckpt))


def _load_state_dict(
    ckpt: Mapping[str, Any], which: str, path: Path, model=None, patch_size=None, img_size=None
) -> LoadedEncoder:
    encoder, spec = build_encoder_from_state_dict(
        strip_module_prefix(ckpt), str(path), model=model, patch_size=patch_size, img_size=img_size
    )
    return LoadedEncoder(encoder, spec, "state_dict", which, str(path), {})


# (name, detect(loaded object) -> bool, load(object, which, path, model=, patch_size=, img_size=) -> LoadedEncoder),
# tried in order. A new format (e.g. DeepSpeed's) is one more entry.
_FORMATS: list[tuple[str, Callable[[Any], bool], Callable[..., LoadedEncoder]]] = [
    ("ijepa_fast", _detect_ours, _load_ours),
    ("authors", _detect_authors, _load_authors),
    ("state_dict", _detect_state_dict, _load_state_dict),
]


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A file as is; a run folder -> its ``checkpoints/latest.pt``; a checkpoints folder -> ``latest.pt``.
    Where latest.pt is missing or points at a deleted file, the newest checkpoint beside it that loads,
    named in a warning."""
    path = Path(path)
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            latest = folder / "latest.pt"
            if latest.exists():
                return latest.resolve()
            if latest.is_symlink() or list_checkpoints(folder):
                return _newest_instead_of(latest)
        raise FileNotFoundError(f"{path} is a folder without checkpoints/latest.pt or latest.pt")
    if path.name == "latest.pt" and path.is_symlink() and not path.exists():
        return _newest_instead_of(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def _newest_instead_of(latest: Path) -> Path:
    """The newest checkpoint beside a ``latest.pt`` that is missing or points at nothing (a checkpoint
    deleted by hand), with a warning saying so."""
    if latest.is_symlink():
        gone = f"{latest} points at {os.readlink(latest)}, which does not exist"
    else:
        gone = f"{latest.parent} has no latest.pt"
    newest = newest_loadable(latest.parent)
    if newest is None:
        raise FileNotFoundError(f"{gone}, and no other checkpoint in {latest.parent} loads")
    log.warning("%s: loading the newest checkpoint that loads, %s", gone, newest)
    return newest


def load_encoder(
    path: str | Path,
    which: str = "target_encoder",
    *,
    model: str | None = None,
    patch_size: int | None = None,
    img_size: int | None = None,
    trust: bool = False,
) -> LoadedEncoder:
    """The encoder of any supported checkpoint, weights loaded strictly, in fp32 on the CPU.

    ``which``: ``target_encoder`` (the EMA encoder, what the authors evaluate) or ``encoder``. A
    Hugging Face IJepa folder holds one encoder: the result's ``which`` says which it was.
    ``model`` / ``patch_size`` / ``img_size``: for files without a config (the authors'); stated
    values are checked against the tensors (or the folder's config.json). Raises
    ``CheckpointMismatchError`` (keys listed), ``UntrustedCheckpointError`` (unsafe file without
    ``trust``), ``FileNotFoundError``.
    """
    if (folder := hf_folder(path)) is not None:
        return load_hf_encoder(folder, model=model, patch_size=patch_size, img_size=img_size, trust=trust)
    path = resolve_checkpoint_path(path)
    if path.suffix == ".safetensors":
        encoder, spec, meta = load_safetensors_encoder(path)
        return LoadedEncoder(encoder, spec, "safetensors", meta.get("which", which), str(path), meta)
    ckpt = load_file(path, trust=trust)
    for name, detect, load in _FORMATS:
        if detect(ckpt):
            log.info("%s: %s checkpoint, loading %s", path, name, which)
            return load(ckpt, which, path, model=model, patch_size=patch_size, img_size=img_size)
    kind = f"a dict with keys {sorted(map(str, ckpt))[:12]}" if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(
        f"{path}: unrecognised checkpoint ({kind}); expected ours (format 'ijepa_fast/1'), the authors' "
        f"(encoder / target_encoder state dicts), a bare encoder state dict or a .safetensors export"
    )


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


# ----------------------------------------------------------------------------- safetensors


def _safetensors_torch(feature: str):
    """``safetensors.torch`` (save_file, safe_open), or a clear error naming the install command."""
    require("safetensors", feature)
    import safetensors.torch

    return safetensors.torch


def export_safetensors(encoder: VisionTransformer, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the encoder's state dict (the authors' names, fp32 unless the model is otherwise) and its
    architecture (``EncoderSpec`` fields, strings) to ``path``."""
    st = _safetensors_torch("exporting to safetensors")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {"format": SAFETENSORS_FORMAT, **EncoderSpec.of(encoder).to_metadata(), **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
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


def load_safetensors_encoder(path: str | Path) -> tuple[VisionTransformer, EncoderSpec, dict[str, str]]:
    """(encoder, spec, metadata) from ``export_safetensors``' file (or any safetensors file holding an
    encoder state dict with the authors' names: then the size is inferred from shapes)."""
    tensors, meta = read_safetensors(path)
    spec = EncoderSpec.from_metadata(meta) if meta.get("format") == SAFETENSORS_FORMAT else None
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


# ----------------------------------------------------------------------------- Hugging Face transformers

HF_FORMAT = "hf-ijepa"
# Our (the authors') parameter names and Hugging Face ``IJepaModel``'s, as written by its
# ``save_pretrained`` and published in the facebook/ijepa_* checkpoints (recent transformers versions
# rename them to their internal names on load). ``{i}``: block index, ``{p}``: weight or bias. The
# fused ``attn.qkv`` is split into query, key and value rows, in that order (``HF_QKV``).
HF_NAMES: tuple[tuple[str, str], ...] = (
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
)
HF_QKV = ("blocks.{i}.attn.qkv.{p}", ("query", "key", "value"), "encoder.layer.{i}.attention.attention.{part}.{p}")
HF_WEIGHTS_FILE, HF_CONFIG_FILE, HF_PREPROCESSOR_FILE = "model.safetensors", "config.json", "preprocessor_config.json"
HF_LAYER_NORM_EPS = 1e-6
# IJepaConfig's defaults for the keys a config.json may leave out.
HF_CONFIG_DEFAULTS = {"hidden_act": "gelu", "qkv_bias": True, "num_channels": 3, "layer_norm_eps": 1e-12}
# Which encoder of the authors' checkpoint the Hugging Face and timm converters take.
THIRD_PARTY_CONVERTERS_TAKE = "encoder"


def _name_pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped.replace(r"\{part\}", r"(?P<part>query|key|value)") + "$")


def _rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    """``name`` matched against the first template of each pair, written with the second; None if none matches."""
    for source, target in pairs:
        if m := _name_pattern(source).match(name):
            return target.format(**m.groupdict())
    return None


def to_hf_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """The encoder's weights under ``IJepaModel``'s names (``HF_NAMES``), qkv split into query/key/value."""
    qkv_pattern, parts, qkv_target = _name_pattern(HF_QKV[0]), HF_QKV[1], HF_QKV[2]
    out = {}
    for name, tensor in encoder.state_dict().items():
        tensor = tensor.detach().cpu()
        if m := qkv_pattern.match(name):
            for part, chunk in zip(parts, tensor.chunk(3, dim=0)):  # rows: [query; key; value]
                out[qkv_target.format(part=part, **m.groupdict())] = chunk.contiguous().clone()
        elif (target := _rename(name, HF_NAMES)) is not None:
            out[target] = tensor.contiguous().clone()
        else:
            raise KeyError(f"no Hugging Face IJepa name for parameter {name!r}")
    return out


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``IJepaModel``'s names -> ours (query/key/value rows joined into qkv). An ``ijepa.`` prefix (the
    classification model's) is dropped; names that map to nothing are kept as they are, so that
    strict loading lists them."""
    qkv_pattern, parts = _name_pattern(HF_QKV[2]), HF_QKV[1]
    inverse = tuple((hf, ours) for ours, hf in HF_NAMES)
    out, pieces = {}, {}
    for name, tensor in strip_module_prefix(state_dict, "ijepa.").items():
        if m := qkv_pattern.match(name):
            pieces.setdefault(HF_QKV[0].format(i=m["i"], p=m["p"]), {})[m["part"]] = (name, tensor)
        else:
            out[_rename(name, inverse) or name] = tensor
    for fused, found in pieces.items():
        if len(found) == len(parts):
            out[fused] = torch.cat([found[part][1] for part in parts], dim=0)
        else:  # incomplete: keep the parts under their own names (unexpected) and let qkv be missing
            out |= {name: tensor for name, tensor in found.values()}
    return out


def hf_config(spec: EncoderSpec, provenance: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``config.json`` of an ``IJepaModel`` (no pooler) with the architecture of ``spec``."""
    config = {
        "architectures": ["IJepaModel"],
        "model_type": "ijepa",
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": int(spec.embed_dim * spec.mlp_ratio),
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": HF_LAYER_NORM_EPS,
        "image_size": spec.img_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "dtype": "float32",
    }
    if provenance:
        config["ijepa_fast"] = dict(provenance)
    return config


def hf_preprocessor_config(spec: EncoderSpec) -> dict[str, Any]:
    """``preprocessor_config.json``: resize to the model's size, scale to [0, 1], ImageNet mean and std."""
    from ijepa_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": spec.img_size, "width": spec.img_size},
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: an interrupted export leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def export_hf(encoder: VisionTransformer, out_dir: str | Path, provenance: Mapping[str, str] | None = None) -> Path:
    """Write a folder that ``transformers.IJepaModel.from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` and ``preprocessor_config.json``. ``provenance`` (strings: which encoder,
    source) goes into the config's ``ijepa_fast`` entry and the weights' metadata."""
    st = _safetensors_torch("exporting to Hugging Face")
    spec = EncoderSpec.of(encoder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(encoder)
    meta = {"format": "pt", **{f"ijepa_fast.{k}": str(v) for k, v in (provenance or {}).items()}}
    _write_atomically(out_dir / HF_WEIGHTS_FILE, lambda p: st.save_file(tensors, str(p), metadata=meta))
    for name, content in (
        (HF_CONFIG_FILE, hf_config(spec, provenance)),
        (HF_PREPROCESSOR_FILE, hf_preprocessor_config(spec)),
    ):
        _write_atomically(out_dir / name, lambda p, c=content: p.write_text(json.dumps(c, indent=2) + "\n"))
    return out_dir


def hf_folder(path: str | Path) -> Path | None:
    """The Hugging Face model folder ``path`` stands for (the folder, or its config.json or
    model.safetensors), or None when it is not one: a folder with a config.json that is not one of
    our run or checkpoints folders (those hold ``latest.pt``)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name in (HF_CONFIG_FILE, HF_WEIGHTS_FILE) else None
    if folder is None or not (folder / HF_CONFIG_FILE).is_file():
        return None
    if (folder / "latest.pt").exists() or (folder / "checkpoints" / "latest.pt").exists():
        return None
    return folder


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else is a ValueError naming the file."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def _positive_int(value: Any, key: str, source: str | Path, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {key}={value!r} must be a positive integer{why}")
    return value


def _square(config: Mapping[str, Any], key: str, source: str | Path) -> int:
    value = config.get(key)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return _positive_int(value, key, source, " (square images and patches)")


def hf_encoder_spec(config: Mapping[str, Any], source: str | Path = HF_CONFIG_FILE) -> EncoderSpec:
    """The encoder an IJepa ``config.json`` describes; settings our encoder cannot compute are refused,
    each error naming ``source`` (the file) and its key."""
    fixed = {"model_type": "ijepa", "hidden_act": "gelu", "qkv_bias": True, "num_channels": 3}
    fixed["layer_norm_eps"] = HF_LAYER_NORM_EPS
    for key, want in fixed.items():
        have = config.get(key, HF_CONFIG_DEFAULTS.get(key))
        if have != want:
            raise ValueError(
                f"{source}: {key}={have!r}, but ijepa_fast's encoder (the authors' ViT) has {key}={want!r}"
            )
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if missing := [k for k in sizes if k not in config]:
        raise ValueError(f"{source}: the key {missing[0]!r} is missing")
    D, depth, heads, hidden = (_positive_int(config[k], k, source) for k in sizes)
    if D % heads:
        raise ValueError(f"{source}: num_attention_heads={heads} does not divide hidden_size={D}")
    patch, img = _square(config, "patch_size", source), _square(config, "image_size", source)
    name = next((n for n, s in VIT_SIZES.items() if (s.embed_dim, s.depth, s.num_heads) == (D, depth, heads)), "")
    return EncoderSpec(D, depth, heads, patch, img, _mlp_ratio(hidden, D), name)


def read_hf_weights(folder: Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a Hugging Face folder: model.safetensors, its shards
    (model.safetensors.index.json), or pytorch_model.bin (through the safe loader)."""
    index = folder / f"{HF_WEIGHTS_FILE}.index.json"
    if (folder / HF_WEIGHTS_FILE).is_file():
        return read_safetensors(folder / HF_WEIGHTS_FILE)
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(_read_json_object(index)["weight_map"].values())):
            tensors |= read_safetensors(folder / shard)[0]
        return tensors, {}
    if (bin_path := folder / "pytorch_model.bin").is_file():
        state = load_file(bin_path, trust=trust)
        if not isinstance(state, Mapping):
            raise ValueError(f"{bin_path} holds a {type(state).__name__}, not a state dict (names -> tensors)")
        return dict(state), {}
    raise FileNotFoundError(
        f"{folder} has a {HF_CONFIG_FILE} but no {HF_WEIGHTS_FILE}, shard index or pytorch_model.bin"
    )


def load_hf_encoder(
    folder: str | Path,
    *,
    model: str | None = None,
    patch_size: int | None = None,
    img_size: int | None = None,
    trust: bool = False,
) -> LoadedEncoder:
    """Our encoder from a Hugging Face IJepa folder (``export_hf``'s, or a published facebook/ijepa_*
    one), loaded strictly. ``which`` is what the export recorded, else ``encoder``: Hugging Face's
    converter takes the authors' context encoder."""
    folder = Path(folder)
    config = _read_json_object(folder / HF_CONFIG_FILE)
    spec = hf_encoder_spec(config, folder / HF_CONFIG_FILE)
    stated = {
        "model": (model, spec.name),
        "patch": (patch_size, spec.patch_size),
        "img-size": (img_size, spec.img_size),
    }
    for option, (want, have) in stated.items():
        if want is not None and want != have:
            raise ValueError(f"{folder / HF_CONFIG_FILE} describes {option} {have!r}, not --{option} {want!r}")
    tensors, meta = read_hf_weights(folder, trust)
    encoder, spec = build_encoder_from_state_dict(from_hf_state_dict(tensors), str(folder), spec=spec)
    provenance = config.get("ijepa_fast") if isinstance(config.get("ijepa_fast"), Mapping) else {}
    which = provenance.get("which", THIRD_PARTY_CONVERTERS_TAKE)
    return LoadedEncoder(encoder, spec, "hf", which, str(folder), {**provenance, **meta})


def weights_label(which: str) -> str:
    """``target`` or ``context``: the name the reports and exports give ``which``."""
    return {v: k for k, v in WHICH_ALIASES.items()}.get(which, which)
