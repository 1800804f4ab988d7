"""timm's own vit_*_gap models, run in a separate process for ``tests/test_interop.py``.

    python tests/timm_worker.py EXPORT.safetensors IMAGES.pt OUT.pt

timm imports torchvision at the top of its data transforms and norm layers, and torchvision has no
build that imports beside the CPU torch wheel. The ViT itself uses none of it, so when torchvision
does not import, this process answers every ``torchvision`` import with an empty stand-in module
(in this process only) and uses timm's model code as installed. It writes to OUT.pt:

- ``features``: the model the export names (``timm_model``, a registered vit_*_gap model) built
  with the export's ``timm_kwargs``, the export loaded strictly, run on IMAGES [B, 3, S, S];
- ``vit_huge_shapes``: the parameter names and shapes of ``vit_huge_patch14_gap_224`` (the model the
  authors' ViT-H/14 checkpoints load into), built on the meta device;
- ``torchvision_stubbed``: whether the stand-in was needed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys
import types
from unittest import mock

import torch


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


def import_timm() -> tuple[types.ModuleType, bool]:
    try:
        import torchvision  # noqa: F401

        stubbed = False
    except Exception:  # missing, or built for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandInFinder())
        stubbed = True
    import timm

    return timm, stubbed


def main(export: str, images: str, out: str) -> None:
    from safetensors import safe_open

    timm, stubbed = import_timm()
    with safe_open(export, framework="pt") as fh:
        meta = fh.metadata()
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    model = timm.create_model(meta["timm_model"], pretrained=False, **json.loads(meta["timm_kwargs"])).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        features = model(torch.load(images, weights_only=True))
    with torch.device("meta"):
        huge = timm.create_model("vit_huge_patch14_gap_224", pretrained=False, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in huge.state_dict().items()}
    torch.save({"features": features, "vit_huge_shapes": shapes, "torchvision_stubbed": stubbed}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
