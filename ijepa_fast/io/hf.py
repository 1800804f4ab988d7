"""Hugging Face transformers: our encoder to and from an ``IJepaModel`` folder.

``export_hf(encoder, folder)`` writes a folder that transformers' ``IJepaModel.from_pretrained``
loads (see ``HF_NAMES``); ``load_hf_encoder`` reads one back (ours, or a published facebook/ijepa_*
folder), refusing settings our encoder cannot compute with the file and key named. ``hf_folder``
says whether a path is such a folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ijepa_fast.io.checkpoint import load_file
from ijepa_fast.io.encoder import (
    EncoderSpec,
    LoadedEncoder,
    _mlp_ratio,
    build_encoder_from_state_dict,
    check_stated,
    strip_module_prefix,
)
from ijepa_fast.io.outputs import write_files
from ijepa_fast.io.safetensors_timm import _safetensors_torch, read_safetensors, save_safetensors
from ijepa_fast.models.vit import VIT_SIZES, VisionTransformer

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
HF_CARD_FILE = "README.md"  # the model card, as the Hugging Face Hub reads it
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
    config["ijepa_fast"] = dict(provenance or {})  # also marks the folder as ours (check_export_folder)
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


def export_hf(
    encoder: VisionTransformer,
    out_dir: str | Path,
    provenance: Mapping[str, str] | None = None,
    card: str | None = None,
) -> Path:
    """Write a folder that ``transformers.IJepaModel.from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` and ``preprocessor_config.json``, and ``card`` as its ``README.md``
    (``ijepa_fast.io.model_card``) when given. ``provenance`` (strings: which encoder, source) goes
    into the config's ``ijepa_fast`` entry and the weights' metadata. A folder holding anything but an
    earlier export is refused (``check_export_folder``); the files are written together, atomically."""
    _safetensors_torch("exporting to Hugging Face")
    spec = EncoderSpec.of(encoder)
    out_dir = Path(out_dir)
    check_export_folder(out_dir)
    tensors = to_hf_state_dict(encoder)
    meta = {"format": "pt", **{f"ijepa_fast.{k}": str(v) for k, v in (provenance or {}).items()}}
    files = [(out_dir / HF_WEIGHTS_FILE, lambda p: save_safetensors(tensors, p, meta))]
    for name, content in (
        (HF_CONFIG_FILE, hf_config(spec, provenance)),
        (HF_PREPROCESSOR_FILE, hf_preprocessor_config(spec)),
    ):
        files.append((out_dir / name, lambda p, c=content: p.write_text(json.dumps(c, indent=2) + "\n")))
    if card is not None:
        files.append((out_dir / HF_CARD_FILE, lambda p: p.write_text(card)))
    write_files(files)  # all or none: a folder never holds the weights of one export and the config of another
    return out_dir


def check_export_folder(folder: str | Path) -> None:
    """Refuse to export into a folder that holds anything but an earlier export of ours (its
    config.json has an ``ijepa_fast`` entry): a user's README.md or config.json there would be replaced."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    try:
        ours = isinstance(json.loads((folder / HF_CONFIG_FILE).read_text()).get("ijepa_fast"), dict)
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object
        ours = False
    if not ours:
        raise ValueError(
            f"{folder} is not empty and is not an earlier export of ijepa-export --hf (no {HF_CONFIG_FILE} with an "
            f"'ijepa_fast' entry), so its files would be replaced: export into a new or empty folder"
        )


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
        "model": (model, spec.name or "custom"),
        "patch": (patch_size, spec.patch_size),
        "img-size": (img_size, spec.img_size),
    }
    check_stated(str(folder / HF_CONFIG_FILE), stated)
    tensors, meta = read_hf_weights(folder, trust)
    encoder, spec = build_encoder_from_state_dict(from_hf_state_dict(tensors), str(folder), spec=spec)
    provenance = config.get("ijepa_fast") if isinstance(config.get("ijepa_fast"), Mapping) else {}
    which = provenance.get("which", THIRD_PARTY_CONVERTERS_TAKE)
    return LoadedEncoder(encoder, spec, "hf", which, str(folder), {**provenance, **meta})
