"""Shared pieces of the kernel benchmarks: timing, copy bandwidth, the Markdown table, the CLI.

Timing: on CUDA ``triton.testing.do_bench`` (device events, median and 20/80 percentiles of the
repeats); on the CPU a ``time.perf_counter`` loop with the same statistics. Achieved bandwidth is
reported against the device's measured copy bandwidth (a large ``copy_``, bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--size",
        choices=("tiny", "vith14"),
        default=None,
        help="tiny (default on CPU) or vith14 (ViT-H/14, default on CUDA)",
    )
    p.add_argument("--reps", type=int, default=None, help="CPU timing repeats (default 20; CUDA uses do_bench)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available")
    if args.size is None:
        args.size = "vith14" if args.device == "cuda" else "tiny"
    if args.reps is None:
        args.reps = 20
    return args


def time_ms(
    fn: Callable[[], object], device: str, reps: int = 20, grad_to_none: list[torch.Tensor] | None = None
) -> dict[str, float]:
    """Median and 20th/80th percentile time of ``fn()`` in milliseconds."""
    if device == "cuda":
        from ijepa_fast.runtime.optional import require

        testing = require("triton", "GPU benchmark timing").testing
        med, p20, p80 = testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    fn()  # warm-up: first-call allocations and lazy builds stay out of the numbers
    times = []
    for _ in range(max(reps, 1)):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def copy_bandwidth_gbs(device: str, nbytes: int, reps: int = 20) -> float:
    """Measured copy bandwidth (bytes read + written per second, in GB/s) for a buffer of ``nbytes``."""
    src = torch.randn(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def add_rates(rows: list[dict], copy_gbs: float) -> None:
    """Fill GB/s, % of copy bandwidth and speed-ups against 'authors' and 'builtin' of the same case."""
    base = {(r["case"], r["method"]): r["median_ms"] for r in rows}
    for r in rows:
        r["gb_s"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        r["pct_copy"] = 100.0 * r["gb_s"] / copy_gbs
        r["vs_authors"] = base.get((r["case"], "authors"), float("nan")) / r["median_ms"]
        r["vs_builtin"] = base.get((r["case"], "builtin"), float("nan")) / r["median_ms"]


def markdown_table(rows: list[dict]) -> str:
    head = "| case | method | median ms | p20 ms | p80 ms | GB/s | % copy BW | x authors | x builtin |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['method']} | {r['median_ms']:.4f} | {r['p20_ms']:.4f} | {r['p80_ms']:.4f} "
            f"| {r['gb_s']:.1f} | {r['pct_copy']:.0f} | {r['vs_authors']:.2f} | {r['vs_builtin']:.2f} |"
        )
    return "\n".join(lines)


def report(rows: list[dict], meta: dict, json_path: Path | None) -> None:
    """Print the Markdown table (and a note line per meta key); write JSON when asked."""
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print()
    print(markdown_table(rows))
    if json_path is not None:
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
