"""``python -m ijepa_fast.cli.launch_plan NODES PER_NODE RENDEZVOUS [ijepa-pretrain arguments]``: what
the multi-node launch scripts (``launch/slurm.sbatch``, ``launch/multi_node.sh``) print and pass on.

It resolves the run's config as ``ijepa-pretrain`` does, prints the world layout on stderr (nodes,
processes, rendezvous, global batch, engine (with its ZeRO stage for DeepSpeed), collective timeout
and where it comes from) and,
on stdout, the collective timeout in seconds and the same rounded up to a whole second (for
torchrun's rendezvous). The scripts pass the timeout to every process as ``run.dist_timeout_s``, so
each process group (NCCL or gloo, DeepSpeed's included) on every node takes the same one, whether it
came from the config, an override or ``IJEPA_DIST_TIMEOUT_S``. A config error ends it with status 2
and one line, before any process starts.
"""

from __future__ import annotations

import math
import os
import sys

from ijepa_fast.cli.pretrain import overrides_of, parse_args
from ijepa_fast.config import ConfigError, load
from ijepa_fast.engines import resolve_engine
from ijepa_fast.runtime.distributed import TIMEOUT_ENV, resolve_timeout


def layout(cfg, engine: str, nodes: int, per_node: int, rendezvous: str, timeout_s: float) -> str:
    """The one line a launch script prints at start."""
    world, batch, accum = nodes * per_node, cfg.data.batch_size, cfg.optim.grad_accum
    if cfg.run.dist_timeout_s:
        source = "run.dist_timeout_s"
    else:
        source = TIMEOUT_ENV if os.environ.get(TIMEOUT_ENV) else "the default"
    sharding = f", ZeRO stage {cfg.run.zero_stage}" if engine == "deepspeed" else ""
    return (
        f"ijepa: {nodes} node(s) x {per_node} process(es) = {world} ranks, rendezvous {rendezvous}; "
        f"global batch {batch * world * accum} = {batch} per rank x {world} ranks x {accum} accumulation; "
        f"engine {engine}{sharding}; collective timeout {timeout_s:g} s ({source})"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or not (argv[0].isdigit() and argv[1].isdigit()):
        print("usage: python -m ijepa_fast.cli.launch_plan NODES PER_NODE RENDEZVOUS [ijepa-pretrain arguments]")
        return 2
    nodes, per_node, rendezvous = int(argv[0]), int(argv[1]), argv[2]
    args = parse_args(argv[3:])
    try:
        cfg = load(args.config, overrides_of(args))
        timeout_s = resolve_timeout(cfg.run.dist_timeout_s or None).total_seconds()
        engine = resolve_engine(cfg.run.engine, nodes * per_node)
    except (ConfigError, ValueError) as err:
        print(f"ijepa: config error: {err}", file=sys.stderr)
        return 2
    print(layout(cfg, engine, nodes, per_node, rendezvous, timeout_s), file=sys.stderr)
    print(f"{timeout_s:g} {math.ceil(timeout_s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
