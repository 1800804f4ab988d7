"""CPU micro-benchmarks behind implementation choices in the mask sampler, the data loaders and the
linear probe: each case times the way the code does it against the obvious alternative, calls
interleaved so both see the same machine, on fresh inputs (a repeated input lets the branch
predictor learn it). One intra-op thread unless a case says otherwise. Run from the repository root::

    python -m profiling.bench_choices [--reps 40] [--json out.json]

Prints one Markdown table: case, variant, median and 20th/80th percentile ms, time relative to the
variant the code uses. Measured tables: profiling/RESULTS.md, "Implementation choices".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ijepa_fast.masks.sampler import MultiBlockMaskSampler, _tables, in_index_order

POOL = 8  # distinct inputs cycled through, so no call sees the previous call's data


def interleaved(variants: dict[str, Callable[[int], object]], reps: int) -> dict[str, dict[str, float]]:
    """Median and 20/80th percentile ms per call of each variant; ``fn(i)`` uses input ``i % POOL``."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn(0)  # warm-up
    for i in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(i % POOL)
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=10, method="inclusive")
        out[name] = {"median_ms": statistics.median(t), "p20_ms": q[1], "p80_ms": q[7]}
    return out


def case_target_union(B: int = 128, M: int = 4, N: int = 256) -> dict:
    """The union of M target blocks per image: an OR chain over contiguous [B, N] slices, or .any(0)."""
    rects = [torch.rand(M * B, N) < 0.2 for _ in range(POOL)]

    def or_chain(i: int) -> torch.Tensor:
        r = rects[i]
        covered = r[:B].clone()
        for m in range(1, M):
            covered |= r[m * B : (m + 1) * B]
        return covered

    return {"OR chain over slices (used)": or_chain, ".any(0) on [M, B, N]": lambda i: rects[i].view(M, B, N).any(0)}


def case_block_tables(B: int = 512, H: int = 16, W: int = 16, h: int = 6, w: int = 5) -> dict:
    """Block masks: gather rows of cached [*, H*W] tables and AND them, or broadcast [B,H,1] & [B,1,W]."""
    rows, cols = _tables(H, W, h, w)
    tops = [torch.randint(0, H - h + 1, (B,)) for _ in range(POOL)]
    lefts = [torch.randint(0, W - w + 1, (B,)) for _ in range(POOL)]
    ar_h, ar_w = torch.arange(H), torch.arange(W)

    def broadcast(i: int) -> torch.Tensor:
        top, left = tops[i][:, None], lefts[i][:, None]
        r = (ar_h >= top) & (ar_h < top + h)  # (B, H)
        c = (ar_w >= left) & (ar_w < left + w)  # (B, W)
        return (r[:, :, None] & c[:, None, :]).view(B, H * W)

    return {"table rows & (used)": lambda i: rows[tops[i]] & cols[lefts[i]], "broadcast [B,H,1]&[B,1,W]": broadcast}


def case_topk_keys(R: int = 128, N: int = 256, k: int = 100) -> dict:
    """Top-k of random keys: int32 keys, or float32 ones."""
    ints = [torch.randint(0, 1 << 30, (R, N), dtype=torch.int32) for _ in range(POOL)]
    floats = [torch.rand(R, N) for _ in range(POOL)]
    return {
        "int32 keys (used)": lambda i: ints[i].topk(k, dim=1, sorted=False),
        "float32 keys": lambda i: floats[i].topk(k, dim=1, sorted=False),
    }


def _chosen(R: int, N: int, k: int) -> list[torch.Tensor]:
    return [torch.rand(R, N).topk(k, dim=1, sorted=False).indices for _ in range(POOL)]


def case_order_winners(R: int = 128, N: int = 256, k: int = 100) -> dict:
    """Put the top-k winners in index order: rank by counting (int32), sort, or scatter + nonzero."""
    chosen = _chosen(R, N, k)

    def scatter_nonzero(i: int) -> torch.Tensor:
        return torch.zeros(R, N, dtype=torch.bool).scatter_(1, chosen[i], True).nonzero()[:, 1].view(R, k)

    return {
        "rank by counting (used)": lambda i: in_index_order(chosen[i], N),
        "sort": lambda i: chosen[i].sort(dim=1).values,
        "scatter + nonzero": scatter_nonzero,
    }


def case_count_dtype(R: int = 128, N: int = 1024, k: int = 400) -> dict:
    """Rank by counting on a 32x32 grid: int32 counts, or int64."""
    chosen = _chosen(R, N, k)
    return {
        "int32 counts (used)": lambda i: in_index_order(chosen[i], N),
        "int64 counts": lambda i: in_index_order(chosen[i], N, count_dtype=torch.int64),
    }


def case_probe_softmax(P: int = 32, K: int = 10, n: int = 1024) -> dict:
    """The probe's softmax for P regressions: over dim 1 of [P, K, n] (samples contiguous), or over a
    last dim of size K of [P, n, K]."""
    major = [torch.randn(P, K, n) for _ in range(POOL)]
    minor = [m.transpose(1, 2).contiguous() for m in major]  # the same logits, classes last
    return {
        "classes-major [P,K,n] (used)": lambda i: major[i].softmax(1),
        "classes-last [P,n,K]": lambda i: minor[i].softmax(-1),
    }


def case_scan_paths(count: int = 1_281_167) -> dict:
    """A folder scan's paths for ImageNet's train-set size: ``str`` (``as_str=True``), or ``Path`` objects."""
    prefix = os.path.join("/data/imagenet/train", "")
    rel = [f"n{i // 1300:08d}/n{i // 1300:08d}_{i}.JPEG" for i in range(count)]
    return {
        "str, as_str=True (used)": lambda i: [prefix + r for r in rel],
        "Path": lambda i: [Path(prefix + r) for r in rel],
    }


def case_sampler_threads(batch: int = 64) -> dict:
    """The mask sampler on 64 images with 1 intra-op thread, or 2 (the DALI loader runs it with 1)."""
    sampler = MultiBlockMaskSampler(14, seed=0)
    steps = iter(range(10**6, 10**9))

    def at(threads: int) -> Callable[[int], object]:
        def fn(i: int) -> object:
            torch.set_num_threads(threads)
            try:
                return sampler(batch, next(steps))
            finally:
                torch.set_num_threads(1)

        return fn

    return {"1 thread (used)": at(1), "2 threads": at(2)}


CASES: dict[str, tuple[Callable[[], dict], int]] = {  # name -> (variants, repeats divisor)
    "mask target union, B=128 M=4 16x16": (case_target_union, 1),
    "block masks, B=512 16x16": (case_block_tables, 1),
    "top-k keys, 128x256 k=100": (case_topk_keys, 1),
    "order top-k winners, 128x256 k=100": (case_order_winners, 1),
    "rank-count dtype, 128x1024 k=400": (case_count_dtype, 1),
    "probe softmax, P=32 K=10 n=1024": (case_probe_softmax, 1),
    "scan paths, 1,281,167 images": (case_scan_paths, 8),
    "mask sampler threads, 64 images 14x14": (case_sampler_threads, 1),
}


def run(reps: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for case, (make, divisor) in CASES.items():
        variants = make()
        timings = interleaved(variants, max(reps // divisor, 5))
        used = next(t for name, t in timings.items() if "(used)" in name)["median_ms"]
        for name, t in timings.items():
            rows.append({"case": case, "variant": name, **t, "relative": t["median_ms"] / used})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | variant | median ms | p20 ms | p80 ms | time / used |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} "
            f"| {r['relative']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=40, help="timed calls per variant (the path scan: reps / 8)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error(f"--reps must be >= 5, got {args.reps}")
    rows = run(args.reps)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
