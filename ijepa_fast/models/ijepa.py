"""The I-JEPA model: context encoder + predictor (trained) and target encoder (EMA, no gradients)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from ijepa_fast.masks.sampler import MaskBatch
from ijepa_fast.models import fp8, ops
from ijepa_fast.models.attention import resolve_backend
from ijepa_fast.models.vit import VisionTransformer, build_encoder, build_predictor, compile_blocks, vit_size
from ijepa_fast.runtime.device import resolve_precision
from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.train.loss import jepa_loss

log = logging.getLogger(__name__)


class JEPAStudent(nn.Module):
    """The trained part (what the optimizer and a DeepSpeed engine see): encoder + predictor.

    forward(images [B,3,S,S], context [B,Kc], targets_idx [M,B,Kt], target_feats [M*B,Kt,D]) -> loss;
    ``mark`` (optional) is called with "context_fwd" and "predictor_fwd" as each part starts.
    """

    def __init__(self, encoder: VisionTransformer, predictor: nn.Module, loss: str = "smooth_l1"):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.loss = loss

    def forward(
        self,
        images: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        target_feats: torch.Tensor,
        mark: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        if mark is not None:
            mark("context_fwd")
        z = self.encoder(images, context_idx)  # (B, Kc, D)
        if mark is not None:
            mark("predictor_fwd")
        pred = self.predictor(z, context_idx, target_idx)  # (M*B, Kt, D)
        return jepa_loss(pred, target_feats, self.loss)


def make_target_encoder(encoder: VisionTransformer) -> VisionTransformer:
    """A deep copy of the encoder that never takes gradients (updated by EMA only)."""
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def compute_targets(
    target_encoder: VisionTransformer, images: torch.Tensor, masks: MaskBatch, fused: bool = True
) -> torch.Tensor:
    """Target features: the target encoder on the whole image, normalised, at the target indices.

    images [B,3,S,S], masks.targets [M,B,Kt] -> [M*B, Kt, D].
    """
    h = target_encoder(images)  # (B, N, D)
    return ops.normalized_targets(h, masks.targets, fused=fused)


def build_models(
    model_cfg, img_size: int, attention: str = "sdpa", fused_gather: bool = True, loss: str = "smooth_l1"
) -> tuple[JEPAStudent, VisionTransformer]:
    """(student, target_encoder) for a ``ModelConfig``; the target starts as a copy of the encoder."""
    encoder = build_encoder(
        model_cfg.name,
        img_size=img_size,
        patch_size=model_cfg.patch_size,
        depth=model_cfg.depth,
        init_std=model_cfg.init_std,
        depth_scaled_init=model_cfg.depth_scaled_init,
        attention=attention,
        fused_gather=fused_gather,
    )
    predictor = build_predictor(
        encoder,
        depth=model_cfg.pred_depth,
        embed_dim=model_cfg.pred_emb_dim,
        init_std=model_cfg.init_std,
        depth_scaled_init=model_cfg.depth_scaled_init,
        attention=attention,
        fused_gather=fused_gather,
    )
    return JEPAStudent(encoder, predictor, loss), make_target_encoder(encoder)


def compile_wanted(mode: str, device: torch.device) -> bool:
    """``speed.compile``: ``on``, or ``auto`` on a CUDA device."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def models_from_config(cfg, device: torch.device, compile: bool | None = None) -> tuple[JEPAStudent, VisionTransformer]:
    """(student, target encoder) of a run ``Config`` on ``device``, with its attention backend,
    activation checkpointing, residual-stream dtype and compile switches (``cfg.speed``) applied; ``compile`` (when not
    None) overrides ``speed.compile``."""
    size = vit_size(cfg.model.name)
    attn_dtype = resolve_precision(device, cfg.run.dtype).autocast_dtype or torch.float32  # what q, k, v arrive in
    enc_backend = resolve_backend(cfg.speed.attention, device, size.embed_dim // size.num_heads, attn_dtype)
    pred_backend = resolve_backend(cfg.speed.attention, device, cfg.model.pred_emb_dim // size.num_heads, attn_dtype)
    student, target = build_models(
        cfg.model, cfg.data.crop_size, attention=enc_backend, fused_gather=cfg.speed.fused_gather, loss=cfg.optim.loss
    )
    student.predictor.set_attention_backend(pred_backend)
    for module in (student.encoder, student.predictor):
        module.activation_checkpointing = cfg.speed.activation_checkpointing
    for module in (student.encoder, student.predictor, target):
        module.set_bf16_residual(cfg.speed.bf16_residual)
    student.to(device)
    target.to(device)
    if cfg.speed.fp8_target != "off":
        _float8_target(target, cfg.speed.fp8_target, device)
    if compile_wanted(cfg.speed.compile, device) if compile is None else compile:
        compile_blocks(student, cfg.speed.fused_epilogue)
        compile_blocks(target, cfg.speed.fused_epilogue)
    log.info(
        "model %s/%d at %d px: encoder %.1fM params, predictor %.1fM; attention %s (encoder) / %s (predictor); "
        "device %s",
        cfg.model.name,
        cfg.model.patch_size,
        cfg.data.crop_size,
        _millions(student.encoder),
        _millions(student.predictor),
        enc_backend,
        pred_backend,
        device,
    )
    return student, target


def _float8_target(target: VisionTransformer, recipe: str, device: torch.device) -> None:
    """``speed.fp8_target``: the target's block linears in float8; emulated on a CPU (for tests: slow)."""
    if device.type == "cuda" and not fp8.float8_tensor_cores(device):
        raise ConfigError(
            f"speed.fp8_target={recipe} needs float8 tensor cores (compute capability >= 8.9: H100, L4, ...); "
            f"{torch.cuda.get_device_name(device)} has none: set speed.fp8_target=off"
        )
    emulate = device.type != "cuda"
    if emulate:
        log.warning("speed.fp8_target=%s on %s: torchao's float8 emulation (fp32 matmuls), for testing", recipe, device)
    fp8.quantize_target_linears(target, recipe, emulate)


def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
