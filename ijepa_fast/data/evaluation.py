"""Frozen-feature evaluation data: centre-cropped, normalised images of a split, with undecodable
files replaced by the next decodable one and counted."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ijepa_fast.data.sources import Source, as_pil, load_with_substitutes, open_source
from ijepa_fast.data.transforms import EVAL_CROP_FRACTION, center_crop_eval

if TYPE_CHECKING:
    from ijepa_fast.config import DataConfig

log = logging.getLogger(__name__)


class EvalDataset(torch.utils.data.Dataset):
    """Centre-cropped normalised images for frozen-feature evaluation:
    ``ds[i] -> (image [3, S, S] float32, label int)``.

    An undecodable file is replaced by the next decodable one (as in pretraining) with a warning
    naming it; ``bad`` holds the ones this process met. ``replaced`` [N] bool marks the indices
    that were replaced; it lives in shared memory, so DataLoader workers' marks reach the main
    process (``replaced_count()``).
    """

    def __init__(self, source: Source, crop_size: int, limit: int = 0, crop_fraction: float = EVAL_CROP_FRACTION):
        self.source, self.crop_size, self.crop_fraction = source, int(crop_size), float(crop_fraction)
        self.n = min(len(source), limit) if limit else len(source)
        self.bad: set[str] = set()
        self.replaced = torch.zeros(self.n, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        _, img, label, bad = load_with_substitutes(self.source, self.n, i)
        if bad:
            self.replaced[i] = True
            if bad not in self.bad:
                self.bad.add(bad)
                log.warning("evaluation: undecodable image replaced by the next one: %s", bad)
        return center_crop_eval(as_pil(img), self.crop_size, self.crop_fraction), label

    def replaced_count(self) -> int:
        """How many of the images read so far (by any worker) were undecodable and replaced."""
        return int(self.replaced.sum())


def build_eval_dataset(
    cfg: DataConfig, split: str = "train", limit: int = 0, crop_fraction: float | None = None
) -> EvalDataset:
    """Centre-crop evaluation dataset of ``split`` (idx: train|test; folder: a sub-folder of root).

    ``crop_fraction`` defaults to 1.0 for IDX (the whole small image) and 0.875 for folders.
    Batch it with ``torch.utils.data.DataLoader(ds, batch_size=...)`` for [B, 3, S, S] images.
    """
    if crop_fraction is None:
        crop_fraction = 1.0 if cfg.dataset == "idx" else EVAL_CROP_FRACTION
    return EvalDataset(open_source(cfg, split), cfg.crop_size, limit, crop_fraction)
