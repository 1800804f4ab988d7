"""The NVIDIA DALI pretraining loader: decode only the crop, normalise and sample the masks on the
GPU (``mixed`` decoding), or in DALI's CPU mode; same interface as ``ijepa_fast.data.loader``.

Importing this package does not import DALI; building a loader does (``ijepa_fast.runtime.optional``).

    loader = build_dali_loader(cfg.data, grid=..., mask_kwargs=..., seed=..., rank=..., world_size=...,
                               start_step=..., device=device, cache=run_dir / "data_check.json")

See ``loader.py`` for the design (step-keyed folder source, webdataset sharding settings),
``validate.py`` for undecodable files and ``pipeline.py`` for the DALI graphs.
"""

from ijepa_fast.data.dali.loader import (
    DaliPretrainLoader,
    build_dali_loader,
    parse_ascii_labels,
    webdataset_tars,
)
from ijepa_fast.data.dali.validate import check_image, validate_images

__all__ = [
    "DaliPretrainLoader",
    "build_dali_loader",
    "check_image",
    "parse_ascii_labels",
    "validate_images",
    "webdataset_tars",
]
