"""The NVIDIA DALI pretraining loader: decode only the crop, normalise and sample the masks on the
GPU (``mixed`` decoding), or in DALI's CPU mode; same interface as ``ijepa_fast.data.loader``.

Importing this package does not import DALI; building a loader does (``ijepa_fast.runtime.optional``).

    loader = build_dali_loader(cfg.data, grid=..., mask_kwargs=..., seed=..., rank=..., world_size=...,
                               start_step=..., device=device, cache=cache_file(cfg.data.root))

See ``loader.py`` for the design (step-keyed folder source, webdataset sharding settings),
``validate.py`` for undecodable files, ``cache.py`` for where their verdicts are kept, and
``pipeline.py`` for the DALI graphs.
"""

from ijepa_fast.data.dali.loader import (
    DaliPretrainLoader,
    build_dali_loader,
    parse_ascii_labels,
)
from ijepa_fast.data.dali.validate import check_image, validate_images
from ijepa_fast.data.wds import webdataset_tars

__all__ = [
    "DaliPretrainLoader",
    "build_dali_loader",
    "check_image",
    "parse_ascii_labels",
    "validate_images",
    "webdataset_tars",
]
