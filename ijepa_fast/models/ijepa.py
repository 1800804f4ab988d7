"""The I-JEPA model: context encoder + predictor (trained) and target encoder (EMA, no gradients)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ijepa_fast import ops
from ijepa_fast.loss import jepa_loss
from ijepa_fast.masks import MaskBatch
from ijepa_fast.models.vit import VisionTransformer, build_encoder, build_predictor


class JEPAStudent(nn.Module):
    """The trained part (what the optimizer and a DeepSpeed engine see): encoder + predictor.

    forward(images [B,3,S,S], context [B,Kc], targets_idx [M,B,Kt], target_feats [M*B,Kt,D]) -> loss
    """

    def __init__(self, encoder: VisionTransformer, predictor: nn.Module, loss: str = "smooth_l1"):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.loss = loss

    def forward(
        self, images: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor, target_feats: torch.Tensor
    ) -> torch.Tensor:
        z = self.encoder(images, context_idx)  # (B, Kc, D)
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
        init_std=model_cfg.init_std,
        attention=attention,
        fused_gather=fused_gather,
    )
    predictor = build_predictor(
        encoder,
        depth=model_cfg.pred_depth,
        embed_dim=model_cfg.pred_emb_dim,
        init_std=model_cfg.init_std,
        attention=attention,
        fused_gather=fused_gather,
    )
    return JEPAStudent(encoder, predictor, loss), make_target_encoder(encoder)
