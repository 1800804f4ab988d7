"""How long a checkpoint stalls training: saving in the step against the background write.

    python -m profiling.bench_checkpoint_stall [--model vit_base] [--patch 16] [--rounds 2] [--threads N]
                                               [--engine plain|deepspeed] [--zero-stage 2]
                                               [--dir /tmp/ckpt_stall] [--json out.json] [section.key=value ...]

The state is the engine's for ``--model`` (student, target encoder, predictor, AdamW moments filled by
one training step of two synthetic images), built by ``train.build`` as a run builds it; DeepSpeed runs
in a world of one on the CPU (gloo, ``DS_ACCELERATOR=cpu``). The training thread runs a stand-in step
(a fixed matmul loop on the CPU, so that its time is stable and short), saves at one step, and keeps
stepping. Trailing ``section.key=value`` overrides change the run's config (a smaller predictor, say).
Per mode:

- ``blocked``: the time the ``save`` call holds the training thread (the whole write in the step;
  the host copy only in the background);
- ``slower steps``: the extra time of the steps that run while the background write goes on, over
  the median step without a write (the writer thread's share of the cores and the GIL);
- ``stall`` = blocked + slower steps: what the run loses to one checkpoint;
- ``write``: from the save call to the files in place (``latest.pt`` swapped; for DeepSpeed, its
  ``latest`` too).

A run's first background save also allocates the host buffers that later ones reuse; it is timed
apart, before the rounds. Rounds alternate the modes, so a change in the machine's load hits both
alike; the table gives the median round. The checkpoints go to ``--dir`` (deleted at the end); keep
it on the disk a run would use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from ijepa_fast import config as config_mod
from ijepa_fast.bench.sources import SyntheticBatches
from ijepa_fast.io.async_save import BackgroundWriter
from ijepa_fast.runtime.distributed import DistEnv, free_port
from ijepa_fast.train.build import build_train_step, start_process


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ckpt_stall"))
    p.add_argument("--step-size", type=int, default=384, help="the stand-in step's matmul side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--engine", choices=("plain", "deepspeed"), default="plain")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2, help="with --engine deepspeed")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the options above")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def build(model: str, patch: int, engine: str = "plain", zero_stage: int = 2, overrides: tuple[str, ...] = ()):
    """The engine of a run of ``model`` on the CPU in a world of one, after one training step."""
    if engine == "deepspeed":  # read when DeepSpeed is first imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = config_mod.load(
        None,
        [
            f"model.name={model}",
            f"model.patch_size={patch}",
            f"run.engine={engine}",
            f"run.zero_stage={zero_stage}",
            "run.device=cpu",
            "run.dtype=fp32",
            "speed.compile=off",
            "data.batch_size=2",
            *overrides,
        ],
    )
    env = DistEnv(
        rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(), launcher="single"
    )
    device = start_process(cfg, env)
    train_step = build_train_step(cfg, device, steps_per_epoch=1)
    images, masks = SyntheticBatches(cfg, device, count=1).get(0)
    train_step(images, masks, step=0)
    return train_step.engine


def _step(side: int) -> float:
    """The stand-in step: a fixed matmul loop on the training thread; its wall time in seconds."""
    a = torch.randn(side, side)
    start = time.perf_counter()
    for _ in range(20):
        a = torch.tanh(a @ a.T / side)
    return time.perf_counter() - start


def one_round(engine, folder: Path, background: bool, side: int) -> dict:
    base = statistics.median(_step(side) for _ in range(5))
    writer = BackgroundWriter()
    meta = {"epoch": 0, "loss": 0.0}
    step = 1 if not background else 2
    start = time.perf_counter()
    if background:
        _, write = engine.save_async(folder, step, meta, keep=1)
        writer.submit(write)
    else:
        engine.save(folder, step, meta, keep=1)
    blocked = time.perf_counter() - start
    extra, steps = 0.0, 0
    while writer.busy:
        extra += _step(side) - base
        steps += 1
    writer.join()
    written = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return {
        "mode": "background" if background else "in the step",
        "blocked_s": blocked,
        "slower_steps_s": max(extra, 0.0),
        "steps_during_write": steps,
        "stall_s": blocked + max(extra, 0.0),
        "write_s": written,
        "step_s": base,
        "checkpoint_gb": size / 1e9,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:  # on an oversubscribed machine, OpenMP's waits make copies many times slower
        torch.set_num_threads(args.threads)
    engine = build(args.model, args.patch, args.engine, args.zero_stage, tuple(args.overrides))
    estimate_gb = engine.checkpoint_bytes() / 1e9  # what the disk check before step 0 counts
    rows: dict[str, list[dict]] = {"in the step": [], "background": []}
    try:
        # A run's first background save also allocates the host buffers (fresh memory faults in
        # slowly); later ones reuse them. The table times later ones; the first is printed apart.
        first = one_round(engine, args.dir, True, args.step_size)
        print(f"- first background save (allocates the host buffers): blocked {first['blocked_s']:.2f} s")
        for r in range(args.rounds):
            for background in (r % 2 == 1, r % 2 == 0):
                shutil.rmtree(args.dir, ignore_errors=True)
                row = one_round(engine, args.dir, background, args.step_size)
                rows[row["mode"]].append(row)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    out = []
    for rs in rows.values():
        mid = sorted(rs, key=lambda x: x["stall_s"])[(len(rs) - 1) // 2]
        out.append({**mid, "rounds": len(rs), "all_stall_s": [x["stall_s"] for x in rs]})
    gb, threads = out[0]["checkpoint_gb"], torch.get_num_threads()
    for o in out:
        o["estimate_gb"] = estimate_gb
    engine_name = args.engine + (f" ZeRO-{args.zero_stage}" if args.engine == "deepspeed" else "")
    print(
        f"- model: {args.model}/{args.patch}, {engine_name} engine, checkpoint {gb:.2f} GB "
        f"(the disk check's estimate {estimate_gb:.2f} GB), torch threads {threads}"
    )
    print("| mode | blocked s | slower steps s | stall s | write s | stand-in step s | rounds |")
    print("|---|---|---|---|---|---|---|")
    for o in out:
        print(
            f"| {o['mode']} | {o['blocked_s']:.2f} | {o['slower_steps_s']:.2f} | {o['stall_s']:.2f} "
            f"| {o['write_s']:.2f} | {o['step_s']:.3f} | {o['rounds']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
