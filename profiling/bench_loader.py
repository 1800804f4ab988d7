"""The CPU pretraining loader per core, ours against the authors' pipeline, in one run.

    python -m profiling.bench_loader [--root DIR | --dir /tmp/imagenet_like --num-images 1024]
                                     [--batch-size 128] [--rounds 7] [--core 0] [--json out.json] [--quick]

What one batch is, on each side: read the files (page cache), decode, RandomResizedCrop(224, scale
(0.3, 1.0)), random horizontal flip, normalise, collate, and the batch's multi-block masks on the
16 x 16 grid of ViT-H/14 (the paper's mask settings):

- ``authors``: ``profiling/authors_pipeline.py`` (their ImageFolder loader, torchvision-style
  transforms re-stated in PIL and torch, their MaskCollator with ``profiling/authors_masks.py``);
- ``ours``: the library's ``PretrainDataset`` and ``Collate`` as the trainer's workers run them
  (the crop box from the header, reduced-scale JPEG decode, uint8 until one normalisation per
  batch, vectorised masks), with the decoder ``fast_decoder()`` picks;
- ``ours-uint8``: the same, the batch left uint8 for the device to normalise;
- ``ours-uint8-pillow-resample``: ``ours-uint8`` with every crop resampled by Pillow (the authors'
  pixels exactly), where ``ours-uint8`` uses torch's uint8 kernel on CPUs with AVX2 or AVX-512
  (``decode.fast_resample``): what that kernel saves;
- ``ours-pillow``: ours with Pillow's ``draft`` as the decoder (what runs without simplejpeg);
- ``ours-full``: ours without the reduced-scale decode (Pillow, the whole image decoded).

Per core: the process is pinned to one core (``--core``) with one torch thread and no workers, and
each batch is timed by the CPU time the process spent on it (``time.process_time``), so images/s is
the rate of one loader worker per core-second, also on a machine shared with other work (which
slows the wall clock, not the CPU time; it can still slow both through shared caches). Rounds
interleave the variants batch by batch on the same images, so a change in the machine's load hits
each alike; the table gives the median round, and the ratio to ``authors`` is the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ijepa_fast.data.decode import REDUCTIONS, fast_decoder, fast_resample, header_size, reduction
from ijepa_fast.data.folder import ImageFolderDataset
from ijepa_fast.data.loader import Collate, PretrainDataset
from ijepa_fast.data.transforms import CROP_RATIO, crop_box
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.runtime.rng import crop_rng
from profiling.authors_pipeline import AuthorsCollator, AuthorsDataset
from profiling.make_imagenet_like import write_folder

GRID = 16  # ViT-H/14 at 224 px
SCALE = (0.3, 1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, help="an image folder (default: generate one)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/imagenet_like"), help="where to generate it")
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--core", type=int, default=None, help="pin to this core (default: the last allowed one)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="seconds: 48 images, batch 16, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.rounds = min(args.num_images, 48), min(args.batch_size, 16), 2
    return args


class _WholeDecode:
    """An image folder without ``read_bytes``: the loader then decodes each whole image (``load_rgb``)."""

    def __init__(self, folder: ImageFolderDataset):
        self.folder, self.root, self.labels = folder, folder.root, folder.labels

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        return self.folder[i]

    def describe(self, i: int) -> str:
        return self.folder.describe(i)


def variants(root: Path, crop: int) -> dict[str, Callable[[list[int], int], object]]:
    """name -> run(indices, step): one whole batch, as its pipeline's workers make it."""
    folder = ImageFolderDataset(root)
    authors = AuthorsDataset(folder.paths, folder.labels, crop, SCALE, flip=True)
    authors_collate = AuthorsCollator(GRID)

    def ours(source, uint8: bool = False, decoder: str | None = None, resample: str | None = None):
        ds = PretrainDataset(source, crop, SCALE, seed=0, flip=True, decoder=decoder, resample=resample)
        collate = Collate(MultiBlockMaskSampler(GRID), uint8=uint8)
        return lambda idx, step: collate([ds[(i, step, 0)] for i in idx])

    return {
        "authors": lambda idx, step: authors_collate([authors[i] for i in idx]),
        "ours": ours(folder),
        "ours-uint8": ours(folder, uint8=True),
        "ours-uint8-pillow-resample": ours(folder, uint8=True, resample="pillow"),
        "ours-pillow": ours(folder, decoder="pillow"),
        "ours-full": ours(_WholeDecode(folder)),
    }


def reductions(root: Path, crop: int, n: int = 4096) -> dict[int, float]:
    """Share of crops decoded at each DCT scale 1/k, over ``n`` draws on the folder's images."""
    folder = ImageFolderDataset(root)
    sizes = [header_size(folder.read_bytes(i)) for i in range(len(folder))]
    counts = dict.fromkeys(REDUCTIONS, 0)
    for j in range(n):
        w, h = sizes[j % len(sizes)]
        counts[reduction(crop_box(w, h, SCALE, CROP_RATIO, crop_rng(1, 0, j)), crop)] += 1
    return {k: c / n for k, c in counts.items()}


def run(root: Path, args: argparse.Namespace) -> dict:
    runs = variants(root, args.crop_size)
    n = len(ImageFolderDataset(root))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds + 1):  # round 0 warms up (imports, first allocations) and is dropped
        idx = [(r * args.batch_size + j) % n for j in range(args.batch_size)]
        order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]  # rotate who goes first
        for name in order:
            start = time.process_time()
            runs[name](idx, r)
            if r:
                times[name].append(time.process_time() - start)
        if r:
            done = ", ".join(f"{k} {args.batch_size / v[-1]:.1f}" for k, v in times.items())
            print(f"round {r} (images per core-second): {done}", flush=True)
    rates = {k: [args.batch_size / t for t in v] for k, v in times.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(v, rates["authors"])) for k, v in rates.items()}
    return {
        k: {
            "images_per_s": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "ms_per_image": 1e3 / statistics.median(v),
            "x_authors": ratio[k],
        }
        for k, v in rates.items()
    }


def cpu_facts() -> dict[str, str]:
    model, bf16 = platform.processor() or "unknown", "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
        bf16 = "yes" if "avx512_bf16" in out else "no"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "avx512_bf16": bf16, "cores": str(os.cpu_count())}


def table(rows: dict) -> str:
    lines = [
        "| pipeline | images per core-second (median) | range | CPU ms per image | x authors |",
        "|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        lines.append(
            f"| {k} | {r['images_per_s']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {r['ms_per_image']:.2f} "
            f"| {r['x_authors']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = args.root or args.dir
    if args.root is None:
        write_folder(root, args.num_images, classes=16)
    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    core = args.core if args.core is not None else max(allowed)
    folder = ImageFolderDataset(root)
    for i in range(len(folder)):  # into the page cache
        folder.read_bytes(i)
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        rows = run(root, args)
    finally:  # a caller (a test) gets its cores and threads back
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)
    cpu_capability = torch.backends.cpu.get_cpu_capability()
    meta = {
        **cpu_facts(),
        "pinned core": core,
        "images": f"{len(folder)} from {root}",
        "batch": args.batch_size,
        "timed rounds": args.rounds,
        "decoder": fast_decoder(),
        "resample of whole-pixel crops": f"{fast_resample()} (torch's CPU capability: {cpu_capability})",
        "decode scale shares (1/k: share)": {
            f"1/{k}": round(v, 3) for k, v in reductions(root, args.crop_size).items()
        },
    }
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
