"""What the checkout's ``hubconf.py`` gives ``torch.hub``: one entry per encoder size this project
trains (``HUB_ENTRIES``), each a randomly initialised encoder, or one loaded from ``weights``: our
checkpoint (a ``.pt`` file or a run folder), the authors' ``.pth.tar``, a ``.safetensors`` export or
a Hugging Face IJepa folder, all read by ``load_encoder``.

The entry fixes the architecture (width, depth, heads, MLP ratio, patch); weights of another one are
refused, naming the entry that fits them (``ijepa_encoder`` takes any). The image size is the
weights' training size; the encoder runs other sizes too (its position embeddings are interpolated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ijepa_fast.io.encoder import WHICH_ALIASES, EncoderSpec
from ijepa_fast.io.load import load_encoder
from ijepa_fast.models.vit import VisionTransformer, build_encoder, vit_size


@dataclass(frozen=True)
class HubEntry:
    model: str  # a VIT_SIZES name
    patch_size: int
    img_size: int  # of a randomly initialised encoder; loaded weights bring their own
    depth: int = 0  # blocks, when fewer than the size's (0: the size's)
    preset: str = ""  # the packaged config that trains it, if any

    def describe(self) -> str:
        blocks = f", {self.depth} blocks" if self.depth else ""
        trained = f" (configs/{self.preset}.yaml)" if self.preset else ""
        return f"{self.model}/{self.patch_size} at {self.img_size} px{blocks}{trained}"

    def fits(self, spec: EncoderSpec) -> bool:
        size = vit_size(self.model)
        want = (size.embed_dim, self.depth or size.depth, size.num_heads, size.mlp_ratio, self.patch_size)
        return (spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio, spec.patch_size) == want


# The paper's encoders, and the sizes the packaged configs train (tests check each against its config).
HUB_ENTRIES: dict[str, HubEntry] = {
    "ijepa_vitt16": HubEntry("vit_tiny", 16, 224),
    "ijepa_vits16": HubEntry("vit_small", 16, 224, preset="vits16_in1k"),
    "ijepa_vitb16": HubEntry("vit_base", 16, 224, preset="vitb16_in1k"),
    "ijepa_vitl16": HubEntry("vit_large", 16, 224),
    "ijepa_vith14": HubEntry("vit_huge", 14, 224, preset="in1k_vith14_ep300"),
    "ijepa_vith16_448": HubEntry("vit_huge", 16, 448, preset="in1k_vith16-448_ep300"),
    "ijepa_vitg16": HubEntry("vit_giant", 16, 224, preset="in22k_vitg16_ep44"),
    "ijepa_demo": HubEntry("vit_tiny", 7, 28, depth=4, preset="demo"),
}


def hub_encoder(
    entry: str | None, weights: str | Path | None = None, which: str = "target", trust: bool = False
) -> VisionTransformer:
    """The encoder of ``HUB_ENTRIES[entry]`` (``entry=None``: whatever ``weights`` hold), in eval mode.

    ``weights``: a path ``load_encoder`` reads, or None for random initialisation. ``which``: target
    (the EMA encoder; default) or context. ``trust``: allow files holding arbitrary Python objects.
    """
    which = WHICH_ALIASES.get(which, which)
    if entry is None:
        if weights is None:
            raise ValueError("ijepa_encoder needs weights=PATH (its architecture is read from them)")
        return load_encoder(weights, which, trust=trust).encoder.eval()
    spec = HUB_ENTRIES[entry]
    if weights is None:
        return build_encoder(spec.model, spec.img_size, spec.patch_size, depth=spec.depth or None).eval()
    loaded = load_encoder(weights, which, trust=trust)
    if not spec.fits(loaded.spec):
        have = loaded.spec
        fitting = [name for name, e in HUB_ENTRIES.items() if e.fits(have)]
        hint = f"load it with {fitting[0]!r}" if fitting else "load it with 'ijepa_encoder'"
        raise ValueError(
            f"{weights} holds a {have.name or 'custom'} encoder (width {have.embed_dim}, depth {have.depth}, "
            f"{have.num_heads} heads, patch {have.patch_size}), not {entry}'s {spec.describe()}: {hint}"
        )
    return loaded.encoder.eval()
