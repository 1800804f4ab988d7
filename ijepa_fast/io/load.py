"""``load_encoder(path, which="target_encoder")``: the encoder of any supported file, weights loaded
strictly, in fp32 on the CPU.

It dispatches on what it finds, one function per format (``_FORMATS``): a Hugging Face IJepa folder
(one with a ``config.json``), a ``.safetensors`` export, our trainer's checkpoint
(``format: "ijepa_fast/1"``, with the resolved config inside), the authors' checkpoint, or a bare
encoder state dict. A run folder stands for its ``checkpoints/latest.pt`` (``paths``). Adding a
format (e.g. DeepSpeed) is one ``(name, detect, load)`` entry.

Every file is opened with ``checkpoint.load_file`` (``torch.load(weights_only=True)``): it cannot run
code. A file that holds other objects is refused with a message saying so; ``trust=True``
(``--trust-checkpoint``) loads it with the full unpickler, which can run arbitrary code: only for
files you trust. A file that is not a checkpoint, or a damaged one, is a ``NotACheckpointError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ijepa_fast.io.authors import _detect_authors, _load_authors
from ijepa_fast.io.checkpoint import load_file
from ijepa_fast.io.encoder import (
    LoadedEncoder,
    _pick,
    _scalar_meta,
    build_encoder_from_state_dict,
    check_stated,
    strip_module_prefix,
)
from ijepa_fast.io.hf import hf_folder, load_hf_encoder
from ijepa_fast.io.paths import resolve_checkpoint_path
from ijepa_fast.io.safetensors_timm import load_safetensors_encoder

log = logging.getLogger(__name__)

OURS_FORMAT_PREFIX = "ijepa_fast/"


def _detect_ours(ckpt: Any) -> bool:
    return isinstance(ckpt, Mapping) and str(ckpt.get("format", "")).startswith(OURS_FORMAT_PREFIX)


def _detect_state_dict(ckpt: Any) -> bool:
    return isinstance(ckpt, Mapping) and "patch_embed.proj.weight" in strip_module_prefix(ckpt)


def _load_ours(
    ckpt: Mapping[str, Any], which: str, path: Path, model=None, patch_size=None, img_size=None
) -> LoadedEncoder:
    cfg = ckpt.get("config") or {}
    m, d = cfg.get("model", {}), cfg.get("data", {})
    # "" or 0: not recorded (a fine-tuning of a custom size records no name), so read from the tensors
    name, patch, size = m.get("name") or None, m.get("patch_size") or None, d.get("crop_size") or None
    check_stated(
        f"{path}'s config", {"model": (model, name), "patch": (patch_size, patch), "img-size": (img_size, size)}
    )
    spec_kwargs = dict(
        model=model or name,
        patch_size=patch_size or patch,
        img_size=img_size or size,
        depth=m.get("depth") or None,  # model.depth: fewer blocks than the named size's
    )
    encoder, spec = build_encoder_from_state_dict(_pick(ckpt, which, path), f"{path} [{which}]", **spec_kwargs)
    meta = _scalar_meta(ckpt) | {"format_version": ckpt["format"]}
    config = dict(cfg) if isinstance(cfg, Mapping) and cfg else None
    return LoadedEncoder(encoder, spec, "ijepa_fast", which, str(path), meta, config)


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
        encoder, spec, meta = load_safetensors_encoder(path, model=model, patch_size=patch_size, img_size=img_size)
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
