"""Write an ImageNet-like JPEG folder for start-up and loader benchmarks, reproducibly (same seed, same
bytes): ``root/nXXXXXXXX/nXXXXXXXX_<i>.JPEG`` in ``--classes`` class folders.

    python -m profiling.make_imagenet_like /tmp/imagenet-like --num-images 20000 [--classes 1000]
                                           [--seed 0] [--workers 2]

Sizes follow ImageNet-1k's training set in shape (an approximation, not a copy of its statistics):
three images in four have 500 pixels on the longer side, at the common camera aspect ratios (4:3,
3:2, 1:1, 5:4, 16:9; landscape three times in four); the others have a longer side drawn log-normally
around 400 pixels (60 to 2500). Content: ``ijepa_fast.data.synthetic.synthetic_photo`` at JPEG
quality 90 (photo-like sizes and decode times). Files that already exist with a non-zero size are
kept, so an interrupted run can be continued.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ijepa_fast.data.synthetic import encode, synthetic_photo

_ASPECTS = ((4 / 3, 0.5), (3 / 2, 0.2), (1.0, 0.12), (5 / 4, 0.1), (16 / 9, 0.08))


def image_size(seed: int, i: int) -> tuple[int, int]:
    """(width, height) of image ``i``: see the module docstring."""
    rng = np.random.default_rng([seed, i, 1])
    long_side = 500 if rng.random() < 0.75 else int(np.clip(rng.lognormal(np.log(400), 0.45), 60, 2500))
    ratios, weights = zip(*_ASPECTS)
    ratio = ratios[rng.choice(len(ratios), p=weights)]
    short_side = max(1, round(long_side / ratio))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def image_path(root: Path, i: int, classes: int) -> Path:
    wnid = f"n{1440764 + 1000 * (i % classes):08d}"
    return root / wnid / f"{wnid}_{i}.JPEG"


def _write(job: tuple[str, int, int, int]) -> int:
    root, i, classes, seed = job
    path = image_path(Path(root), i, classes)
    if path.is_file() and path.stat().st_size > 0:
        return 0
    w, h = image_size(seed, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode(synthetic_photo(w, h, seed=seed * 1_000_003 + i), quality=90))
    os.replace(tmp, path)
    return 1


def write_folder(root: Path, num_images: int, classes: int = 1000, seed: int = 0, workers: int = 1) -> int:
    """Write the folder's missing images (``workers`` processes); how many were written now."""
    jobs = [(str(root), i, classes, seed) for i in range(num_images)]
    if workers <= 1:
        return sum(map(_write, jobs))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_write, jobs, chunksize=64))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    written = write_folder(args.root, args.num_images, args.classes, args.seed, args.workers)
    total = sum(f.stat().st_size for f in args.root.rglob("*.JPEG"))
    print(f"{args.root}: {args.num_images} images ({written} written now), {total / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
