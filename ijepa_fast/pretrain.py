"""``ijepa-pretrain`` / ``python -m ijepa_fast.pretrain``: pretrain I-JEPA from a config.

    ijepa-pretrain --config configs/demo.yaml run.name=try1 optim.lr=5e-4
    ijepa-pretrain --config configs/in1k_vith14_ep300.yaml data.root=/data/imagenet
    ijepa-pretrain --config configs/demo.yaml --resume      # continue the run folder's latest checkpoint

The config may be ours or one of the authors' YAML files; ``section.key=value`` overrides may come
before or after the options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ijepa_fast.config import RESUME_MAY_CHANGE, ConfigError, load


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ijepa-pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (ours or the authors' format)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept a config that differs from the run folder's config.yaml (the old one is "
        f"kept as config.prev-<step>.yaml); without it only {', '.join(RESUME_MAY_CHANGE)} may change",
    )
    p.add_argument("--data", help="shorthand for data.root=...")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=5e-4")
    # `deepspeed` (without --no_local_rank) passes this; the rank comes from LOCAL_RANK in the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)  # overrides may follow options: ... --resume optim.lr=1e-4


def setup_logging(run_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])
    try:
        cfg = load(args.config, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"ijepa-pretrain: config error: {err}", file=sys.stderr)
        return 2
    from ijepa_fast.distributed import detect

    main_rank = detect().rank == 0
    setup_logging(Path(cfg.run.out_dir) / cfg.run.name if main_rank else None)
    if not main_rank:  # one log for the run: other ranks report warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    from ijepa_fast.run_folder import RunFolderError
    from ijepa_fast.trainer import NonFiniteLossError, Trainer

    try:
        result = Trainer(cfg, resume=args.resume, allow_config_change=args.allow_config_change).fit()
    except (FileNotFoundError, FileExistsError, ValueError, NonFiniteLossError, RunFolderError) as err:
        logging.getLogger("ijepa_fast").error("%s", err)
        return 1
    if not main_rank:
        return 0
    print(
        f"run folder: {result.run_dir}  steps: {result.steps}  last loss: {result.last_loss:.4f}  "
        f"skipped images: {result.skipped}  ({result.stopped})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
