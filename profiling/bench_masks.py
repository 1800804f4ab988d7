"""Mask sampling throughput on one CPU core: ours (vectorised) against the authors' per-image loop.

    python -m profiling.bench_masks [--batch 128] [--grids 16 14 32] [--reps 20] [--json out.json]

PAPER.md's figure for the authors' sampler: 44.7 ms per batch of 128 on a 16x16 grid, one core.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ijepa_fast.masks import MultiBlockMaskSampler
from profiling._bench_util import time_ms
from profiling.authors_masks import authors_masks

PAPER_MS_16x16 = 44.7  # PAPER.md: the authors' sampler, batch 128, 16x16 grid, one CPU core


def run(batch: int, grids: list[int], reps: int) -> list[dict]:
    torch.set_num_threads(1)  # the authors' figure is per CPU core
    rows = []
    for grid in grids:
        ours = MultiBlockMaskSampler(grid)
        step = iter(range(10**9))
        t_ours = time_ms(lambda: ours(batch, next(step)), "cpu", reps)
        t_auth = time_ms(lambda: authors_masks(batch, next(step), grid, grid), "cpu", max(reps // 4, 2))
        sizes = [ours(batch, s) for s in range(20)]
        rows.append({"grid": f"{grid}x{grid}", "batch": batch, "ours_ms": t_ours["median_ms"],
                     "authors_ms": t_auth["median_ms"], "speedup": t_auth["median_ms"] / t_ours["median_ms"],
                     "ours_images_s": batch / t_ours["median_ms"] * 1e3,
                     "mean_context": sum(b.context.shape[1] for b in sizes) / len(sizes),
                     "mean_target": sum(b.targets.shape[2] for b in sizes) / len(sizes),
                     "vs_paper_figure": PAPER_MS_16x16 / t_ours["median_ms"] if grid == 16 else float("nan")})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| grid | batch | ours ms | authors (re-stated, same process) ms | speed-up | x paper's 44.7 ms "
             "| ours images/s | mean context | mean target |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['grid']} | {r['batch']} | {r['ours_ms']:.2f} | {r['authors_ms']:.1f} | {r['speedup']:.1f}x | "
              f"{r['vs_paper_figure']:.1f}x | {r['ours_images_s']:.0f} | {r['mean_context']:.1f} | {r['mean_target']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--grids", type=int, nargs="+", default=[16, 14, 32])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = run(args.batch, args.grids, args.reps)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
