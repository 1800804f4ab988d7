"""``ijepa-pretrain`` / ``python -m ijepa_fast.cli.pretrain``: pretrain I-JEPA from a config.

    ijepa-pretrain --config configs/demo.yaml run.name=try1 optim.lr=5e-4
    ijepa-pretrain --config configs/in1k_vith14_ep300.yaml data.root=/data/imagenet
    ijepa-pretrain --config configs/demo.yaml --resume      # continue the run folder's latest checkpoint

The config may be ours, one of the authors' YAML files, or a packaged config by name (``demo``,
``in1k_vith14_ep300``...); ``section.key=value`` overrides may come before or after the options.

``--resume`` reads checkpoints (ours and DeepSpeed's) with weights-only loading: a file holding any
other object is refused, naming the file, and there is no override (this trainer never writes one;
``ijepa-eval`` and ``ijepa-export`` take ``--trust-checkpoint`` for files from elsewhere). Under
several processes, a collective that fails because another rank stalled past ``run.dist_timeout_s``
or died ends this rank with one line naming the timeout.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ijepa_fast.cli.args import command_parser
from ijepa_fast.config import RESUME_MAY_CHANGE, Config, ConfigError, describe, load, to_yaml
from ijepa_fast.io.checkpoint import no_follow
from ijepa_fast.train.run_folder import RunFolderError

EXIT_STATUS = """exit status:
  0    the run finished
  1    an error, named in one line: the file, folder or setting, and what to do
  2    a config or command-line error, named in one line
  130  stopped by SIGINT (Ctrl-C) after saving a checkpoint; --resume continues the run
  143  stopped by SIGTERM (a scheduler's preemption) after saving a checkpoint; --resume continues
A second SIGINT or SIGTERM stops at once, without saving: 130 or 143 as well, and the last checkpoint stays."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = command_parser("ijepa-pretrain", __doc__, epilog=EXIT_STATUS + "\n\n" + describe())
    p.add_argument(
        "--config", help="YAML config file (ours or the authors' format), or a packaged config's name (demo, ...)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
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


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The command line's ``section.key=value`` overrides, ``--data`` as ``data.root``."""
    return list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])


class StderrHandler(logging.StreamHandler):
    """The console handler: writes to whatever ``sys.stderr`` is when a record is emitted (as logging's
    own last-resort handler does), so a stderr replaced after set-up (a redirect, a test's capture that
    has since closed) never leaves logging writing to a closed stream."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(run_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [StderrHandler()]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(_RunLog(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


class _RunLog(logging.FileHandler):
    """The run folder's train.log, opened like its other files: a symbolic link there is refused."""

    def _open(self):  # the one place FileHandler opens its file
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=no_follow)


def open_run_folder(cfg: Config) -> bool:
    """Check that the run folder can be written, then log there (rank 0; other ranks log warnings
    and errors only, to stderr). True on rank 0."""
    from ijepa_fast.io.checkpoint import check_writable
    from ijepa_fast.runtime.distributed import detect
    from ijepa_fast.train.trainer import RUN_FOLDER_SETTINGS

    main_rank = detect().rank == 0
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if main_rank:
        check_writable(run_dir, "the run folder", RUN_FOLDER_SETTINGS)
    setup_logging(run_dir if main_rank else None)
    if not main_rank:  # one log for the run
        logging.getLogger().setLevel(logging.WARNING)
    return main_rank


def known_failures() -> tuple[type[BaseException], ...]:
    """The failures a training command ends with one line (after ConfigError's own): anything else is
    a bug and keeps its traceback."""
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError
    from ijepa_fast.train.trainer import NonFiniteLossError

    return (OSError, ValueError, NonFiniteLossError, UntrustedCheckpointError, RunFolderError)


def one_line(err: BaseException) -> str:
    """The error's message; an OSError that carries a file name (no message of ours) names the file."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def _fail(message: str, status: int, logged: bool) -> int:
    """Report ``message`` on stderr (and in train.log once the run logs there); return ``status``."""
    if logged:
        logging.getLogger("ijepa_fast").error("%s", message)
    else:
        print(f"ijepa-pretrain: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load(args.config, overrides_of(args))
    except ConfigError as err:
        return _fail(f"config error: {err}", 2, logged=False)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from ijepa_fast.runtime.distributed import collective_failure
    from ijepa_fast.train.trainer import Trainer

    logged = False
    # Known failures end as one line and an exit status (EXIT_STATUS); anything else is a bug and
    # keeps its traceback.
    try:
        main_rank = open_run_folder(cfg)
        logged = True
        result = Trainer(cfg, resume=args.resume, allow_config_change=args.allow_config_change).fit()
    except KeyboardInterrupt as err:  # Ctrl-C before the trainer handles signals, or a second signal
        return _fail(str(err) or "interrupted", 128 + getattr(err, "signum", signal.SIGINT), logged)
    except ConfigError as err:
        return _fail(f"config error: {err}", 2, logged)
    except known_failures() as err:
        return _fail(one_line(err), 1, logged)
    except RuntimeError as err:
        failure = collective_failure(err, cfg.run.dist_timeout_s or None)
        if failure is None:
            raise
        return _fail(failure, 1, logged)
    status = 0 if result.stop_signal is None else 128 + result.stop_signal
    if main_rank:
        print(
            f"run folder: {result.run_dir}  steps: {result.steps}  last loss: {result.last_loss:.4f}  "
            f"skipped images: {result.skipped}  ({result.stopped})"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
