"""The analytic FLOP count (ijepa_fast.models.flops) against torch.utils.flop_counter on small models.

FlopCounterMode counts matrix products and convolutions (and SDPA on CUDA, not the CPU's flash
kernel), so the models here use the ``math`` attention backend, whose Q K^T and A V are plain
matmuls; both sides then count the same operations and must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ijepa_fast.config import ModelConfig
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.flops import (
    attention_flops,
    encoder_forward_flops,
    predictor_forward_flops,
    step_flops,
    step_flops_for_masks,
)
from ijepa_fast.models.ijepa import build_models, compute_targets

TINY = ModelConfig(name="vit_tiny", patch_size=8, pred_depth=2, pred_emb_dim=96)
IMG, GRID, B = 64, 8, 2


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    student, target = build_models(TINY, IMG, attention="math")
    masks = MultiBlockMaskSampler(GRID, min_keep=4, seed=0)(B, step=3)
    return student, target, torch.randn(B, 3, IMG, IMG), masks


def test_encoder_forward_full_image_matches_the_counter(tiny):
    student, _, images, _ = tiny
    with torch.no_grad():
        got = counted(lambda: student.encoder(images))
    assert got == pytest.approx(B * encoder_forward_flops("vit_tiny", 8, IMG), rel=1e-9)


def test_encoder_forward_on_context_tokens_matches_the_counter(tiny):
    student, _, images, masks = tiny
    kc = masks.context.shape[1]
    with torch.no_grad():
        got = counted(lambda: student.encoder(images, masks.context))
    assert got == pytest.approx(B * encoder_forward_flops("vit_tiny", 8, IMG, tokens=kc), rel=1e-9)


def test_predictor_forward_matches_the_counter(tiny):
    student, _, images, masks = tiny
    m, _, kt = masks.targets.shape
    kc = masks.context.shape[1]
    with torch.no_grad():
        z = student.encoder(images, masks.context)
        got = counted(lambda: student.predictor(z, masks.context, masks.targets))
    assert got == pytest.approx(B * predictor_forward_flops(192, 96, 2, kc, kt, m), rel=1e-9)


def test_whole_step_forward_and_backward_matches_the_counter(tiny):
    """Target forward + student forward and backward: the backward = 2x forward rule (1x for the
    patch embedding, whose input needs no gradient) is what autograd does."""
    student, target, images, masks = tiny
    m, _, kt = masks.targets.shape
    kc = masks.context.shape[1]

    def step():
        feats = compute_targets(target, images, masks)
        student(images, masks.context, masks.targets, feats).backward()

    got = counted(step)
    want = B * step_flops("vit_tiny", 8, IMG, kc, kt, m, pred_depth=2, pred_emb_dim=96).total
    assert got == pytest.approx(want, rel=1e-9)
    assert step_flops_for_masks(TINY, IMG, [(m, kc, kt)]) == pytest.approx(want / B)


def test_an_encoder_of_fewer_blocks_than_its_size_matches_the_counter():
    shallow = ModelConfig(name="vit_tiny", depth=3, patch_size=8, pred_depth=2, pred_emb_dim=96)
    torch.manual_seed(0)
    student, target = build_models(shallow, IMG, attention="math")
    assert len(student.encoder.blocks) == len(target.blocks) == 3
    images = torch.randn(B, 3, IMG, IMG)
    masks = MultiBlockMaskSampler(GRID, min_keep=4, seed=0)(B, step=3)
    m, _, kt = masks.targets.shape
    kc = masks.context.shape[1]

    def step():
        feats = compute_targets(target, images, masks)
        student(images, masks.context, masks.targets, feats).backward()

    assert B * step_flops_for_masks(shallow, IMG, [(m, kc, kt)]) == pytest.approx(counted(step), rel=1e-9)


def test_attention_is_part_of_the_count():
    # 4 * T^2 * W per layer and sequence: doubling T quadruples it
    assert attention_flops(200, 64) == 4 * attention_flops(100, 64)
    with_attn = encoder_forward_flops("vit_tiny", 8, IMG)
    assert with_attn - encoder_forward_flops("vit_tiny", 8, IMG, tokens=64) == 0  # N = 64 here
    assert attention_flops(64, 192) * 12 < with_attn


def test_vit_h14_is_near_the_papers_650_gflop_per_image():
    """About 650 GFLOP per image (a published estimate) at Kc~72, Kt~43, M=4; ours counts 671 (3% above)."""
    f = step_flops("vit_huge", 14, 224, kc=72, kt=43, m=4, pred_depth=12, pred_emb_dim=384)
    assert f.total / 1e9 == pytest.approx(671, abs=1)
    assert f.total / 1e9 == pytest.approx(650, rel=0.05)
    assert f.target_fwd / 1e9 == pytest.approx(333, abs=1)
    assert f.context_bwd == pytest.approx(2 * f.context_fwd, rel=0.01)
    assert f.predictor_bwd == 2 * f.predictor_fwd


def test_empty_mask_list_is_an_error():
    with pytest.raises(ValueError, match="mask_shapes"):
        step_flops_for_masks(TINY, IMG, [])
