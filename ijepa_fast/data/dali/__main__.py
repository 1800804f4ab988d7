"""Run the validation pass ahead of training (e.g. once on a node, before the ranks start):

    python -m ijepa_fast.data.dali ROOT --cache RUN_DIR/data_check.json [--mode full] [--workers 16]

ROOT is an image folder or webdataset shards (a .tar, or a folder of them). Pass the same file as
``build_dali_loader(..., cache=...)``; the loader then re-checks only files that changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from ijepa_fast.data.dali.loader import webdataset_tars
from ijepa_fast.data.dali.validate import MODES, validate_images
from ijepa_fast.data.dali.webdataset import prepare_webdataset
from ijepa_fast.data.folder import scan_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--cache", type=Path, required=True, help="the JSON of verdicts to create or update")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tars = webdataset_tars(SimpleNamespace(root=str(args.root), split=""))
    if tars:
        with tempfile.TemporaryDirectory() as tmp:  # (the loader writes its own index files)
            _, _, n, bad = prepare_webdataset(tars, tmp, mode=args.mode, cache=args.cache, workers=args.workers)
    else:
        paths = scan_folder(args.root)[0]
        bad = validate_images(paths, mode=args.mode, cache=args.cache, workers=args.workers)
        n = len(paths) - len(bad)
    for key, reason in sorted(bad.items()):
        print(f"undecodable: {key} ({reason})")
    print(f"{n} good, {len(bad)} undecodable; verdicts in {args.cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
