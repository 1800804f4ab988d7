"""A reproducible folder of photo-like JPEGs with ImageNet-like sizes, for the loader benchmarks.

    python -m profiling.imagenet_like /tmp/imagenet_like --num-images 1024 [--classes 16] [--seed 0]

Image i is a pure function of (seed, i): its size, its pixels (``data.synthetic.synthetic_photo``)
and its JPEG quality, so two machines generate the same bytes. Sizes follow a fixed mixture meant to
resemble ImageNet-1k's train split, which is mostly 500 pixels on the long side with a tail of
smaller and of much larger photos (``SIZE_MIX``: the weights are this generator's choice, not a
measurement of ImageNet). Aspect ratios are the common camera ones, both orientations. A folder
written earlier with the same arguments is reused (``manifest.json`` records them).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ijepa_fast.data.synthetic import encode, synthetic_photo

# (weight, long-side range in pixels): most at 500, some smaller, a tail of large photos
SIZE_MIX = ((0.65, (500, 500)), (0.15, (300, 499)), (0.15, (600, 1200)), (0.05, (1201, 2000)))
ASPECTS = (4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9)  # long side / short side
QUALITIES = (75, 85, 90, 95)


def image_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) of one image drawn from ``SIZE_MIX`` and ``ASPECTS``."""
    weights, ranges = zip(*SIZE_MIX)
    lo, hi = rng.choices(ranges, weights)[0]
    long_side = rng.randint(lo, hi)
    short_side = max(1, round(long_side / rng.choice(ASPECTS)))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)  # mostly landscape


def write_folder(root: Path, num_images: int, classes: int = 16, seed: int = 0) -> list[Path]:
    """Write (or reuse) ``num_images`` JPEGs in ``classes`` class folders under ``root``."""
    root = Path(root)
    manifest = root / "manifest.json"
    wanted = {"num_images": num_images, "classes": classes, "seed": seed, "version": 1}
    paths = [root / f"n{i % classes:08d}" / f"img_{i:07d}.JPEG" for i in range(num_images)]
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(p.is_file() for p in paths):
        return paths
    for i, path in enumerate(paths):
        rng = random.Random(seed * 1_000_003 + i)
        w, h = image_size(rng)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(synthetic_photo(w, h, seed=seed + i), quality=rng.choice(QUALITIES)))
    manifest.write_text(json.dumps(wanted))
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_folder(args.root, args.num_images, args.classes, args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} JPEGs in {args.root}, {total / len(paths) / 1024:.0f} KiB on average")


if __name__ == "__main__":
    main()
