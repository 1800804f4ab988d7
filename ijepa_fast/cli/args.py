"""Command-line options shared by the commands: the parser every command starts from (``--version``,
help shown as plain text), and for ``ijepa-eval``, ``ijepa-export`` and ``ijepa-extract`` which
checkpoint and encoder, which data, and how to extract features."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ijepa_fast
from ijepa_fast.config.choices import DTYPES
from ijepa_fast.config.options import check_data_options
from ijepa_fast.io.encoder import ENCODER_KEYS, WHICH_ALIASES, LoadedEncoder, weights_label
from ijepa_fast.io.load import load_encoder
from ijepa_fast.models.vit import VIT_SIZES
from ijepa_fast.runtime.errors import ConfigError


class _PlainTextParser(argparse.ArgumentParser):
    """Help as plain text: the docstrings' reStructuredText code markup (double backticks), which a
    terminal shows raw, becomes single backticks."""

    def format_help(self) -> str:
        return super().format_help().replace("``", "`")


def command_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of the command ``prog``, with ``--version``. ``description`` (and ``epilog``) are
    shown as written, unless ``formatter_class`` says otherwise."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = _PlainTextParser(prog=prog, description=description, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s {ijepa_fast.__version__}")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1. 0 is refused, not read as a default: an option whose default
    is worked out (--img-size, --patch) is left out to get it."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="ours (.pt or a run folder), the authors' .pth.tar, or a .safetensors export")
    p.add_argument(
        "--which",
        default=None,  # None: not given, so a file holding one encoder gives the one it holds
        type=lambda name: WHICH_ALIASES.get(name, name),
        choices=ENCODER_KEYS,
        help="target (target_encoder, the EMA encoder; default) or context (encoder); a .safetensors export or a "
        "Hugging Face folder holds one encoder, and refuses a --which naming the other",
    )
    p.add_argument(
        "--model",
        choices=list(VIT_SIZES),
        help="model size, for files without a config (authors'); a file with its own config refuses another size",
    )
    p.add_argument("--patch", type=positive_int, help="patch size, checked against the file")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow files holding arbitrary Python objects (full unpickler: can run code)",
    )


def load_from_args(args) -> LoadedEncoder:
    """The encoder the options name. A ``--which`` the file cannot give (it holds the other encoder
    only) is a ``ConfigError``: the command would otherwise report on the encoder it was told not to use."""
    loaded = load_encoder(
        args.checkpoint,
        args.which or "target_encoder",
        model=args.model,
        patch_size=args.patch,
        trust=args.trust_checkpoint,
    )
    if args.which is not None and loaded.which != args.which:
        held, asked = weights_label(loaded.which), weights_label(args.which)
        raise ConfigError(
            f"{loaded.path} holds one encoder, the {held} one ({loaded.which}), not the {asked} one ({args.which}) "
            f"--which names: leave --which out, or pass --which {held}"
        )
    return loaded


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Data and extraction options shared by ``ijepa-eval`` and ``ijepa-extract``."""
    p.add_argument("--data", required=True, help="data root: IDX files or an image folder")
    p.add_argument(
        "--img-size",
        type=positive_int,
        metavar="N",
        help="evaluate at N px (a multiple of the patch): images resized and centre-cropped to N, the position "
        "embeddings interpolated bicubically from the training grid; default: the training size",
    )
    p.add_argument("--dataset", default="idx", choices=["idx", "folder"], help="kind of data at --data")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers decoding images (default: 0 for idx, up to 8 for folder)",
    )
    p.add_argument("--limit", type=int, default=0, help="use only the first N images of each split (0: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="autocast for feature extraction: auto = bf16 where the device has native bf16, else fp32",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) a bad value of ``add_data_args``' options, with the check ``ijepa-finetune`` makes."""
    try:
        check_data_options(args.batch_size, args.num_workers, args.limit, args.device)
    except ConfigError as err:
        p.error(str(err))


def num_workers(args: argparse.Namespace) -> int:
    if args.num_workers is not None:
        return args.num_workers
    import os

    return 0 if args.dataset == "idx" else min(8, os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    from ijepa_fast.runtime.device import resolve_device as resolve

    return resolve(name, option="--device")


def eval_img_size(args: argparse.Namespace, spec) -> int:
    """The image size to evaluate ``spec``'s encoder at: ``--img-size`` or the training size."""
    size = spec.img_size if args.img_size is None else args.img_size
    if size < 1 or size % spec.patch_size:
        raise ValueError(f"--img-size {size} must be a positive multiple of the patch size {spec.patch_size}")
    return size


def open_eval_dataset(args: argparse.Namespace, split: str, img_size: int):
    """Centre-cropped, normalised (image [3, S, S], label) dataset of ``split`` at ``img_size``."""
    from ijepa_fast.config import DataConfig
    from ijepa_fast.data.evaluation import build_eval_dataset

    cfg = DataConfig(dataset=args.dataset, root=str(args.data), split=split, crop_size=img_size)
    if not Path(cfg.root).exists():
        raise FileNotFoundError(f"--data {cfg.root} does not exist")
    return build_eval_dataset(cfg, split=split, limit=args.limit)
