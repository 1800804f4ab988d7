"""What ``speed.bf16_residual`` changes: targets, loss and the student's gradients with the bf16
residual stream against the fp32 stream (the authors'), both under bf16 autocast, beside autocast's
own change (the fp32 stream under autocast against no autocast). One forward and backward of a small
I-JEPA on random images, weights moved off their initial values, per seed.

Run from the repository root: ``python -m profiling.bf16_residual --depth 4 --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import json

import torch

from ijepa_fast.config import ModelConfig
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.ijepa import build_models, compute_targets

IMG = 35  # a 5 x 5 grid of 7-pixel patches: odd token counts


def step_outputs(
    residual: bool, amp: bool, seed: int = 0, depth: int = 2, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [M*B, Kt, D] as float32, loss, the student's gradients flattened) of one step."""
    model = ModelConfig(name="vit_tiny", depth=depth, patch_size=7, pred_depth=2, pred_emb_dim=96)
    torch.manual_seed(0)
    student, target = build_models(model, IMG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the initial zero biases and unit norms; target = encoder
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for t, s in zip(target.parameters(), student.encoder.parameters()):
            t.copy_(s)
    for module in (student.encoder, student.predictor, target):
        module.set_bf16_residual(residual)
    images = torch.randn(batch, 3, IMG, IMG, generator=g)
    masks = MultiBlockMaskSampler(IMG // 7, min_keep=3, seed=seed)(batch, step=0)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        targets = compute_targets(target, images, masks)
        loss = student(images, masks.context, masks.targets, targets)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return targets.float(), loss.detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def compare(seed: int, depth: int) -> dict:
    """The relative changes of one seed: bf16 stream against the fp32 stream, and autocast's own."""
    t32, l32, g32 = step_outputs(False, False, seed, depth)
    t_ref, l_ref, g_ref = step_outputs(False, True, seed, depth)
    t_bf, l_bf, g_bf = step_outputs(True, True, seed, depth)
    return {
        "seed": seed,
        "targets_bf16_stream": relative(t_bf, t_ref),
        "targets_autocast": relative(t_ref, t32),
        "loss_bf16_stream": abs(float(l_bf - l_ref)) / float(l_ref),
        "loss_autocast": abs(float(l_ref - l32)) / float(l32),
        "grads_bf16_stream": relative(g_bf, g_ref),
        "grads_autocast": relative(g_ref, g32),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="encoder blocks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    for seed in args.seeds:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in compare(seed, args.depth).items()}))


if __name__ == "__main__":
    main()
