"""``ijepa-shard``: an image folder (class sub-folders) or a file list with labels -> webdataset tar
shards with ``.cls`` labels and DALI index files, which both loaders train from (``data.root=OUT``).

    ijepa-shard /data/imagenet/train /data/imagenet-wds/train [--shard-size 1000] [--workers 16]
    ijepa-shard list.txt OUT [--root DIR]        # lines: <image path> <label>

Samples are shuffled across shards (``--seed``), bad images are left out and counted (when every
image is bad, nothing is written and the command fails), and an interrupted run finishes when the
same command is run again (``ijepa_fast.data.shard``). OUT is a new or empty folder, or an earlier
run's, outside SRC.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ijepa_fast.cli.args import command_parser, positive_int
from ijepa_fast.data.shard import CHECKS, ShardError, check_out, list_folder, read_file_list, write_shards


def parse_args(argv: list[str] | None):
    p = command_parser("ijepa-shard", __doc__)
    p.add_argument("source", type=Path, help="an image folder, or a text file of '<image path> <label>' lines")
    p.add_argument("out", type=Path, help="the folder to write the shards into (created; empty, or a run to resume)")
    p.add_argument("--root", type=Path, default=None, help="file list: the folder its relative paths start from")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle's seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument(
        "--check", choices=CHECKS, default="full", help="how bad images are found (default full: decode each)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ijepa_fast.cli.pretrain import known_failures, one_line

    try:
        check_out(args.out, args.source)  # before listing the source, which can take minutes
        if args.source.is_dir():
            listing = list_folder(args.source)
        elif args.source.is_file():
            listing = read_file_list(args.source, args.root)
        else:
            raise ShardError(f"{args.source} does not exist")
        summary = write_shards(
            listing, args.out, shard_size=args.shard_size, seed=args.seed, workers=args.workers, check=args.check
        )
    except (ShardError, FileNotFoundError) as err:  # the input, or an OUT that holds something else
        print(f"ijepa-shard: {one_line(err)}", file=sys.stderr)
        return 2
    except known_failures() as err:  # a folder that cannot be read or written, a full disk
        print(f"ijepa-shard: {one_line(err)}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
