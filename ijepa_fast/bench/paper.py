"""The paper's figures: its pretraining runs and their GPU-hours, the datasheet bf16 peaks of the
devices (for MFU), and the projection of a measured rate onto the paper's runs.

From the measured images/s per GPU, the GPU-hours of the paper's runs (ViT-H/14 300 epochs of
ImageNet-1k; ViT-H/16 at 448 px, 300 epochs), beside the paper's figure; a run of another model
is scaled by the FLOP ratio and says so.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ijepa_fast.bench.sources import default_config
from ijepa_fast.config import Config
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.flops import step_flops
from ijepa_fast.models.vit import grid_size

# Dense bf16 tensor-core peaks from the vendor's datasheets (TFLOP/s), matched in this order against
# torch.cuda.get_device_name(); the H100 rows differ by form factor. Used for MFU only.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class PaperRun:
    """A pretraining run of the paper, for the GPU-hours projection."""

    label: str
    model: str
    patch: int
    img: int
    epochs: int
    images: int = IMAGENET_TRAIN_IMAGES
    paper_gpu_hours: float | None = None
    paper_device: str = ""


PAPER_RUNS = (
    # The paper (Assran et al., CVPR 2023): 16 A100, under 72 hours, "less than 1200 GPU hours".
    PaperRun("ViT-H/14, 224 px, 300 ep IN-1k", "vit_huge", 14, 224, 300, paper_gpu_hours=1200.0, paper_device="A100"),
    # The authors' config in1k_vith16-448_ep300 (configs/); the paper states no GPU-hours for it.
    PaperRun("ViT-H/16, 448 px, 300 ep IN-1k", "vit_huge", 16, 448, 300),
)


def default_pred_depth(model: str) -> int:
    """Predictor depth as in the paper (Assran et al., CVPR 2023): 6 for ViT-B (and the smaller
    sizes), 12 for ViT-L/H, 16 for ViT-G."""
    return {"vit_large": 12, "vit_huge": 12, "vit_giant": 16}.get(model, 6)


def peak_bf16_tflops(name: str) -> float | None:
    """The datasheet dense bf16 peak for a CUDA device name, None when unknown (or a CPU)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def gpu_hours(images_per_s_per_gpu: float, epochs: float, images: int = IMAGENET_TRAIN_IMAGES) -> float:
    """GPU-hours of ``epochs`` passes over ``images`` at a per-GPU rate (perfect scaling assumed)."""
    if images_per_s_per_gpu <= 0:
        raise ValueError(f"images/s must be positive, got {images_per_s_per_gpu}")
    return epochs * images / images_per_s_per_gpu / 3600.0


def mean_mask_sizes(
    grid: int, batch: int = 128, batches: int = 4, seed: int = 0, **mask_kwargs
) -> tuple[int, float, float]:
    """(M, mean Kc, mean Kt) of the real sampler over ``batches`` batches."""
    sampler = MultiBlockMaskSampler(grid, seed=seed, **mask_kwargs)
    kc, kt, m = [], [], 4
    for s in range(batches):
        mb = sampler(batch, step=s)
        m, _, k = mb.targets.shape
        kc.append(mb.context.shape[1])
        kt.append(k)
    return m, statistics.fmean(kc), statistics.fmean(kt)


def project(rows: list[dict], cfg: Config, device_name: str) -> list[dict]:
    """GPU-hours of each ``PAPER_RUNS`` entry from the default configuration's images/s (or, when
    it did not run, the fastest configuration's).

    A run of the same model, patch and image size is ``measured``; otherwise images/s is scaled by
    the per-image FLOP ratio (same MFU assumed) and the row says so."""
    ok = [r for r in rows if r.get("ok")]
    if not ok:
        return []
    default = [r for r in ok if r["name"] == default_config().name]
    best = default[0] if default else max(ok, key=lambda r: r["images_per_s"])
    out = []
    model, patch, img = cfg.model.name, cfg.model.patch_size, cfg.data.crop_size
    for pr in PAPER_RUNS:
        if (pr.model, pr.patch, pr.img) == (model, patch, img):
            ips, basis = best["images_per_s"], f"measured ({best['name']}, batch {best['batch']})"
        else:
            m, kc, kt = mean_mask_sizes(grid_size(pr.img, pr.patch), batch=32, batches=2)
            target = step_flops(pr.model, pr.patch, pr.img, kc, kt, m, default_pred_depth(pr.model), 384).total
            ips = best["images_per_s"] * best["gflop_per_image"] * 1e9 / target
            basis = f"FLOP-scaled from {model}/{patch}@{img} ({best['name']})"
        out.append(
            {
                "run": pr.label,
                "device": device_name,
                "images_per_s_per_gpu": ips,
                "basis": basis,
                "gpu_hours": gpu_hours(ips, pr.epochs, pr.images),
                "paper_gpu_hours": pr.paper_gpu_hours,
                "paper_device": pr.paper_device,
                "paper_images_per_s_per_gpu": (
                    pr.epochs * pr.images / (pr.paper_gpu_hours * 3600.0) if pr.paper_gpu_hours else None
                ),
            }
        )
    return out
