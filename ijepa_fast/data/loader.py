"""The CPU pretraining loader: crops and masks that are pure functions of (seed, step), resumable
mid-epoch, sharded per rank, tolerant of undecodable files (skipped and counted).

A batch sampler yields, for global step s, the list of ``(index, step, epoch)`` of that step's
images on this rank; the dataset decodes and crops each with a generator seeded from
(seed, epoch, index); the collate function samples the masks from (seed, step). Nothing depends on
worker RNG, so a run resumed at step s sees exactly the batches s, s+1, ... of an uninterrupted run.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ijepa_fast.data.folder import ImageFolderDataset
from ijepa_fast.data.idx import IdxDataset, find_idx_pair
from ijepa_fast.data.transforms import center_crop_eval, random_resized_crop
from ijepa_fast.masks import MaskBatch, MultiBlockMaskSampler, _mix

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] float32, normalised
    labels: torch.Tensor  # [B] int64
    masks: MaskBatch  # context [B, Kc], targets [M, B, Kt]
    step: int  # global optimizer step of this batch
    epoch: int
    skipped: int  # undecodable files replaced in this batch
    bad_paths: tuple[str, ...] = ()


def folder_root(cfg) -> Path:
    """``root/split`` when that sub-folder exists (ImageNet layout), else ``root`` itself."""
    root = Path(cfg.root)
    return root / cfg.split if cfg.split and (root / cfg.split).is_dir() else root


def check_data_source(cfg) -> None:
    """Raise before any model is built when the data source is missing or empty."""
    if not cfg.root:
        raise FileNotFoundError("data.root is empty: point it at IDX files or an image folder")
    if not Path(cfg.root).exists():
        raise FileNotFoundError(f"data.root={cfg.root} does not exist")
    if cfg.dataset == "idx":
        find_idx_pair(cfg.root, cfg.split or "train")
    else:
        from ijepa_fast.data.folder import scan_folder

        scan_folder(folder_root(cfg))


def open_source(cfg, split: str | None = None):
    """The raw dataset (IdxDataset or ImageFolderDataset) of ``cfg`` for ``split``."""
    if cfg.dataset == "idx":
        return IdxDataset(cfg.root, split or cfg.split or "train")
    if split is not None:
        from dataclasses import replace

        cfg = replace(cfg, split=split)
    return ImageFolderDataset(folder_root(cfg))


def _as_pil(item) -> Image.Image:
    return Image.fromarray(item).convert("RGB") if isinstance(item, np.ndarray) else item


class PretrainDataset(torch.utils.data.Dataset):
    """``ds[(index, step, epoch)] -> (image [3,S,S], label, skipped, bad path or "")``."""

    def __init__(self, source, crop_size: int, crop_scale: tuple[float, float], seed: int, limit: int = 0):
        self.source = source
        self.n = min(len(source), limit) if limit else len(source)
        self.crop_size, self.crop_scale, self.seed = crop_size, tuple(crop_scale), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int, int]):
        index, _, epoch = key
        bad = ""
        for tries in range(self.n):
            i = (index + tries) % self.n
            try:
                img, label = self.source[i]
            except (OSError, ValueError, SyntaxError) as err:  # undecodable: substitute the next one
                if not bad:
                    bad = f"{getattr(self.source, 'paths', ['?'] * self.n)[i]} ({type(err).__name__}: {err})"
                continue
            rng = random.Random(_mix(self.seed, epoch * 1_000_003 + i))
            return random_resized_crop(_as_pil(img), self.crop_size, self.crop_scale, rng), label, tries, bad
        raise RuntimeError(f"no image of the {self.n} in the data source could be decoded")


class StepBatchSampler(torch.utils.data.Sampler):
    """Infinite: for each global step from ``start_step``, this rank's ``(index, step, epoch)`` list.

    Epoch e uses the permutation of (seed, e); its first ``steps_per_epoch * batch * world`` entries
    are dealt to ranks (rank r takes every world-th), so every used sample is seen once per epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} images are fewer than one global batch ({batch_size} x {world_size} ranks)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch) ^ 0x2545F491)
        used = self.steps_per_epoch * self.batch_size * self.world_size
        return torch.randperm(self.n, generator=g)[:used][self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step, epoch, order = self.start_step, -1, None
        while True:
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_indices(e).tolist()
            yield [(idx, step, e) for idx in order[i * self.batch_size:(i + 1) * self.batch_size]]
            step += 1


def _collate(items, mask_sampler: MultiBlockMaskSampler, step: int, epoch: int) -> Batch:
    images, labels, skipped, bad = zip(*items)
    return Batch(torch.stack(images), torch.as_tensor(labels, dtype=torch.int64),
                 mask_sampler(len(images), step), step, epoch, int(sum(skipped)), tuple(b for b in bad if b))


class _KeyedDataset(torch.utils.data.Dataset):
    """Turns a list of keys into a collated Batch inside the worker (the batch sampler's unit)."""

    def __init__(self, dataset: PretrainDataset, mask_sampler: MultiBlockMaskSampler):
        self.dataset, self.mask_sampler = dataset, mask_sampler

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, keys: list[tuple[int, int, int]]) -> Batch:
        _, step, epoch = keys[0]
        return _collate([self.dataset[k] for k in keys], self.mask_sampler, step, epoch)


class PretrainLoader:
    """Iterates Batches forever from ``start_step``; counts skipped files in ``skipped`` and
    remembers them in ``skipped_paths`` (each logged once)."""

    def __init__(self, dataset: PretrainDataset, mask_sampler: MultiBlockMaskSampler, batch_sampler: StepBatchSampler,
                 num_workers: int, pin_memory: bool):
        self.steps_per_epoch = batch_sampler.steps_per_epoch
        self.skipped = 0
        self.skipped_paths: set[str] = set()
        # One batch per sampler item: the dataset collates a whole batch in the worker.
        self._loader = torch.utils.data.DataLoader(
            _KeyedDataset(dataset, mask_sampler), sampler=batch_sampler, batch_size=None, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=pin_memory and torch.cuda.is_available(),
            prefetch_factor=4 if num_workers > 0 else None)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._loader:
            self.skipped += batch.skipped
            for path in batch.bad_paths:
                if path not in self.skipped_paths:
                    self.skipped_paths.add(path)
                    log.warning("skipped an undecodable image: %s", path)
            yield batch


def build_pretrain_loader(cfg, *, grid, mask_kwargs: dict, seed: int, rank: int = 0, world_size: int = 1,
                          start_step: int = 0) -> PretrainLoader:
    """The pretraining loader of a DataConfig (see the module docstring)."""
    dataset = PretrainDataset(open_source(cfg), cfg.crop_size, cfg.crop_scale, seed, cfg.limit)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed, rank, world_size, start_step)
    return PretrainLoader(dataset, MultiBlockMaskSampler(grid, seed=seed, **mask_kwargs), sampler,
                          cfg.num_workers, cfg.pin_memory)


class EvalDataset(torch.utils.data.Dataset):
    """Centre-cropped normalised images for frozen-feature evaluation: ``ds[i] -> (image, label)``."""

    def __init__(self, source, crop_size: int, limit: int = 0):
        self.source, self.crop_size = source, crop_size
        self.n = min(len(source), limit) if limit else len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img, label = self.source[i]
        return center_crop_eval(_as_pil(img), self.crop_size), label


def build_eval_dataset(cfg, split: str = "train", limit: int = 0) -> EvalDataset:
    return EvalDataset(open_source(cfg, split), cfg.crop_size, limit)
