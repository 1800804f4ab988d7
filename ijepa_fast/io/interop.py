"""Checkpoints in and out, in one namespace: the public names of the modules that define them.

``load`` (``load_encoder``: any supported file or folder), ``paths`` (what a path stands for),
``encoder`` (an encoder from a state dict, strict loading, ``CheckpointMismatchError``), ``authors``
(the authors' ``.pth.tar``), ``safetensors_timm`` (safetensors files, timm's names) and ``hf``
(Hugging Face ``IJepaModel`` folders). The project imports each name from its own module; this one
keeps ``from ijepa_fast.io.interop import load_encoder`` and the like working.
"""

from ijepa_fast.io.authors import AuthorsCheckpoint, load_authors_checkpoint
from ijepa_fast.io.checkpoint import NotACheckpointError, UntrustedCheckpointError
from ijepa_fast.io.encoder import (
    ENCODER_KEYS,
    WHICH_ALIASES,
    CheckpointMismatchError,
    EncoderSpec,
    LoadedEncoder,
    build_encoder_from_state_dict,
    infer_encoder_spec,
    infer_predictor_kwargs,
    load_state_strict,
    strip_module_prefix,
    weights_label,
)
from ijepa_fast.io.hf import (
    HF_CARD_FILE,
    HF_CONFIG_DEFAULTS,
    HF_CONFIG_FILE,
    HF_FORMAT,
    HF_LAYER_NORM_EPS,
    HF_NAMES,
    HF_PREPROCESSOR_FILE,
    HF_QKV,
    HF_WEIGHTS_FILE,
    THIRD_PARTY_CONVERTERS_TAKE,
    export_hf,
    from_hf_state_dict,
    hf_config,
    hf_encoder_spec,
    hf_folder,
    hf_preprocessor_config,
    load_hf_encoder,
    read_hf_weights,
    to_hf_state_dict,
)
from ijepa_fast.io.load import OURS_FORMAT_PREFIX, load_encoder
from ijepa_fast.io.paths import resolve_checkpoint_path
from ijepa_fast.io.safetensors_timm import (
    SAFETENSORS_FORMAT,
    TIMM_GAP_MODEL,
    TIMM_KEY_MAP,
    build_timm_model,
    export_safetensors,
    load_safetensors_encoder,
    read_safetensors,
    timm_key,
    timm_kwargs,
    to_timm_state_dict,
)

__all__ = [
    "ENCODER_KEYS",
    "HF_CARD_FILE",
    "HF_CONFIG_DEFAULTS",
    "HF_CONFIG_FILE",
    "HF_FORMAT",
    "HF_LAYER_NORM_EPS",
    "HF_NAMES",
    "HF_PREPROCESSOR_FILE",
    "HF_QKV",
    "HF_WEIGHTS_FILE",
    "OURS_FORMAT_PREFIX",
    "SAFETENSORS_FORMAT",
    "THIRD_PARTY_CONVERTERS_TAKE",
    "TIMM_GAP_MODEL",
    "TIMM_KEY_MAP",
    "WHICH_ALIASES",
    "AuthorsCheckpoint",
    "CheckpointMismatchError",
    "EncoderSpec",
    "LoadedEncoder",
    "NotACheckpointError",
    "UntrustedCheckpointError",
    "build_encoder_from_state_dict",
    "build_timm_model",
    "export_hf",
    "export_safetensors",
    "from_hf_state_dict",
    "hf_config",
    "hf_encoder_spec",
    "hf_folder",
    "hf_preprocessor_config",
    "infer_encoder_spec",
    "infer_predictor_kwargs",
    "load_authors_checkpoint",
    "load_encoder",
    "load_hf_encoder",
    "load_safetensors_encoder",
    "load_state_strict",
    "read_hf_weights",
    "read_safetensors",
    "resolve_checkpoint_path",
    "strip_module_prefix",
    "timm_key",
    "timm_kwargs",
    "to_hf_state_dict",
    "to_timm_state_dict",
    "weights_label",
]
