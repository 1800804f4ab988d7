"""The pretraining loader a run's ``data`` section asks for: DALI or the PyTorch one.

Both yield the same ``Batch`` (images, masks, step, epoch, skipped count) and restart at any step.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.runtime.optional import available, require

log = logging.getLogger(__name__)


def resolve_loader_kind(cfg, device: torch.device | str) -> str:
    """``"dali"`` or ``"pytorch"`` for ``cfg.loader`` (auto|dali|pytorch) on ``device``.

    ``auto`` takes DALI on a CUDA device when it is installed and the dataset is an image folder or
    webdataset tars; ``dali`` requested without DALI installed raises with the install command.
    """
    device = torch.device(device)
    if cfg.loader == "pytorch" or (cfg.exact_pixels and cfg.loader == "auto"):
        return "pytorch"
    if cfg.exact_pixels:
        raise ConfigError(
            "data.exact_pixels=true gives the authors' pixels through the PyTorch loader; DALI decodes and "
            "resizes with its own kernels: use data.loader=pytorch (or auto), or data.exact_pixels=false"
        )
    readable = cfg.dataset != "idx"
    if cfg.loader == "dali":
        if not readable:
            raise ConfigError(
                "data.loader='dali' reads image folders and webdataset tars, not IDX files: "
                "use data.loader=pytorch (or auto) with data.dataset=idx"
            )
        require("dali", "data.loader=dali")
        return "dali"
    return "dali" if device.type == "cuda" and readable and available("dali") else "pytorch"


def build_loader(cfg, grid: int | tuple[int, int], device: torch.device, rank: int, world_size: int, start_step: int):
    """The loader of a run ``Config`` on this rank, resuming at micro-batch ``start_step``."""
    kwargs = dict(
        grid=grid,
        mask_kwargs=asdict(cfg.mask),
        seed=cfg.run.seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        accum=cfg.optim.grad_accum,
    )
    # DALI decodes, crops and normalises on the GPU already: speed.uint8_input concerns the PyTorch loader.
    if resolve_loader_kind(cfg.data, device) == "dali":
        from ijepa_fast.data.dali.cache import cache_file
        from ijepa_fast.data.dali.loader import build_dali_loader
        from ijepa_fast.data.sources import folder_root
        from ijepa_fast.runtime.distributed import cpu_group

        # The image check's verdicts are cached per dataset (every later run on the data reuses them),
        # and the ranks split the check between them.
        log.info("data loader: DALI (%s)", "GPU decoding" if device.type == "cuda" else "CPU mode")
        return build_dali_loader(
            cfg.data,
            device=device if device.type == "cuda" else None,
            validate=cfg.data.image_check,
            cache=cache_file(folder_root(cfg.data), cfg.data.image_check_cache),
            group=cpu_group() if world_size > 1 else None,
            progress=cfg.run.progress,
            **kwargs,
        )
    from ijepa_fast.data.loader import build_pretrain_loader

    return build_pretrain_loader(cfg.data, uint8=cfg.speed.uint8_input, **kwargs)
