"""Run the image check ahead of training (e.g. once on a node, before the ranks start):

    python -m ijepa_fast.data.dali ROOT [--mode header|full] [--cache-dir DIR] [--workers 16]

ROOT is an image folder or webdataset shards (a .tar, or a folder of them). The verdicts go to the
dataset's cache file (``cache.py``; ``--cache-dir`` as ``data.image_check_cache``), which every run
on ROOT reads: the loader then re-checks only files that changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from ijepa_fast.data.dali.cache import cache_file
from ijepa_fast.data.dali.validate import MODES, validate_images
from ijepa_fast.data.dali.webdataset import prepare_webdataset
from ijepa_fast.data.folder import scan_folder
from ijepa_fast.data.wds import webdataset_tars


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--cache-dir", default="", help='the cache folder (default: the user cache; "off": none)')
    p.add_argument("--mode", choices=MODES, default=MODES[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = cache_file(args.root, args.cache_dir)
    tars = webdataset_tars(SimpleNamespace(root=str(args.root), split=""))
    if tars:
        with tempfile.TemporaryDirectory() as tmp:  # (the loader writes its own index files)
            _, _, n, bad = prepare_webdataset(tars, tmp, mode=args.mode, cache=cache, workers=args.workers)
    else:
        paths = scan_folder(os.path.abspath(args.root), as_str=True)[0]
        bad = validate_images(paths, mode=args.mode, cache=cache, workers=args.workers)
        n = len(paths) - len(bad)
    for key, reason in sorted(bad.items()):
        print(f"undecodable: {key} ({reason})")
    print(f"{n} good, {len(bad)} undecodable; verdicts in {cache or 'no cache'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
