"""Benchmark the target-encoder EMA update: the authors' loop, ``torch._foreach_lerp_``, our kernel.

Run from the repository root: ``python -m profiling.bench_ema --device cuda --size vith14``.

Parameters are the ViT-H/14 encoder's (631M, 32 blocks of width 1280) or a tiny ViT on the CPU,
with the shapes the tests use. Configurations: fp32 targets and sources; bf16 targets and sources;
fp32 targets and sources plus a bf16 copy of the result. Bytes are the minimum: read t, read s,
write t (and write the copy). On a CPU the 'kernel' rows run the op's plain-PyTorch path.
"""

from __future__ import annotations

import torch

from ijepa_fast.kernels.ema import ema_update_, ema_update_foreach, ema_update_reference
from ijepa_fast.kernels.inputs import VIT_PARAM_SIZES, make_ema_inputs, vit_param_shapes
from profiling import _bench_util as bu

CONFIGS = {  # name -> (target dtype, source dtype, bf16 copy)
    "fp32": (torch.float32, torch.float32, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "fp32+bf16 copy": (torch.float32, torch.float32, True),
}
MOMENTUM = 0.996


def _authors_with_copy(ts, ss, m, outs):
    ema_update_reference(ts, ss, m)
    if outs is not None:
        for o, t in zip(outs, ts):
            o.copy_(t)


def run_config(name: str, shapes: list[tuple], device: str, reps: int) -> list[dict]:
    t_dtype, s_dtype, copy = CONFIGS[name]
    ts, ss, outs = make_ema_inputs(shapes, t_dtype, s_dtype, device=device, bf16_out=copy)
    n = sum(t.numel() for t in ts)
    nbytes = n * (2 * t_dtype.itemsize + s_dtype.itemsize + (2 if copy else 0))
    methods = {"authors": _authors_with_copy, "builtin": ema_update_foreach, "kernel": ema_update_}
    rows = []
    for method, fn in methods.items():
        timing = bu.time_ms(lambda fn=fn: fn(ts, ss, MOMENTUM, outs), device, reps)
        rows.append({"case": name, "method": method, "params": n, "bytes": nbytes, **timing})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = bu.parse_args(argv, "Benchmark the fused EMA update of the target encoder.")
    shapes = vit_param_shapes(**VIT_PARAM_SIZES[args.size])
    rows = []
    for name in CONFIGS:
        rows += run_config(name, shapes, args.device, args.reps)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    copy_gbs = bu.copy_bandwidth_gbs(args.device, 1 << 30 if args.device == "cuda" else 16 << 20, args.reps)
    bu.add_rates(rows, copy_gbs)
    meta = {
        "device": bu.device_name(args.device),
        "size": args.size,
        "params": rows[0]["params"],
        "tensors": len(shapes),
        "copy_bandwidth_gb_s": round(copy_gbs, 1),
        "momentum": MOMENTUM,
        "note": "on a CPU the 'kernel' rows run the op's plain-PyTorch path, not Triton",
    }
    bu.report(rows, meta, args.json)
    return rows


if __name__ == "__main__":
    main()
