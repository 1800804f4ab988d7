"""The fine-tuning recipe: its typed, validated settings, the classifier (a pretrained encoder, the
probes' pooling and a linear head) and the optimizer's parameter groups with layer-wise lr decay.

Layer-wise decay (BEiT, MAE): with L encoder blocks, the patch embedding is layer 0, block i layer
i + 1, and the final LayerNorm and the head layer L + 1; a parameter of layer l trains at
``lr x layer_decay ** (L + 1 - l)``, so the layers nearest the input, which hold the most general
features, move least. Biases and 1-D parameters (LayerNorm) get no weight decay, as in pretraining.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ijepa_fast.config.choices import MODEL_NAMES
from ijepa_fast.config.options import check_data_options
from ijepa_fast.eval.features import FEATURE_MODES, encode, feature_dim
from ijepa_fast.io.encoder import ENCODER_KEYS
from ijepa_fast.models.vit import VisionTransformer, set_drop_path
from ijepa_fast.runtime.errors import ConfigError

FINETUNE_DTYPES = ("auto", "bf16", "fp32")  # autocast; fp16 would need a loss scaler here too
HEAD_INIT_STD = 2e-5  # the head starts near zero, so the first steps do not wreck the pretrained encoder (MAE)
# Settings a resumed fine-tuning may change: how long it runs, what it logs and keeps, how it reads.
RESUME_MAY_CHANGE = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "device")


@dataclass
class FinetuneConfig:
    """What ``ijepa-finetune`` does; each field is also its command-line option (``--name``)."""

    which: str = "target_encoder"  # the pretrained weights: target_encoder (EMA) or encoder (context)
    pooling: str = "avgpool"  # the probes' pooling: avgpool (mean of the normed tokens) or last4
    epochs: int = 50  # the schedule's length
    max_steps: int = 0  # stop after this many steps (0: all epochs); the schedule still spans the epochs
    batch_size: int = 128
    lr: float = 5e-4  # peak learning rate of the head (layer L + 1), after warm-up
    start_lr: float = 1e-6  # at step 0, rising linearly to lr over the warm-up
    min_lr: float = 1e-6  # end of the cosine
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75  # lr factor per layer below the head
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float = 0.1  # stochastic depth of the last block (0 for the first, linear in between)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range of the training images
    grad_clip: float = 0.0  # max gradient norm; 0: off
    dtype: str = "auto"  # autocast: auto (bf16 where native)|bf16|fp32
    seed: int = 0  # head init, batch order, crops, drop path
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 2
    device: str = "auto"  # auto (cuda if available)|cpu|cuda|cuda:N
    data: str = ""  # the data root
    dataset: str = "idx"  # idx or folder
    train_split: str = "train"
    test_split: str = ""  # default: test (idx) or val (folder)
    limit: int = 0  # only the first N images of each split (0: all)
    model: str = ""  # model size for files without a config (the authors')

    def validate(self) -> FinetuneConfig:
        def check(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"--{key.replace('_', '-')}={getattr(self, key)!r} is invalid: expected {allowed}")

        check(self.which in ENCODER_KEYS, "which", " or ".join(ENCODER_KEYS))
        check(self.pooling in FEATURE_MODES, "pooling", " or ".join(FEATURE_MODES))
        check(self.dtype in FINETUNE_DTYPES, "dtype", " or ".join(FINETUNE_DTYPES))
        check(self.dataset in ("idx", "folder"), "dataset", "idx or folder")
        check(not self.model or self.model in MODEL_NAMES, "model", " or ".join(MODEL_NAMES))
        check_data_options(self.batch_size, self.num_workers, self.limit, self.device)  # as ijepa-eval's
        for key in ("epochs", "log_every", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, key) >= 1, key, "an integer >= 1")
        check(self.max_steps >= 0, "max_steps", "an integer >= 0")
        check(self.lr > 0, "lr", "a float > 0")
        for key in ("start_lr", "min_lr", "weight_decay", "grad_clip"):
            check(getattr(self, key) >= 0, key, "a float >= 0")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"a float in [0, epochs={self.epochs}]")
        check(0 < self.layer_decay <= 1, "layer_decay", "a float in (0, 1] (1: no decay)")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "a float in [0, 1)")
        check(0 <= self.drop_path < 1, "drop_path", "a float in [0, 1)")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, "crop_scale", "two floats 0 < lo <= hi <= 1")
        check(bool(self.data), "data", "a data folder")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


class Classifier(nn.Module):
    """forward(images [B, 3, S, S]) -> logits [B, K]: the encoder, the probes' pooling
    (``eval.features.encode``: avgpool [B, D] or last4 [B, 4D]) and a linear head."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, pooling: str = "avgpool"):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(feature_dim(encoder, pooling), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(encode(self.encoder, images, self.pooling))


def build_classifier(encoder: VisionTransformer, num_classes: int, cfg: FinetuneConfig) -> Classifier:
    """The classifier over ``encoder`` (trained in place), its blocks' drop path set from ``cfg``."""
    set_drop_path(encoder.blocks, cfg.drop_path)
    for p in encoder.parameters():
        p.requires_grad_(p is not encoder.pos_embed)  # the fixed sin-cos table stays fixed
    return Classifier(encoder, num_classes, cfg.pooling)


def layer_id(name: str, depth: int) -> int:
    """The layer of a ``Classifier`` parameter: 0 patch embedding, i + 1 block i, depth + 1 the rest."""
    parts = name.split(".")
    if parts[0] == "encoder" and parts[1] in ("patch_embed", "pos_embed"):
        return 0
    if parts[0] == "encoder" and parts[1] == "blocks":
        return int(parts[2]) + 1
    return depth + 1  # encoder.norm and the head


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups, one per (layer, decayed or not), each with its ``lr_scale``
    (``layer_decay ** (depth + 1 - layer)``) and its ``lr`` at the peak (``lr x lr_scale``)."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, depth)
        decayed = p.ndim > 1 and not name.endswith(".bias")
        if (layer, decayed) not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[layer, decayed] = {
                "params": [],
                "names": [],
                "layer": layer,
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": weight_decay if decayed else 0.0,
            }
        groups[layer, decayed]["params"].append(p)
        groups[layer, decayed]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group at ``lr x`` its layer's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
