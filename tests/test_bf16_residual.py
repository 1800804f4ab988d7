"""speed.bf16_residual: under bf16 autocast the residual stream stays bf16, and the function changes by
about as much as autocast itself changes it.

The reference is the fp32-stream path (the authors': fp32 pos_embed and mask_token promote the stream)
under the same autocast; the yardstick is autocast's own change, fp32-stream autocast against no
autocast at all (``profiling.bf16_residual``; its measurements are in profiling/RESULTS.md). The
bounds below are about twice the changes measured there.
"""

from __future__ import annotations

import pytest
import torch

from ijepa_fast.config import ModelConfig
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.ijepa import build_models
from profiling.bf16_residual import relative, step_outputs

TINY = ModelConfig(name="vit_tiny", depth=2, patch_size=7, pred_depth=2, pred_emb_dim=96)
IMG = 35  # a 5 x 5 grid


def test_the_stream_is_bf16_with_the_switch_and_fp32_without():
    _, target = build_models(TINY, IMG)
    seen = []
    target.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    target.norm.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    images = torch.randn(2, 3, IMG, IMG)
    for on in (False, True):
        target.set_bf16_residual(on)
        with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
            target(images)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    target.set_bf16_residual(True)  # without autocast nothing changes: the stream is fp32 either way
    with torch.no_grad():
        assert target(images).dtype == torch.float32


def test_targets_loss_and_gradients_against_the_fp32_stream_within_stated_tolerances():
    t32, _, g32 = step_outputs(residual=False, amp=False)
    t_ref, l_ref, g_ref = step_outputs(residual=False, amp=True)  # the authors' stream under autocast
    t_bf, l_bf, g_bf = step_outputs(residual=True, amp=True)
    own_t, own_g = relative(t_ref, t32), relative(g_ref, g32)  # autocast's own change
    d_t, d_g = relative(t_bf, t_ref), relative(g_bf, g_ref)
    assert 0 < d_t <= 0.015 and d_t <= 6 * own_t, (d_t, own_t)  # > 0: a change of function indeed
    assert abs(float(l_bf - l_ref)) <= 2e-3 * float(l_ref), (float(l_bf), float(l_ref))
    assert d_g <= 0.01 and d_g <= 2.5 * own_g, (d_g, own_g)


@pytest.mark.parametrize("fused", [True, False])
def test_the_gathers_keep_the_stream_dtype(fused):
    """pos_embed and mask_token in the tokens' dtype: the fused and the authors' gathers give bf16."""
    student, _ = build_models(TINY, IMG, fused_gather=fused)
    for m in (student.encoder, student.predictor):
        m.set_bf16_residual(True)
    seen = []
    student.predictor.predictor_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    student.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    masks = MultiBlockMaskSampler(5, min_keep=3, seed=0)(2, step=0)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        z = student.encoder(torch.randn(2, 3, IMG, IMG), masks.context)
        student.predictor(z, masks.context, masks.targets)
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_runs_train_with_the_bf16_stream_by_default_and_evaluation_reads_the_fp32_stream():
    """The default (the learning check in profiling/RESULTS.md) reaches all three networks; the
    authors' preset keeps the fp32 stream; an encoder rebuilt from a checkpoint for evaluation
    takes the fp32 stream whatever the run trained with."""
    from ijepa_fast import config
    from ijepa_fast.io.encoder import build_encoder_from_state_dict
    from ijepa_fast.models.ijepa import models_from_config

    small = ["model.name=vit_tiny", "model.depth=2", "model.patch_size=7", "model.pred_depth=1", "data.crop_size=28"]
    targets = {}
    for preset, on in (("fast", True), ("authors", False)):
        cfg = config.load(None, [*small, f"speed.preset={preset}"])
        student, targets[preset] = models_from_config(cfg, torch.device("cpu"), compile=False)
        assert [m.bf16_residual for m in (student.encoder, student.predictor, targets[preset])] == [on] * 3, preset
    encoder, _ = build_encoder_from_state_dict(targets["fast"].state_dict(), patch_size=7, img_size=28)
    assert encoder.bf16_residual is False
