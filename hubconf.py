"""torch.hub entry points of ijepa_fast: I-JEPA ViT encoders, with weights from any checkpoint it reads.

    import torch
    encoder = torch.hub.load("path/to/ijepa_fast", "ijepa_vith14", source="local",
                             weights="IN1K-vit.h.14-300e.pth.tar")  # the authors' checkpoint
    encoder = torch.hub.load("path/to/ijepa_fast", "ijepa_demo", source="local", weights="runs/demo-...")
    encoder = torch.hub.load("path/to/ijepa_fast", "ijepa_encoder", source="local", weights="export_hf/")
    tokens = encoder(images)  # [B, 3, H, W] -> [B, (H/p)(W/p), D], the final-LayerNorm patch tokens

``weights``: our checkpoint (a ``.pt`` file or a run folder), the authors' ``.pth.tar``, a
``.safetensors`` export or a Hugging Face IJepa folder; left out, the encoder is randomly
initialised. ``which="target"`` (the EMA encoder, default) or ``"context"``; ``trust=True`` allows
files holding arbitrary Python objects. Each entry fixes the architecture and refuses weights of
another one, naming the entry that fits; ``ijepa_encoder`` takes any. Images of another size than
the training size (a multiple of the patch) get interpolated position embeddings.

This file imports nothing at import time; the package is imported by the entry called.
"""

dependencies = ["torch", "numpy", "yaml", "safetensors"]


def _entry(name: str | None, doc: str):
    def load(weights=None, which: str = "target", trust: bool = False):
        from ijepa_fast.io.hub import hub_encoder

        return hub_encoder(name, weights, which=which, trust=trust)

    load.__name__ = load.__qualname__ = name or "ijepa_encoder"
    load.__doc__ = doc
    return load


ijepa_vitt16 = _entry("ijepa_vitt16", "ViT-T/16 encoder (width 192, 12 blocks, 3 heads), 224 px unless weights say.")
ijepa_vits16 = _entry("ijepa_vits16", "ViT-S/16 encoder (width 384, 12 blocks, 6 heads), 224 px unless weights say.")
ijepa_vitb16 = _entry("ijepa_vitb16", "ViT-B/16 encoder (width 768, 12 blocks, 12 heads), 224 px unless weights say.")
ijepa_vitl16 = _entry("ijepa_vitl16", "ViT-L/16 encoder (width 1024, 24 blocks, 16 heads), 224 px unless weights say.")
ijepa_vith14 = _entry("ijepa_vith14", "ViT-H/14 encoder (width 1280, 32 blocks, 16 heads), 224 px unless weights say.")
ijepa_vith16_448 = _entry(
    "ijepa_vith16_448", "ViT-H/16 encoder (width 1280, 32 blocks, 16 heads), 448 px unless weights say."
)
ijepa_vitg16 = _entry(
    "ijepa_vitg16", "ViT-G/16 encoder (width 1408, 40 blocks, 16 heads, MLP 48/11), 224 px unless weights say."
)
ijepa_demo = _entry("ijepa_demo", "The CPU demo's encoder: ViT-T/7 with 4 blocks, 28 px (configs/demo.yaml).")
ijepa_encoder = _entry(None, "Any encoder: the architecture read from weights=PATH (required).")
