"""Pretraining data loader throughput: images/s of whole batches (decode, RandomResizedCrop, resize,
normalise, collate, masks) as the trainer receives them, for each worker count; plus the cost of each
stage of one image in this process, to show where the time goes.

    python -m profiling.bench_data [--root DIR | --num-images 256 --image-size 500 375]
                                   [--workers 0 1 2] [--batch-size 64] [--steps 20] [--crop-size 224]
                                   [--patch-size 16] [--loaders pytorch dali-cpu dali-gpu] [--json out.json]
                                   [--repeats 3] [--quick]

Without ``--root`` it writes ``--num-images`` photo-like JPEGs (500x375, about ImageNet's mean
size; ``ijepa_fast.data.synthetic``) to ``--dir`` or a temporary folder. Timing: per worker count, a
fresh loader; the first ``2 * workers + 1`` batches (start-up and the prefetch queue) are not timed,
then ``--steps`` batches are (at least ``4 * workers``, so that the batches in progress when the
clock starts stay a small part of the window). ``--repeats`` rounds, each over every loader and
worker count in turn (so that a change in the machine's load hits all of them alike); the table
gives the median round and the range. The files are read once before timing, so they come from the
page cache, as on a warm training machine. ``--loaders dali-cpu dali-gpu`` add the DALI
loader (``ijepa_fast.data.dali``: decode of the crop only, resize, normalise, masks) in DALI's CPU
mode and with GPU decoding (needs nvidia-dali, and CUDA for dali-gpu); there "workers" is DALI's
thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ijepa_fast.config import DataConfig
from ijepa_fast.data.folder import load_rgb, scan_folder
from ijepa_fast.data.loader import build_pretrain_loader
from ijepa_fast.data.transforms import CROP_RATIO, crop_box, normalize, pil_to_uint8, resized_crop
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.runtime.rng import crop_rng


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, help="an image folder to read (default: generate JPEGs)")
    p.add_argument("--dir", type=Path, default=None, help="where to generate the JPEGs (default: a temp folder)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default: 0 1 .. cores)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the worker counts (median reported)")
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--loaders", nargs="+", default=["pytorch"], choices=sorted(LOADERS))
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="a few seconds on a CPU: 32 images, batch 8, 3 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.steps, args.repeats = min(args.num_images, 32), 8, 3, 1
    if args.workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.workers = [0] if args.quick else sorted({0, 1, *range(2, cores + 1, 2), cores})
    return args


# ----------------------------------------------------------------------------- loaders


def _folder_config(root: Path, args: argparse.Namespace, workers: int, loader: str) -> DataConfig:
    """The benchmark's image folder as a training data config for ``loader``."""
    return DataConfig(
        dataset="folder",
        root=str(root),
        split="",
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        num_workers=workers,
        pin_memory=False,
        loader=loader,
    )


def bench_pytorch(root: Path, workers: int, args: argparse.Namespace) -> dict:
    """images/s of the CPU loader (PIL in DataLoader workers) with ``workers`` workers."""
    cfg = _folder_config(root, args, workers, "pytorch")
    grid = args.crop_size // args.patch_size
    warmup, steps = 2 * workers + 1, max(args.steps, 4 * workers)
    with build_pretrain_loader(cfg, grid=grid, mask_kwargs={}, seed=0) as loader:
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(it)
        elapsed = time.perf_counter() - start
    assert batch.images.shape == (args.batch_size, 3, args.crop_size, args.crop_size)
    return {
        "loader": "pytorch",
        "workers": workers,
        "batch": args.batch_size,
        "steps": steps,
        "images_per_s": steps * args.batch_size / elapsed,
        "ms_per_batch": elapsed / steps * 1e3,
    }


def _bench_dali(root: Path, workers: int, args: argparse.Namespace, device: str) -> dict:
    """images/s of the DALI loader with ``workers`` DALI threads (and as many file readers), masks
    included: DALI's CPU mode, or GPU (``mixed``) decoding with the masks sampled on the GPU."""
    from ijepa_fast.data.dali import build_dali_loader

    threads = max(1, workers)
    cfg = _folder_config(root, args, threads, "dali")
    grid = args.crop_size // args.patch_size
    # not timed: the first batch (built with the pipeline) and DALI's prefetch queue (2 batches)
    warmup, steps = 3, args.steps
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # DALI and the masks run async
    with build_dali_loader(
        cfg, grid=grid, mask_kwargs={}, seed=0, device=device, validate="off", threads=threads
    ) as loader:
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(it)
        sync()
        elapsed = time.perf_counter() - start
    assert batch.images.shape == (args.batch_size, 3, args.crop_size, args.crop_size)
    return {
        "loader": "dali-gpu" if device == "cuda" else "dali-cpu",
        "workers": threads,
        "batch": args.batch_size,
        "steps": steps,
        "images_per_s": steps * args.batch_size / elapsed,
        "ms_per_batch": elapsed / steps * 1e3,
    }


def bench_dali_cpu(root: Path, workers: int, args: argparse.Namespace) -> dict:
    return _bench_dali(root, workers, args, "cpu")


def bench_dali_gpu(root: Path, workers: int, args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--loaders dali-gpu needs a CUDA device")
    return _bench_dali(root, workers, args, "cuda")


# name -> fn(root, workers, args) -> row, all timed the same way (a fresh loader, warm-up batches,
# then --steps batches), so they share a table. For the DALI loaders "workers" is DALI's threads
# (0 counts as 1): images/s per CPU core is images_per_s / workers.
LOADERS: dict[str, Callable[[Path, int, argparse.Namespace], dict]] = {
    "pytorch": bench_pytorch,
    "dali-cpu": bench_dali_cpu,
    "dali-gpu": bench_dali_gpu,
}


# ----------------------------------------------------------------------------- stages


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def stage_costs(root: Path, args: argparse.Namespace, images: int = 16) -> dict[str, float]:
    """Median ms of each stage in this process (one thread): per image decode, crop + resize,
    to uint8 tensor; per batch normalise and masks."""
    paths = scan_folder(root)[0][:images]
    decoded = [load_rgb(p) for p in paths]
    boxes = [crop_box(im.width, im.height, (0.3, 1.0), CROP_RATIO, crop_rng(0, 0, i)) for i, im in enumerate(decoded)]
    crops = [resized_crop(im, b, args.crop_size) for im, b in zip(decoded, boxes)]
    batch = torch.stack([pil_to_uint8(crops[i % len(crops)]) for i in range(args.batch_size)])
    masks = MultiBlockMaskSampler(args.crop_size // args.patch_size)
    reps = max(3, 48 // len(paths))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = iter(range(10**9))
        return {
            "decode_ms_per_image": _median_ms(lambda: [load_rgb(p) for p in paths], reps) / len(paths),
            "crop_resize_ms_per_image": _median_ms(
                lambda: [resized_crop(im, b, args.crop_size) for im, b in zip(decoded, boxes)], reps
            )
            / len(paths),
            "to_tensor_ms_per_image": _median_ms(lambda: [pil_to_uint8(c) for c in crops], reps) / len(paths),
            "normalise_ms_per_batch": _median_ms(lambda: normalize(batch), reps),
            "masks_ms_per_batch": _median_ms(lambda: masks(args.batch_size, next(steps)), reps),
        }
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [
        "| loader | workers | batch | timed batches x rounds | images/s (median) | range | ms per batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loader']} | {r['workers']} | {r['batch']} | {r['steps']} x {r['rounds']} "
            f"| {r['images_per_s']:.0f} | {r['min_images_per_s']:.0f}-{r['max_images_per_s']:.0f} "
            f"| {r['ms_per_batch']:.1f} |"
        )
    return "\n".join(lines)


def _median_round(results: list[dict]) -> dict:
    """The round with the median images/s, plus the range and every round's rate."""
    ranked = sorted(results, key=lambda r: r["images_per_s"])
    rates = [r["images_per_s"] for r in ranked]
    return {
        **ranked[(len(ranked) - 1) // 2],
        "rounds": len(ranked),
        "min_images_per_s": rates[0],
        "max_images_per_s": rates[-1],
        "all_images_per_s": rates,
    }


def run(root: Path, args: argparse.Namespace) -> tuple[list[dict], dict]:
    for p in scan_folder(root)[0]:  # into the page cache
        p.read_bytes()
    stages = stage_costs(root, args)
    cases = [(name, k) for name in args.loaders for k in args.workers]
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in cases}
    for _ in range(max(1, args.repeats)):
        for name, k in cases:
            results[(name, k)].append(LOADERS[name](root, k, args))
    return [_median_round(results[c]) for c in cases], stages


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = args.root
        if root is None:
            from ijepa_fast.data.synthetic import write_jpeg_folder

            root = args.dir if args.dir is not None else Path(tmp)
            write_jpeg_folder(root, args.num_images, size=tuple(args.image_size))
        rows, stages = run(root, args)
    n = len(scan_folder(root)[0]) if args.root is not None else args.num_images
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    w, h = args.image_size
    grid = args.crop_size // args.patch_size
    meta = {
        "images": f"{n} from {args.root}" if args.root else f"{n} generated JPEGs at {w}x{h}",
        "crop": f"{args.crop_size} px, masks on a {grid}x{grid} grid",
        "cpu cores": cores,
        "torch threads (main)": torch.get_num_threads(),
    }
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print("- stages, one thread: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "stages": stages, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
