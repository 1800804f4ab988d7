"""The names every choice key of the config accepts. The config owns them and imports nothing heavy;
each module that implements a choice takes its names from here (and its tests check that it implements
each one), so that loading a config never imports torch or the implementations."""

from __future__ import annotations

MODEL_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant")  # models.vit.VIT_SIZES
DATASETS = ("folder", "idx")  # folder: an image tree or webdataset tars; idx: IDX files (data.loader)
LOADERS = ("auto", "pytorch", "dali")  # data.build
IMAGE_CHECKS = ("header", "full", "off")  # data.dali.validate: the image check before a DALI run
LOSSES = ("smooth_l1", "l2")  # train.loss
ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn", "xformers", "math")  # models.attention
DTYPES = ("auto", "bf16", "fp16", "fp32")  # runtime.device
ENGINES = ("auto", "plain", "deepspeed", "fsdp2")  # engines
PRESETS = ("fast", "authors")
COMPILE_MODES = ("auto", "on", "off")
FP8_RECIPES = ("off", "rowwise", "tensorwise")  # models.fp8: the float8 scaling of the target encoder's linears
ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("off", "on", "offline", "online")  # "on" is offline: nothing leaves the machine unless asked
PROBE_UNITS = ("epochs", "steps")  # train.online_probe
PROBE_DATASETS = ("idx", "folder", "shards")  # train.online_probe: shards are webdataset tars with .cls labels
