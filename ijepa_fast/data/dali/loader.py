"""The DALI pretraining loader: the CPU loader's interface (``Batch``, ``steps_per_epoch``,
``start_step``, rank sharding, ``skipped``), with decoding, cropping, normalising and the masks on
the device the batch is for.

Image folders (the ImageNet layout) go through a step-keyed Python source, not DALI's file reader:
for global step s it takes exactly the CPU loader's samples (``StepBatchSampler``: the permutation
of (seed, epoch) dealt to ranks, the remainder of each epoch dropped, so every used sample once
per epoch across ranks), replaces undecodable files by the next good one as the CPU loader does,
and computes the CPU loader's crop window for each (``transforms.crop_box`` seeded by
(seed, epoch, index), on the size in the file's header). DALI then decodes only that window
(``fn.decoders.image_slice``, a ROI decode), resizes and normalises. So a DALI run sees the same
images, labels and crop windows at the same steps as a PyTorch-loader run, resumes mid-epoch
exactly, and the two loaders can be swapped on resume. Files are read by a thread pool a few steps
ahead; DALI prefetches ``prefetch`` batches. DALI's file reader would shuffle only within a buffer
(``initial_fill``) of a class-sorted list, and cannot start mid-epoch without its checkpoints.

Webdataset tars go through ``fn.readers.webdataset`` (sequential reads are the point of tars):
DALI shards (``shard_id=rank``, ``num_shards=world_size``: contiguous sample ranges), shuffles
within a buffer per epoch (it only mixes samples of the current epoch), and crops with
``fn.decoders.image_random_crop``. Every rank must run the same number of steps and no sample may
repeat within an epoch. The settings: the iterator's ``reader_name`` with ``LastBatchPolicy.DROP``
(every rank yields floor(smallest shard / batch) full batches per epoch, the CPU loader's
N // (world * batch), and drains the reader's last, partial batch), ``pad_last_batch=True`` (that
partial batch is completed with copies of the shard's last sample instead of the next epoch's
first samples, which would then be missing from the next epoch), ``stick_to_shard=True`` (a rank
keeps its shard, so its files stay in its page cache), and shards of *equal* size: we write the
index files ourselves and leave out the last N mod world samples. Without that last point DALI
(2.4) repeats samples: when N mod world != 0 and floor(N / world) is a multiple of the batch, the
reader pads the smaller shards with one more batch that the iterator does not drain, and it opens
the next epoch (measured: N=17, batch 4, 2 ranks -> 7 of 16 samples of epoch 1 are copies; the
test covers it). Resuming restarts the reader at an epoch start with a fresh shuffle; masks and
steps continue exactly.

Masks come from ``masks_device.DeviceMaskSampler`` on the images' device, keyed by the global step.

Undecodable files: see ``validate.py``. If DALI still fails on a folder batch (a file the header
check let through, a file changed after the check, or ``validate="off"``), the loader checks the
files of the batches DALI held, with PIL
and then with DALI's own decoder, marks the culprits bad, and rebuilds the pipeline at the first
batch not yet delivered; when no file is at fault the error is raised.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ijepa_fast.data.dali import pipeline as dp
from ijepa_fast.data.dali.folder_source import FolderSource
from ijepa_fast.data.dali.validate import check_image, validate_images
from ijepa_fast.data.dali.webdataset import prepare_webdataset
from ijepa_fast.data.errors import no_decodable_image
from ijepa_fast.data.folder import scan_folder
from ijepa_fast.data.loader import Batch
from ijepa_fast.data.sources import folder_root
from ijepa_fast.data.wds import webdataset_tars
from ijepa_fast.masks.device import DeviceMaskSampler
from ijepa_fast.runtime.rng import mask_seed, mix

log = logging.getLogger(__name__)

_MAX_RECOVERIES = 100  # pipeline rebuilds after decoder errors before giving up (each names its files)


class DaliPretrainLoader:
    """Iterates ``Batch`` objects forever from ``start_step`` (images [B, 3, S, S] in ``dtype``,
    labels [B] int64, masks, all on ``device``), as ``PretrainLoader``: ``steps_per_epoch``,
    ``epoch_size``, ``skipped`` (samples whose own file was undecodable), ``skipped_paths`` (each
    logged once), every ``iter()`` starts again at ``start_step``, ``close()`` or ``with``. Also
    ``excluded`` {path: reason} (found by validation or at run time) and ``recoveries``. Webdataset
    samples that validation left out of the index are counted with the first batch delivered
    (``Batch.skipped``), so the trainer's count and metrics include them.
    """

    def __init__(
        self,
        *,
        kind: str,
        build,
        steps_per_epoch: int,
        batch_size: int,
        masks: DeviceMaskSampler,
        device: torch.device,
        dtype: torch.dtype,
        start_step: int,
        source: FolderSource | None = None,
        decode_check=None,
        excluded: dict[str, str] | None = None,
        tmpdir=None,
    ):
        self.kind, self._build, self.steps_per_epoch = kind, build, steps_per_epoch
        self.batch_size, self.masks, self.device, self.dtype = batch_size, masks, device, dtype
        self.source, self._decode_check = source, decode_check
        self._tmpdir = tmpdir  # holds the webdataset index files when there is no cache folder
        self.excluded = dict(excluded or {})  # found undecodable (by validation or at run time)
        self.skipped = 0
        self.skipped_paths: set[str] = set()
        self.start_step = self.next_step = start_step
        self.recoveries = 0
        self._iter = None
        self._left_out: tuple[str, ...] = ()  # webdataset samples not in the index, not yet reported
        if kind == "webdataset" and self.excluded:
            self._left_out = tuple(sorted(f"{k} ({v})" for k, v in self.excluded.items()))
            self.skipped_paths = set(self._left_out)
            for path in self._left_out:
                log.warning("skipped an undecodable image: %s", path)

    @property
    def epoch_size(self) -> int:
        """Samples per epoch on this rank (``steps_per_epoch * batch_size``)."""
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        if self.next_step != self.start_step:
            self.next_step, self._iter = self.start_step, None
        while True:
            try:
                if self._iter is None:  # (the iterator decodes its first batch when it is built)
                    self._iter = self._build(self.next_step)
                out = next(self._iter)[0]
            except StopIteration:  # the webdataset reader's epoch ended (the iterator reset itself)
                continue
            except RuntimeError as err:
                if self.kind != "folder":
                    raise
                self._recover(err)
                continue
            yield self._batch(out)

    def _batch(self, out: dict) -> Batch:
        step = self.next_step
        self.next_step += 1
        images, labels = out["images"], out["labels"]
        if images.dtype != self.dtype:  # DALI has no bfloat16: fp32 -> bf16 here
            images = images.to(self.dtype)
        if self.kind == "folder":
            rec = self.source.records.pop(step)
            epoch, skipped, bad = rec.epoch, rec.skipped, rec.bad
            labels = labels.view(-1)
        else:  # each left-out sample counts once, with the first batch
            epoch, skipped, bad = step // self.steps_per_epoch, len(self._left_out), self._left_out
            self._left_out = ()
            labels = parse_ascii_labels(labels)
        self.skipped += skipped
        for path in bad:
            if path not in self.skipped_paths:
                self.skipped_paths.add(path)
                log.warning("skipped an undecodable image (the next one stands in): %s", path)
        # On the CPU the sampler's tiny ops gain nothing from intra-op threads, which only fight DALI's
        # for the cores (``python -m profiling.bench_choices`` times the sampler at 1 and 2 threads).
        if images.device.type == "cpu":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                masks = self.masks(images.shape[0], step, device=images.device)
            finally:
                torch.set_num_threads(threads)
        else:
            masks = self.masks(images.shape[0], step, device=images.device)
        return Batch(images=images, labels=labels, masks=masks, step=step, epoch=epoch, skipped=skipped, bad_paths=bad)

    def _recover(self, err: RuntimeError) -> None:
        """Find the files behind a DALI decoder error among the batches DALI held, mark them bad and
        rebuild the pipeline at the first undelivered step; re-raise when no file is at fault."""
        pending = sorted(s for s in self.source.records if s >= self.next_step)
        paths = list(dict.fromkeys(p for s in pending for p in self.source.records[s].paths))
        found = {p: r for p in paths if (r := check_image(p, "full"))}
        if not found and self._decode_check is not None:
            found = {p: r for p in paths if (r := self._decode_check(np.fromfile(p, dtype=np.uint8)))}
        self.recoveries += 1
        if not found or self.recoveries > _MAX_RECOVERIES:
            why = "no file of the pending batches is undecodable" if not found else "too many recoveries"
            raise RuntimeError(f"the DALI pipeline failed at step {self.next_step} and {why}") from err
        for p, reason in found.items():
            log.warning(
                "DALI could not decode %s (%s): excluded; rebuilding the pipeline at step %d", p, reason, self.next_step
            )
        self.source.bad.update(found)
        self.excluded.update(found)
        self._iter = None

    def close(self) -> None:
        """Release the DALI pipeline and the reader threads (a later ``iter()`` builds them again)."""
        self._iter = None
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> DaliPretrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_ascii_labels(cls: torch.Tensor) -> torch.Tensor:
    """[B, L] uint8 ASCII (a decimal integer, zero padded) -> [B] int64; -1 where there is no leading
    digit. Runs on the tensor's device, without a host sync."""
    d = cls.long() - ord("0")
    digit = ((d >= 0) & (d <= 9)).long().cumprod(1).bool()  # (B, L): the leading run of digits
    n = digit.sum(1, keepdim=True)
    power = (n - 1 - torch.arange(cls.shape[1], device=cls.device)).clamp(min=0)  # (B, L)
    value = (torch.where(digit, d, 0) * torch.pow(10, power)).sum(1)
    return torch.where(n[:, 0] > 0, value, -1)


def build_dali_loader(
    cfg,
    *,
    grid,
    mask_kwargs: dict,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    accum: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    validate: str = "header",
    cache: str | Path | None = None,
    prefetch: int = 2,
    threads: int | None = None,
    group=None,
    progress: bool = True,
) -> DaliPretrainLoader:
    """The DALI pretraining loader of a DataConfig (see the module docstring).

    ``device``: a CUDA device decodes on that GPU (``mixed``); None or CPU runs DALI's CPU mode.
    ``dtype``: float32, float16 (DALI emits it) or bfloat16 (cast after DALI). ``validate``:
    header|full|off (``validate.py``); ``cache``: the dataset's verdict file (``cache.cache_file``),
    None for none; ``group``: a gloo process group of the ranks, which then split the image check
    (None: this process checks every file); ``progress``: the check's progress bar on rank 0.
    ``threads``: DALI's worker threads and the file readers (default ``cfg.num_workers``).
    ``accum``: micro-batches per optimizer step (image folders: epochs of whole optimizer steps, as
    the CPU loader's; webdataset tars: DALI's reader sets the epochs).
    """
    dp.dali()  # the install hint, before any work
    device = torch.device("cpu" if device is None else device)
    device_id = (
        None if device.type != "cuda" else (device.index if device.index is not None else torch.cuda.current_device())
    )
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype} is not float32, float16 or bfloat16")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    threads = max(1, threads or cfg.num_workers or os.cpu_count() or 1)
    B, half = cfg.batch_size, dtype == torch.float16
    masks = DeviceMaskSampler(grid, seed=mask_seed(seed, rank), **mask_kwargs)
    tars = webdataset_tars(cfg)
    if tars:
        tmpdir = tempfile.TemporaryDirectory(prefix="ijepa-wds-idx-") if cache is None else None
        index_dir = tmpdir.name if tmpdir else Path(cache).with_suffix(".wds-index")
        tars, index_paths, n, bad = prepare_webdataset(
            tars,
            index_dir,
            mode=validate,
            cache=cache,
            workers=threads,
            limit=cfg.limit,
            multiple_of=world_size,
            group=group,
        )
        steps_per_epoch = n // (B * world_size)
        if steps_per_epoch < 1:
            raise ValueError(f"{n} images are fewer than one global batch ({B} x {world_size} ranks)")
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        def build(step: int):
            pipe_seed = mix(mix(seed, rank), step) & 0x7FFFFFFF  # a resumed run reshuffles
            pipe = dp.webdataset_pipeline(
                tars,
                index_paths,
                batch_size=B,
                threads=threads,
                device_id=device_id,
                prefetch=prefetch,
                seed=pipe_seed,
                crop_size=cfg.crop_size,
                crop_scale=tuple(cfg.crop_scale),
                half=half,
                shard_id=rank,
                num_shards=world_size,
                initial_fill=min(4096, max(B, n // world_size)),
            )
            return DALIGenericIterator(
                pipe,
                ["images", "labels"],
                reader_name=dp.READER_NAME,
                last_batch_policy=LastBatchPolicy.DROP,
                auto_reset=True,
            )

        log.info(
            "DALI loader (%s): %d webdataset samples in %d tars, %d steps per epoch",
            device,
            n,
            len(tars),
            steps_per_epoch,
        )
        return DaliPretrainLoader(
            kind="webdataset",
            build=build,
            steps_per_epoch=steps_per_epoch,
            batch_size=B,
            masks=masks,
            device=device,
            dtype=dtype,
            start_step=start_step,
            excluded=bad,
            tmpdir=tmpdir,
        )

    paths, labels, _ = scan_folder(os.path.abspath(folder_root(cfg)), as_str=True)  # absolute: cache keys
    n = min(len(paths), cfg.limit) if cfg.limit else len(paths)
    paths, labels = paths[:n], labels[:n]
    bad = validate_images(paths, mode=validate, cache=cache, workers=threads, group=group, progress=progress)
    if len(bad) == n:
        first = min(bad)
        raise no_decodable_image(folder_root(cfg), n, f"{first} ({bad[first]})")
    if bad:
        log.warning(
            "%d of %d images are undecodable: each is replaced by the next good one and counted in loader.skipped",
            len(bad),
            n,
        )
    source = FolderSource(
        paths,
        labels,
        bad,
        batch_size=B,
        seed=seed,
        rank=rank,
        world_size=world_size,
        crop_scale=tuple(cfg.crop_scale),
        threads=threads,
        accum=accum,
    )
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    def build(step: int):
        source.restart(step)
        pipe = dp.folder_pipeline(
            source,
            batch_size=B,
            threads=threads,
            device_id=device_id,
            prefetch=prefetch,
            seed=mix(mix(seed, rank), step) & 0x7FFFFFFF,
            crop_size=cfg.crop_size,
            half=half,
        )
        return DALIGenericIterator(pipe, ["images", "labels"])

    log.info("DALI loader (%s): %d images, %d steps per epoch", device, n, source.steps_per_epoch)
    return DaliPretrainLoader(
        kind="folder",
        build=build,
        steps_per_epoch=source.steps_per_epoch,
        batch_size=B,
        masks=masks,
        device=device,
        dtype=dtype,
        start_step=start_step,
        source=source,
        decode_check=dp.DecodeCheck(device_id),
        excluded=bad,
    )
