"""The step model's predictions (``ijepa_fast.models.step_model``) as tables: per phase for the
default and each switch (``ijepa-bench --model-step``), and beside the measured phases of every row
of a bench result (gpu-check's summary)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace

from ijepa_fast.config import Config
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.flops import step_flops_for_masks
from ijepa_fast.models.step_model import H100_SXM, PHASES, DeviceModel, Switches, predict_ms
from ijepa_fast.models.vit import grid_size

# The default, each switch the model prices alone on it (``speed`` keys, by their config names),
# then all of them.
ALL_ON = dict(fused_epilogue=True, fp8_target="rowwise", bf16_target_copy=True, bf16_residual=True, uint8_input=True)
# (name, switches changed, priced with a real loader's copy to the device)
MODEL_ROWS: tuple[tuple[str, dict, bool], ...] = (
    ("default", {}, False),
    ("+ fused_epilogue", {"fused_epilogue": True}, False),
    ("+ fp8_target=rowwise", {"fp8_target": "rowwise"}, False),
    ("+ fp8_target=tensorwise", {"fp8_target": "tensorwise"}, False),
    ("+ bf16_target_copy", {"bf16_target_copy": True}, False),
    ("+ bf16_residual", {"bf16_residual": True}, False),
    ("default, real loader", {}, True),
    ("+ uint8_input, real loader", {"uint8_input": True}, True),
    ("all of them (fp8 rowwise), real loader", ALL_ON, True),
)
SHOWN = PHASES[:-1]  # the sync phase is the authors' preset's only


def sampled_mask_sizes(cfg: Config, batches: int = 8) -> tuple[float, float, int]:
    """Mean (Kc, Kt) and M of the real sampler's masks over ``batches`` batches (steps 0..)."""
    sampler = MultiBlockMaskSampler(grid_size(cfg.data.crop_size, cfg.model.patch_size), seed=0, **asdict(cfg.mask))
    shapes = [sampler(cfg.data.batch_size, step=i) for i in range(batches)]
    kc = statistics.fmean(m.context.shape[-1] for m in shapes)
    kt = statistics.fmean(m.targets.shape[-1] for m in shapes)
    return kc, kt, shapes[0].targets.shape[0]


def model_table(base: Config, dev: DeviceModel = H100_SXM) -> str:
    """Markdown: predicted ms per phase, step ms, images/s and MFU for each of ``MODEL_ROWS``."""
    kc, kt, m = sampled_mask_sizes(base)
    flops = step_flops_for_masks(base.model, base.data.crop_size, [(m, round(kc), round(kt))])
    images = base.data.batch_size * base.optim.grad_accum
    lines = [
        f"Predicted on {dev.name}: bf16 {dev.bf16_tflops:g} / fp8 {dev.fp8_tflops:g} TFLOP/s dense, HBM "
        f"{dev.hbm_gb_s:g} GB/s, host-to-device {dev.h2d_gb_s:g} GB/s; assumed efficiencies: GEMMs "
        f"{dev.gemm_efficiency:g}, attention {dev.attention_efficiency:g}, memory {dev.memory_efficiency:g}. "
        f"{base.model.name}/{base.model.patch_size} at {base.data.crop_size} px, batch {images}, "
        f"masks Kc {kc:.1f}, Kt {kt:.1f}, M {m} (the sampler's mean).",
        "",
        "| configuration | " + " | ".join(SHOWN) + " | step ms | images/s | MFU |",
        "|---|" + "---|" * (len(SHOWN) + 3),
    ]
    default = Switches.from_speed(asdict(base.speed), device_type="cuda")
    for name, changes, real_loader in MODEL_ROWS:
        sw = replace(default, **changes)
        ms = predict_ms(base, kc, kt, m, dev, real_loader=real_loader, switches=sw)
        mfu = flops * images / (ms["total"] * 1e-3) / (dev.bf16_tflops * 1e12)
        cells = " | ".join(f"{ms[p]:.1f}" for p in SHOWN)
        lines.append(f"| {name} | {cells} | {ms['total']:.1f} | {images / ms['total'] * 1e3:.0f} | {100 * mfu:.1f}% |")
    lines += [
        "",
        "data: a real loader's copy of the images to the device (synthetic batches are made there).",
    ]
    return "\n".join(lines)


def predicted_vs_measured(result: dict, dev: DeviceModel = H100_SXM) -> list[str]:
    """Markdown lines: for each row of a bench ``result`` with a phase split, predicted / measured ms
    per phase and the step (an empty list when no row has phases)."""
    from ijepa_fast.bench.sources import BenchSpec

    meta = result.get("meta", {})
    spec_fields = {k: v for k, v in meta.get("spec", {}).items() if k in BenchSpec.__dataclass_fields__}
    spec = BenchSpec(**spec_fields)
    real_loader = meta.get("loader", "synthetic") != "synthetic"
    lines = []
    for row in result.get("rows", []):
        if not row.get("ok") or not row.get("phases_ms"):
            continue
        cfg = spec.config_for(row["speed"])
        sw = Switches.from_speed(row.get("speed_resolved") or asdict(cfg.speed), device_type="cuda")
        pred = predict_ms(cfg, row["mean_kc"], row["mean_kt"], row["num_pred_masks"], dev, real_loader, sw)
        got = row["phases_ms"]
        cells = " | ".join(f"{pred[p]:.1f} / {got[p]:.1f}" if p in got else f"{pred[p]:.1f} / -" for p in PHASES)
        lines.append(f"| {row['name']} | {cells} | {pred['total']:.1f} / {row['step_ms_median']:.1f} |")
    if not lines:
        return []
    head = [
        f"Step model ({dev.name}, assumed efficiencies) against the measured phase split, predicted / measured ms:",
        "",
        "| configuration | " + " | ".join(PHASES) + " | step |",
        "|---|" + "---|" * (len(PHASES) + 1),
    ]
    return head + lines
