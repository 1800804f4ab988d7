"""Optimisation switches: every combination runs, the authors' preset computes the same
loss, compiled blocks agree with eager ones."""

from __future__ import annotations

import itertools

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.engines import build_train_step
from ijepa_fast.masks import MultiBlockMaskSampler
from ijepa_fast.models.vit import VisionTransformer, compile_blocks

TINY = [
    "model.name=vit_tiny",
    "model.patch_size=8",
    "model.pred_depth=1",
    "model.pred_emb_dim=48",
    "data.crop_size=32",
    "mask.min_keep=2",
    "run.device=cpu",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
]


def batch(B=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, 32, 32, generator=g), MultiBlockMaskSampler(4, min_keep=2, seed=0)(B, step=0)


def losses(overrides, steps=3):
    torch.manual_seed(0)
    step = build_train_step(config_mod.load(None, TINY + overrides), torch.device("cpu"), steps_per_epoch=10)
    images, masks = batch()
    return torch.stack([step(images, masks, i)["loss"] for i in range(steps)])


def test_authors_preset_gives_the_default_loss():
    torch.testing.assert_close(losses(["speed.preset=authors"]), losses([]), rtol=1e-5, atol=1e-6)


SWITCHES = [
    "speed.fused_ema",
    "speed.fused_gather",
    "speed.fused_optimizer",
    "speed.grad_scaler",
    "speed.sync_every_step",
]


@pytest.mark.parametrize("values", list(itertools.product([False, True], repeat=len(SWITCHES)))[::3])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_switch_combinations_run_a_step(values, attention):
    overrides = [f"{k}={v}" for k, v in zip(SWITCHES, values)] + [f"speed.attention={attention}"]
    out = losses(overrides, steps=1)
    assert torch.isfinite(out).all()


def test_activation_checkpointing_gives_the_same_losses():
    torch.testing.assert_close(losses(["speed.activation_checkpointing=true"]), losses([]), rtol=1e-6, atol=1e-7)


def test_compiled_blocks_agree_with_eager():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    images = torch.randn(2, 3, 32, 32)
    ref = enc(images)
    weight = torch.randn_like(ref)  # (a sum of squares of LayerNorm outputs would be constant: zero gradient)
    ref_grads = torch.autograd.grad((ref * weight).sum(), [p for p in enc.parameters() if p.requires_grad])
    compile_blocks(enc)
    out = enc(images)
    grads = torch.autograd.grad((out * weight).sum(), [p for p in enc.parameters() if p.requires_grad])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())  # fp32 reassociation
