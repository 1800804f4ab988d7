"""Time to step 0 of the DALI loader (CPU mode) on a large image folder: world 1 and 2, cold and warm
verdict cache, for this checkout ("after") and for another checkout of the package ("before").

    python -m profiling.make_imagenet_like /tmp/imagenet-like --num-images 20000
    python -m profiling.bench_startup /tmp/imagenet-like --before /tmp/before-src [--worlds 1 2]
                                      [--batch-size 32] [--threads 2] [--repeats 1] [--json out.json]

Each measurement starts ``world`` fresh processes (gloo process group for world 2) that build the
loader as the trainer does and take the first batch. *to step 0* is the wall time from starting the
processes to every rank holding its first batch (so it includes the Python, torch and DALI imports);
*build + batch* is the slowest rank's time from calling the builder to holding the batch.

- before: the package at ``--before`` (e.g. ``git archive 4575b31``): every rank decodes every image
  (``validate="full"``), verdicts cached per rank in the run folder (``image_check.rank{r}.json``).
  Cold: a new run folder; warm: the same run folder again (a resumed run; a new run is cold again).
- after: this checkout: ``data.image_check`` (default ``header``) split over the ranks, verdicts in
  the per-dataset cache folder. Cold: an empty cache folder; warm: the same one again (any later run).

Configurations run in turn (before and after of one world and cache state back to back), so a change
in the machine's load hits both alike. Every image is read once first, so files come from the page
cache in every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rank_main(argv: list[str]) -> None:
    """One rank: build the loader like ``data.build.build_loader`` of the code under test, take a batch."""
    code, root, state, rank, world, store, batch, threads, out = argv
    rank, world, batch, threads = int(rank), int(world), int(batch), int(threads)
    import torch.distributed as dist

    from ijepa_fast.config import DataConfig
    from ijepa_fast.data.dali import build_dali_loader

    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        group = dist.group.WORLD
    cfg = DataConfig(root=root, split="", crop_size=224, batch_size=batch, num_workers=threads)
    kw = dict(grid=14, mask_kwargs=dict(num_pred_masks=4, min_keep=10), seed=0, rank=rank, world_size=world)
    started = time.perf_counter()
    if code == "before":
        loader = build_dali_loader(cfg, cache=Path(state) / f"image_check.rank{rank}.json", **kw)
    else:
        from ijepa_fast.data.dali.cache import cache_file

        cache = cache_file(root, state)
        loader = build_dali_loader(cfg, validate=cfg.image_check, cache=cache, group=group, progress=False, **kw)
    batch0 = next(iter(loader))
    elapsed = time.perf_counter() - started
    assert batch0.step == 0
    Path(out).write_text(json.dumps({"build_batch_s": elapsed}))
    loader.close()
    if group is not None:
        dist.barrier()
        dist.destroy_process_group()


def measure(code: str, tree: Path, root: Path, state: Path, world: int, batch: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        args = [code, str(root), str(state), "", str(world), f"{tmp}/store", str(batch), str(threads)]
        t0 = time.perf_counter()
        procs = []
        for r in range(world):
            a = list(args)
            a[3] = str(r)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--rank", *a, f"{tmp}/r{r}.json"], env=env, stdout=subprocess.DEVNULL
                )
            )
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"{code} world {world}: a rank exited with {codes}")
        inner = max(json.loads(Path(f"{tmp}/r{r}.json").read_text())["build_batch_s"] for r in range(world))
    return {"code": code, "world": world, "to_step0_s": round(wall, 2), "build_batch_s": round(inner, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--before", type=Path, required=True, help="a checkout (package root) of the code to compare")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI threads (data.num_workers) per rank")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    files = [f for f in args.root.rglob("*") if f.is_file()]
    size = sum(len(f.read_bytes()) for f in files)  # into the page cache
    print(f"{args.root}: {len(files)} files, {size / 2**20:.0f} MiB (read once into the page cache)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for world in args.worlds:
                states = {c: Path(tmp, f"{c}-{rep}-{world}") for c in ("before", "after")}
                for state in ("cold", "warm"):
                    for code, tree in (("before", args.before), ("after", REPO)):
                        row = measure(code, tree, args.root, states[code], world, args.batch_size, args.threads)
                        rows.append({**row, "cache": state, "repeat": rep})
                        print(json.dumps(rows[-1]), flush=True)
    print("| code | world | verdict cache | to step 0 s | build + first batch s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['code']} | {r['world']} | {r['cache']} | {r['to_step0_s']} | {r['build_batch_s']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2:])
    else:
        raise SystemExit(main())
