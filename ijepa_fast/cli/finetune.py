"""``ijepa-finetune``: fine-tune a pretrained encoder end to end on a labelled dataset.

    ijepa-finetune runs/demo-20260101-120000 --data /usr/share/datasets/fashion-mnist --epochs 10
    ijepa-finetune runs/demo-20260101-120000 --data /usr/share/datasets/fashion-mnist --resume
    ijepa-finetune IN1K-vit.h.14-300e.pth.tar --data /data/imagenet --dataset folder --model vit_huge \\
        --layer-decay 0.75 --drop-path 0.2 --out ft-vith14

CHECKPOINT: as ``ijepa-eval`` reads (ours, a run folder, the authors', safetensors, Hugging Face);
``--which target`` (the EMA encoder, default) or ``context``. The recipe (``ijepa_fast.finetune``):
the probes' pooling (``--pooling avgpool|last4``) and a linear head, AdamW with layer-wise lr decay
(``--layer-decay``), linear warm-up then cosine (``--warmup-epochs``, ``--lr``, ``--min-lr``), label
smoothing, drop path rising over the blocks, random-resized crops of the training images; test
top-1 on the centre-cropped test split. Writes into ``--out`` (default: ``RUN/finetune`` for a run
folder, else ``finetune-<checkpoint name>``): ``finetune.json``, ``metrics.csv``, ``checkpoints/``
and the report (``report.json``, ``report.md``); a folder holding anything else (a pretraining run
folder above all) is refused. ``--resume`` continues from the newest checkpoint there, as
``ijepa-pretrain --resume`` does, from the same pretrained checkpoint with the same recipe. SIGINT or
SIGTERM saves and stops (exit 130 or 143). A bad option exits 2, another error 1, in one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields, replace
from pathlib import Path

from ijepa_fast.cli.args import add_checkpoint_args, command_parser, load_from_args

log = logging.getLogger("ijepa_fast")

FROM_CHECKPOINT_ARGS = ("which", "model")  # options add_checkpoint_args defines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ijepa_fast.config.parse import field_comments
    from ijepa_fast.finetune.recipe import FinetuneConfig

    p = command_parser("ijepa-finetune", __doc__)
    add_checkpoint_args(p)
    p.add_argument("--out", help="the fine-tuning folder (default: RUN/finetune, or finetune-<checkpoint name>)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning in --out from its newest checkpoint")
    comments = field_comments(FinetuneConfig)
    for f in fields(FinetuneConfig):
        if f.name in FROM_CHECKPOINT_ARGS:
            continue
        option, default = "--" + f.name.replace("_", "-"), f.default
        kwargs = {"help": f"{comments.get(f.name, '')} (default: {default})", "default": None}
        if isinstance(default, tuple):
            kwargs.update(nargs=len(default), type=type(default[0]), metavar=("LO", "HI"))
        else:
            kwargs.update(type=type(default))
        p.add_argument(option, required=f.name == "data", **kwargs)
    return p.parse_args(argv)


def settings(args: argparse.Namespace):
    """The ``FinetuneConfig`` of the options (validated)."""
    from ijepa_fast.finetune.recipe import FinetuneConfig
    from ijepa_fast.finetune.run import finetune_config_for

    given = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    given["crop_scale"] = tuple(given["crop_scale"]) if given["crop_scale"] else None
    return finetune_config_for(given)


def out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    source = Path(args.checkpoint)
    return source / "finetune" if source.is_dir() else Path(f"finetune-{source.stem}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ijepa_fast.finetune.run import Finetuner
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError
    from ijepa_fast.io.encoder import CheckpointMismatchError
    from ijepa_fast.runtime.errors import ConfigError
    from ijepa_fast.train.run_folder import RunFolderError

    try:
        cfg = settings(args)
        loaded = load_from_args(args)
        # the settings record the encoder the file gave: a file holding one encoder gives it without --which
        result = Finetuner(loaded, replace(cfg, which=loaded.which), out_dir(args), resume=args.resume).fit()
    except KeyboardInterrupt as err:  # a second SIGINT or SIGTERM: stopped at once
        log.error("%s", str(err) or "interrupted")
        return 128 + getattr(err, "signum", 2)
    except ConfigError as err:  # a bad option, or one the checkpoint cannot go with
        print(f"ijepa-finetune: {err}", file=sys.stderr)
        return 2
    except (
        CheckpointMismatchError,
        UntrustedCheckpointError,
        RunFolderError,
        FileExistsError,
        FileNotFoundError,
        KeyError,
        ValueError,
        ImportError,
        OSError,
    ) as err:
        print(f"ijepa-finetune: {err}", file=sys.stderr)
        return 1
    if result.stop_signal is not None:
        print(f"stopped at step {result.steps}; checkpoint {result.checkpoint}; continue with --resume")
        return 128 + result.stop_signal
    print(f"fine-tuned top-1: {100 * result.top1:.2f}% after {result.steps} steps; checkpoint {result.checkpoint}")
    print(f"report: {result.out_dir / 'report.json'} and {result.out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
