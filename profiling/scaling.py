"""Scaling model: multi-GPU and multi-node step time from one GPU's measured step and the
communication of each DeepSpeed ZeRO stage and of the FSDP2 engine. An estimate for reasoning about
16-64 GPUs on a machine that has one (or none); where several GPUs are at hand, measure instead.

    python -m profiling.scaling --step-ms 520 --batch 128 --model vit_huge --patch 14 --img 224
    python -m profiling.scaling --from-json profiling/out/step_vit_huge_14_224.json --overlap 0.5

**Communication per step and GPU** (P trainable parameters of the student, encoder + predictor;
E parameters of the target encoder; g bytes per gradient element, w bytes per parameter element as
communicated):

============  =====================================================  ==============================
ZeRO stage    collectives                                             bytes (full size, before ring)
============  =====================================================  ==============================
0 (DDP)       all-reduce of the gradients                             g*P
1             reduce-scatter of the gradients, all-gather of the      g*P + w*P
              updated parameters (each rank updated its shard)
2             as stage 1 (the gradients are also stored sharded:      g*P + w*P
              less memory, the same traffic)
3             reduce-scatter of the gradients; the parameters are     g*P + 2*w*P + 4*E
              all-gathered in the forward and again in the backward
              (none is kept whole, so no gather after the step);
              plus the partitioned fp32 target encoder gathered for
              its forward
fsdp2         reduce-scatter of the gradients; the blocks'            g*P + 2*w*P + w*E
              parameters all-gathered in the forward and again in
              the backward; the target encoder, sharded the same
              way, gathered for its forward
============  =====================================================  ==============================

Element sizes are what ``ijepa_fast.engines.deepspeed`` sends, read from the DeepSpeed config it
generates (``engine_bytes``): gradients are reduced in its ``communication_data_type`` (fp32: 4
bytes), and the parameters gathered (ZeRO 1-2 after the step, ZeRO-3 in the forward and backward)
are its weights, fp32 (4 bytes) since it runs with DeepSpeed's ``bf16`` and ``fp16`` modes off
(the step's autocast computes in bf16). ``run.dtype`` does not change the traffic. The target
encoder is fp32 in every stage. ``--grad-bytes`` / ``--param-bytes`` ask "what if" (2 for a bf16
engine). The EMA needs no traffic: in stages 0-2 every rank holds the whole encoder and target, in
stage 3 the update runs on the local partitions.

FSDP2 (``ijepa_fast.engines.fsdp2``) sends what ZeRO-3 sends, with its own element sizes, read from
the mixed-precision policy it builds for a GPU run (bf16 autocast): gradients reduce-scattered in
fp32 (g = 4) and the blocks' parameters, the target encoder's included, gathered in bf16 (w = 2).
The root modules' parameters (patch embedding, positional embeddings, mask token, final norms) are
gathered in fp32; the model counts them at the blocks' size, as they are a small share. Its EMA
runs on the local shards: no traffic.

**Ring cost** (NCCL's ring algorithm, bandwidth term, n GPUs, link bandwidth bw, bytes S):
all-reduce 2(n-1)/n * S / bw; reduce-scatter and all-gather (n-1)/n * S / bw each; plus an
optional latency alpha per ring hop (2(n-1) hops for an all-reduce, n-1 otherwise). So stages 1
and 2 move what stage 0 moves (when g = w) and stage 3 moves 1.5x (the ZeRO paper's 3 vs 2 units),
plus the target encoder's gather.

**Links.** One node (n <= GPUs per node): the intra-node bandwidth (NVLink). Several nodes: a flat
ring is as fast as its slowest hop, the inter-node bandwidth per GPU (the node's network bandwidth
over its GPUs, e.g. 8 x 400 Gb/s InfiniBand = 50 GB/s per GPU). NCCL's tree and hierarchical
algorithms can do better across nodes; this is the simple, pessimistic-leaning ring.

**Step time.** t = max(t_compute + (1 - f) * t_comm, t_comm) with f the fraction of communication
hidden behind compute (gradient buckets reduced during the backward: f near the backward's share
of the step when buckets are many). Images/s = n * batch / t; efficiency = t_compute / t.

The default bandwidths (400 GB/s NVLink bus bandwidth, 50 GB/s per GPU across nodes) are
assumptions, not measurements: pass your cluster's (nccl-tests' all_reduce_perf "busbw").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = (0, 1, 2, 3)  # DeepSpeed ZeRO
FSDP2 = "fsdp2"
SCHEMES = (*STAGES, FSDP2)  # what --stages takes


def scheme(text: str) -> int | str:
    """A ``--stages`` value: a ZeRO stage number, or ``fsdp2``."""
    return int(text) if text.isdigit() else text


def ring_allreduce_s(nbytes: float, n: int, bw: float, latency_s: float = 0.0) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` GPUs at ``bw`` bytes/s: 2(n-1)/n * bytes / bw."""
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency_s


def ring_allgather_s(nbytes: float, n: int, bw: float, latency_s: float = 0.0) -> float:
    """Ring all-gather (or reduce-scatter) whose full result is ``nbytes``: (n-1)/n * bytes / bw."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / bw + (n - 1) * latency_s


ring_reduce_scatter_s = ring_allgather_s


_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def engine_bytes(stage: int | str) -> tuple[int, int]:
    """(gradient, parameter) bytes per element that our DeepSpeed engine communicates at ``stage``:
    its generated config's ``communication_data_type`` for the gradients, its weights' dtype (bf16
    or fp16 mode on: 2 bytes, else fp32) for the gathered parameters. For ``fsdp2``: the
    ``reduce_dtype`` and the blocks' ``param_dtype`` of the FSDP2 engine's policy under bf16 autocast."""
    if stage == FSDP2:
        import torch

        from ijepa_fast.engines.fsdp2.precision import REDUCE_DTYPE, param_dtype

        return REDUCE_DTYPE.itemsize, param_dtype(torch.bfloat16, block=True).itemsize
    from ijepa_fast.config import Config, apply_overrides
    from ijepa_fast.engines.deepspeed import deepspeed_config

    # the bf16 target copy needs the whole target on each rank: off where ZeRO-3 partitions it
    cfg = apply_overrides(Config(), [f"run.zero_stage={stage}", f"speed.bf16_target_copy={stage != 3}"])
    ds = deepspeed_config(cfg, world_size=1, device_type="cuda")
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    param = 2 if half else 4
    comm = ds.get("communication_data_type")
    return (_DTYPE_BYTES[comm] if comm else param), param


def comm_volume_bytes(
    params: float,
    stage: int,
    grad_bytes: int = 4,
    param_bytes: int = 4,
    target_params: float = 0.0,
    target_bytes: int = 4,
) -> dict[str, float]:
    """Full-size bytes per collective kind for one step under ZeRO ``stage`` or FSDP2 (see the module
    docstring; FSDP2 gathers the target encoder at ``param_bytes``)."""
    if stage not in SCHEMES:
        raise ValueError(f"ZeRO stage {stage} is not one of {SCHEMES}")
    if stage == FSDP2:
        return {"reduce_scatter": grad_bytes * params, "allgather": param_bytes * (2 * params + target_params)}
    if stage == 0:
        return {"allreduce": grad_bytes * params}
    if stage in (1, 2):
        return {"reduce_scatter": grad_bytes * params, "allgather": param_bytes * params}
    return {"reduce_scatter": grad_bytes * params, "allgather": 2 * param_bytes * params + target_bytes * target_params}


def comm_time_s(volumes: dict[str, float], n: int, bw: float, latency_s: float = 0.0) -> float:
    """Seconds of the collectives in ``volumes`` (``comm_volume_bytes``) on a ring of ``n`` GPUs."""
    t = ring_allreduce_s(volumes.get("allreduce", 0.0), n, bw, latency_s)
    t += ring_reduce_scatter_s(volumes.get("reduce_scatter", 0.0), n, bw, latency_s)
    gathers = volumes.get("allgather", 0.0)
    if gathers:
        t += ring_allgather_s(gathers, n, bw, latency_s)
    return t


def link_bandwidth(gpus: int, gpus_per_node: int, intra_bw: float, inter_bw: float) -> float:
    """The ring's bottleneck bandwidth: intra-node within one node, else the inter-node rate per GPU."""
    return intra_bw if gpus <= gpus_per_node else min(intra_bw, inter_bw)


def estimate(
    *,
    step_s: float,
    batch: int,
    params: float,
    gpus: int,
    gpus_per_node: int,
    intra_bw: float,
    inter_bw: float,
    stage: int,
    overlap: float = 0.0,
    grad_bytes: int = 4,
    param_bytes: int = 4,
    target_params: float = 0.0,
    latency_s: float = 0.0,
) -> dict:
    """Estimated step time, images/s and efficiency of ``gpus`` GPUs (bandwidths in bytes/s)."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap={overlap} must lie in [0, 1]")
    if step_s <= 0 or gpus < 1 or gpus_per_node < 1:
        raise ValueError("step_s must be positive, gpus and gpus_per_node at least 1")
    bw = link_bandwidth(gpus, gpus_per_node, intra_bw, inter_bw)
    volumes = comm_volume_bytes(params, stage, grad_bytes, param_bytes, target_params)
    comm = comm_time_s(volumes, gpus, bw, latency_s)
    t = max(step_s + (1.0 - overlap) * comm, comm)
    return {
        "gpus": gpus,
        "nodes": -(-gpus // gpus_per_node),
        "stage": stage,
        "link_gb_s": bw / 1e9,
        "comm_s": comm,
        "step_s": t,
        "images_per_s": gpus * batch / t,
        "efficiency": step_s / t,
    }


def student_params(model: str, patch: int, img: int, pred_depth: int = 12, pred_dim: int = 384) -> tuple[int, int]:
    """Trainable parameters of the student (context encoder + predictor) and of the encoder alone
    (the target encoder's size), counted on the meta device."""
    import torch

    from ijepa_fast.config import ModelConfig
    from ijepa_fast.models.ijepa import build_models

    with torch.device("meta"):
        student, _ = build_models(
            ModelConfig(name=model, patch_size=patch, pred_depth=pred_depth, pred_emb_dim=pred_dim), img
        )

    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    return count(student), count(student.encoder)


def table(rows: list[dict]) -> str:
    lines = [
        "| GPUs | nodes | ZeRO stage or engine | link GB/s | comm ms | step ms | images/s | per GPU | efficiency |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['gpus']} | {r['nodes']} | {r['stage']} | {r['link_gb_s']:.0f} | {1e3 * r['comm_s']:.1f} "
            f"| {1e3 * r['step_s']:.1f} | {r['images_per_s']:.0f} | {r['images_per_s'] / r['gpus']:.1f} "
            f"| {100 * r['efficiency']:.0f}% |"
        )
    return "\n".join(lines)


def _from_bench_json(path: str) -> tuple[float, int, dict]:
    """(step seconds, batch, spec) of the default row (else the fastest) of an ijepa-bench JSON."""
    data = json.loads(Path(path).read_text())
    ok = [r for r in data["rows"] if r.get("ok")]
    if not ok:
        raise SystemExit(f"{path}: no configuration ran successfully")
    row = next((r for r in ok if r["name"] == "all on (default)"), max(ok, key=lambda r: r["images_per_s"]))
    return row["step_ms_median"] / 1e3, int(row["batch"]), data["meta"]["spec"]


def _engines(stages: list) -> str:
    names = [name for name, used in (("DeepSpeed", set(stages) - {FSDP2}), ("FSDP2", FSDP2 in stages)) if used]
    return f"{' and '.join(names)} engine{'s send' if len(names) > 1 else ' sends'}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--step-ms", type=float, help="measured single-GPU step time (ms)")
    src.add_argument("--from-json", help="an ijepa-bench JSON: the default configuration's median step")
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch (with --step-ms)")
    p.add_argument("--params", type=float, default=None, help="trainable parameters (default: counted)")
    p.add_argument("--model", default="vit_huge")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--pred-depth", type=int, default=12)
    p.add_argument("--pred-dim", type=int, default=384)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--json", type=Path, default=None, help="also write the rows and element sizes to this JSON file")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-bw", type=float, default=400.0, help="GB/s, intra-node (assumed NVLink bus bandwidth)")
    p.add_argument("--inter-bw", type=float, default=50.0, help="GB/s per GPU across nodes (assumed 8x400 Gb/s IB)")
    p.add_argument("--latency-us", type=float, default=0.0, help="per ring hop")
    p.add_argument("--stages", type=scheme, nargs="+", default=list(STAGES), choices=SCHEMES, help="ZeRO stages, fsdp2")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden behind compute")
    what_if = "what if: bytes per %s element (default: what the engine sends)"
    p.add_argument("--grad-bytes", type=int, default=None, help=what_if % "gradient")
    p.add_argument("--param-bytes", type=int, default=None, help=what_if % "parameter")
    args = p.parse_args(argv)
    if args.from_json:
        step_s, batch, spec = _from_bench_json(args.from_json)
        model, patch, img = spec["model"], spec["patch"], spec["img"]
        pred_depth, pred_dim = spec.get("pred_depth") or args.pred_depth, spec.get("pred_dim", args.pred_dim)
    else:
        step_s, batch = args.step_ms / 1e3, args.batch
        model, patch, img, pred_depth, pred_dim = args.model, args.patch, args.img, args.pred_depth, args.pred_dim
    params, target = student_params(model, patch, img, pred_depth, pred_dim)
    if args.params is not None:
        params, target = args.params, args.params * target / params

    def sizes(stage):
        g, w = engine_bytes(stage)
        return args.grad_bytes or g, args.param_bytes or w

    rows = [
        estimate(
            step_s=step_s,
            batch=batch,
            params=params,
            gpus=n,
            gpus_per_node=args.gpus_per_node,
            intra_bw=args.intra_bw * 1e9,
            inter_bw=args.inter_bw * 1e9,
            stage=stage,
            overlap=args.overlap,
            grad_bytes=sizes(stage)[0],
            param_bytes=sizes(stage)[1],
            target_params=target,
            latency_s=args.latency_us * 1e-6,
        )
        for stage in args.stages
        for n in args.gpus
    ]
    print(
        f"- single-GPU step {1e3 * step_s:.1f} ms at batch {batch}; {params / 1e6:.1f}M trainable parameters "
        f"({target / 1e6:.1f}M in the encoder); bytes per element sent (stage: gradient/parameter), "
        + ("as given: " if args.grad_bytes or args.param_bytes else f"as ijepa_fast's {_engines(args.stages)} them: ")
        + ", ".join(f"{s}: {sizes(s)[0]}/{sizes(s)[1]}" for s in args.stages)
        + " (4 = fp32, 2 = bf16)"
    )
    print(
        f"- links (assumed unless you passed yours): {args.intra_bw:.0f} GB/s in a node of {args.gpus_per_node}, "
        f"{args.inter_bw:.0f} GB/s per GPU between nodes; overlap {args.overlap:.0%}; ring algorithm"
    )
    print()
    print(table(rows))
    if args.json is not None:
        element_bytes = {stage: {"gradient": sizes(stage)[0], "parameter": sizes(stage)[1]} for stage in args.stages}
        args.json.write_text(json.dumps({"meta": {"bytes_per_element": element_bytes}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
