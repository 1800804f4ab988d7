"""The CPU pretraining loader: batches that are pure functions of (seed, step), resumable mid-epoch,
sharded per rank, tolerant of undecodable files (replaced, counted and named).

How a batch is made:

- ``StepBatchSampler`` (main process) yields, for each global step s from ``start_step`` on, this
  rank's list of ``(index, s, epoch)``. Epoch e shuffles the dataset with a permutation of
  (seed, e), keeps its first ``steps_per_epoch * batch * world`` entries (drop-last, whole optimizer
  steps of ``accum`` micro-batches, so every rank runs the same number of steps) and deals them to
  ranks (rank r takes every world-th entry), so across ranks every kept sample is seen exactly once
  per epoch. Optimizer step t takes entries [t * G, (t + 1) * G) of the epoch's permutation, G the
  global batch (batch x world x accum): a run resumed with another number of ranks and accumulation
  of the same global batch takes the same samples at every step. Starting at step s computes the
  epoch's permutation and slices it: nothing before s is decoded.
- ``PretrainDataset`` (worker) decodes item ``index``; when the file is undecodable it takes the
  next index (wrapping) until one decodes, and marks the sample as skipped with the file's path and
  error. The crop is drawn by ``rng.crop_rng(seed, epoch, index actually used)``. Image folders go
  through ``decode.random_resized_crop_bytes`` (the box drawn on the header's size, the JPEG decoded
  at the smallest DCT scale that covers it); IDX images are cropped in memory. The view stays uint8.
- ``Collate`` (worker) stacks the uint8 crops, normalises them (one vectorised op per batch; or
  leaves them uint8 with ``uint8=True``, for normalising on the device) and samples the masks with
  ``MultiBlockMaskSampler(grid, seed=mask_seed(seed, rank), **mask_kwargs)`` at the batch's step
  (rank 0 uses ``seed`` itself; every rank draws its own masks).

Nothing reads a worker's global RNG (nor the main process's: the DataLoader gets its own
generator), so a run resumed at step s sees exactly the batches s, s+1, ... of an uninterrupted
run, with any number of workers. The skip count travels inside each ``Batch`` (workers cannot share
a counter); ``PretrainLoader`` adds it up in ``skipped`` and keeps ``skipped_paths``, logging each
bad file once. Each skipped *sample* counts one (its own file is bad, whatever the substitute met on
the way), so over an epoch that uses every index, ``skipped`` grows by exactly the number of bad
files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ijepa_fast.data.decode import random_resized_crop_bytes
from ijepa_fast.data.sources import Source, as_pil, load_with_substitutes, open_source
from ijepa_fast.data.transforms import (
    normalize,
    pil_to_uint8,
    random_flip,
    random_resized_crop_pil,
)
from ijepa_fast.masks.sampler import MaskBatch, MultiBlockMaskSampler
from ijepa_fast.runtime.rng import crop_rng, mask_seed, mix

if TYPE_CHECKING:
    from ijepa_fast.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One step's data on one rank."""

    # [B, 3, S, S] float32, normalised with the ImageNet mean and std; with speed.uint8_input the
    # loader's [B, C, S, S] uint8 (C = 1 or 3), which data.device_feed normalises on the device
    images: torch.Tensor
    labels: torch.Tensor  # [B] int64 (class index; 0 for unlabelled folders)
    masks: MaskBatch  # context [B, Kc] int64, targets [M, B, Kt] int64, from (seed, step)
    step: int  # the global optimizer step this batch is for
    epoch: int
    skipped: int  # samples of this batch whose own file was undecodable (each replaced by the next)
    bad_paths: tuple[str, ...] = ()  # "path (ErrorType: message)" of those files

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader's pin-memory thread calls this)."""
        return dataclasses.replace(
            self,
            images=self.images.pin_memory(),
            labels=self.labels.pin_memory(),
            masks=MaskBatch(self.masks.context.pin_memory(), self.masks.targets.pin_memory()),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return dataclasses.replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
        )


# ----------------------------------------------------------------------------- pretraining


class PretrainDataset(torch.utils.data.Dataset):
    """``ds[(index, step, epoch)] -> (image [C, S, S] uint8, label, step, epoch, bad)``.

    C is 3 (folders) or 1 (IDX; ``Collate`` repeats it). ``bad`` is "" or "path (error)" when the
    item's own file was undecodable and the next index stood in for it. ``flip``: a left-right
    mirror with probability 1/2 after the crop (the authors' optional RandomHorizontalFlip).
    ``exact_pixels``: every view decoded at full scale and resampled by Pillow, the authors' pixels.
    """

    def __init__(
        self,
        source: Source,
        crop_size: int,
        crop_scale: tuple[float, float],
        seed: int,
        limit: int = 0,
        flip: bool = False,
        decoder: str | None = None,
        resample: str | None = None,
        exact_pixels: bool = False,
    ):
        self.source = source
        self.n = min(len(source), limit) if limit else len(source)
        self.crop_size, self.crop_scale, self.seed, self.flip = int(crop_size), tuple(crop_scale), int(seed), flip
        self.decoder = decoder  # the JPEG decoder (decode.random_resized_crop_bytes; None: the fastest installed)
        self.resample = "pillow" if exact_pixels else resample  # None: the fastest on this CPU
        self.reduce = not exact_pixels  # decode at a reduced DCT scale where the crop allows

    def __len__(self) -> int:
        return self.n

    def _view(self, i: int, epoch: int) -> tuple[torch.Tensor, int]:
        """Item i's pretraining view [C, S, S] uint8 and its label; raises when its file is bad."""
        rng = crop_rng(self.seed, epoch, i)
        read = getattr(self.source, "read_bytes", None)
        if read is not None:  # encoded files: crop drawn on the header, reduced-scale decode
            size, scale, name = self.crop_size, self.crop_scale, self.source.describe(i)
            options = dict(decoder=self.decoder, name=name, resample=self.resample, reduce=self.reduce)
            view = random_resized_crop_bytes(read(i), size, scale, rng, self.flip, **options)
            return view, int(self.source.labels[i])
        img, label = self.source[i]
        view = random_resized_crop_pil(as_pil(img), self.crop_size, self.crop_scale, rng)
        return pil_to_uint8(random_flip(view, rng) if self.flip else view), label

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int, int, str]:
        index, step, epoch = key
        _, view, label, bad = load_with_substitutes(self.source, self.n, index, lambda i: self._view(i, epoch))
        return view, label, step, epoch, bad


class Collate:
    """Samples of one step -> ``Batch``: stacked images, normalised (float32) or, with ``uint8``, left
    as [B, C, S, S] uint8 for the device to normalise (a quarter of the bytes to copy); and the step's
    masks."""

    def __init__(self, mask_sampler: MultiBlockMaskSampler, uint8: bool = False):
        self.mask_sampler = mask_sampler
        self.uint8 = uint8

    def __call__(self, items: list[tuple[torch.Tensor, int, int, int, str]]) -> Batch:
        images, labels, steps, epochs, bad = zip(*items)
        step, epoch = steps[0], epochs[0]
        bad_paths = tuple(b for b in bad if b)
        return Batch(
            images=torch.stack(images) if self.uint8 else normalize(torch.stack(images)),  # [B, C or 3, S, S]
            labels=torch.as_tensor(labels, dtype=torch.int64),
            masks=self.mask_sampler(len(images), step),
            step=step,
            epoch=epoch,
            skipped=len(bad_paths),
            bad_paths=bad_paths,
        )


class StepBatchSampler(torch.utils.data.Sampler):
    """Infinite: for each global step (micro-batch) from ``start_step``, this rank's
    ``[(index, step, epoch)]``.

    See the module docstring; ``steps_per_epoch = n // (batch_size * world_size * accum) * accum``
    micro-batches (``accum`` of them make one optimizer step).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        accum: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if start_step < 0 or accum < 1:
            raise ValueError(f"start_step={start_step} must be >= 0 and accum={accum} >= 1")
        self.steps_per_epoch = n // (batch_size * world_size * accum) * accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{n} images are fewer than one global batch ({batch_size} per rank x {world_size} "
                f"ranks x {accum} accumulation): lower data.batch_size or optim.grad_accum, or add images"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's dataset indices of ``epoch`` in step order: [steps_per_epoch * batch_size] int64."""
        g = torch.Generator().manual_seed(mix(self.seed, epoch) ^ 0x2545F491)
        used = self.steps_per_epoch * self.batch_size * self.world_size
        return torch.randperm(self.n, generator=g)[:used][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step, epoch, order = self.start_step, -1, []
        while True:
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_indices(e).tolist()
            yield [(idx, step, e) for idx in order[i * self.batch_size : (i + 1) * self.batch_size]]
            step += 1


class PretrainLoader:
    """Iterates ``Batch`` objects forever from ``start_step`` (the trainer stops it).

    ``steps_per_epoch``; ``skipped``: undecodable samples met so far by this process's iteration;
    ``skipped_paths``: the distinct "path (error)" strings, each logged once. Every ``iter()``
    starts again at ``start_step``; iterate one at a time. ``close()`` (or ``with``) stops the
    persistent workers.
    """

    def __init__(
        self,
        dataset: PretrainDataset,
        mask_sampler: MultiBlockMaskSampler,
        batch_sampler: StepBatchSampler,
        num_workers: int = 0,
        pin_memory: bool = False,
        uint8: bool = False,
    ):
        self.dataset, self.mask_sampler, self.batch_sampler = dataset, mask_sampler, batch_sampler
        self.steps_per_epoch = batch_sampler.steps_per_epoch
        self.batch_size, self.start_step = batch_sampler.batch_size, batch_sampler.start_step
        self.skipped = 0
        self.skipped_paths: set[str] = set()
        # The DataLoader draws its workers' base seed from this generator, not from the global RNG
        # (which a resumed run restores and must not see consumed by the loader).
        generator = torch.Generator().manual_seed(mix(dataset.seed, batch_sampler.rank))
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=Collate(mask_sampler, uint8),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            generator=generator,
        )

    @property
    def epoch_size(self) -> int:
        """Samples per epoch on this rank (``steps_per_epoch * batch_size``)."""
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._loader:
            self.skipped += batch.skipped
            for path in batch.bad_paths:
                if path not in self.skipped_paths:
                    self.skipped_paths.add(path)
                    log.warning("skipped an undecodable image (the next one stands in): %s", path)
            yield batch

    def close(self) -> None:
        """Shut the persistent workers down now (they would otherwise live as long as this loader)."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None

    def __enter__(self) -> PretrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_pretrain_loader(
    cfg: DataConfig,
    *,
    grid: int | tuple[int, int],
    mask_kwargs: dict,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    accum: int = 1,
    uint8: bool = False,
    flip: bool = False,
) -> PretrainLoader:
    """The CPU pretraining loader of a ``DataConfig``.

    ``grid``: the patch grid (``crop_size // patch_size``, or (H, W)); ``mask_kwargs``: the
    ``MultiBlockMaskSampler`` keywords other than ``seed``; ``accum``: micro-batches per optimizer
    step. Yields ``Batch`` with images [batch_size, 3, crop_size, crop_size] float32 (normalised;
    with ``uint8``: uint8, C = 1 for IDX) for (micro-batch) steps ``start_step``, ``start_step + 1``,
    ...; ``flip``: random left-right mirrors after the crop.
    ``pin_memory`` applies only when CUDA is available; ``num_workers > 0`` keeps its workers alive
    across epochs (the sampler never ends an epoch anyway).
    """
    dataset = PretrainDataset(
        open_source(cfg), cfg.crop_size, cfg.crop_scale, seed, cfg.limit, flip, exact_pixels=cfg.exact_pixels
    )
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed, rank, world_size, start_step, accum)
    masks = MultiBlockMaskSampler(grid, seed=mask_seed(seed, rank), **mask_kwargs)
    pin = cfg.pin_memory and torch.cuda.is_available()
    return PretrainLoader(dataset, masks, sampler, cfg.num_workers, pin, uint8=uint8)
