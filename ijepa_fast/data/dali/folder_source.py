"""The DALI loader's source for image folders: for global step s it takes exactly the CPU loader's
samples (``StepBatchSampler``), replaces undecodable files by the next good one as the CPU loader does,
computes the CPU loader's crop window of each (``transforms.crop_box``, on the size in the file's
header), and reads the files on a thread pool a few steps ahead; ``loader`` explains why."""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ijepa_fast.data.dali import pipeline as dp
from ijepa_fast.data.dali.validate import describe
from ijepa_fast.data.loader import StepBatchSampler
from ijepa_fast.data.transforms import crop_box
from ijepa_fast.runtime.rng import crop_rng

_READ_AHEAD = 2  # steps read beyond the one DALI asks for (DALI itself asks `prefetch` steps ahead)


@dataclass
class _StepRecord:
    """What the source handed DALI for one step (kept until the batch is delivered)."""

    epoch: int
    skipped: int
    bad: tuple[str, ...]
    paths: list[str] = field(default_factory=list)


class FolderSource:
    """DALI external source: ``source(batch_info)`` -> (encoded files, crop anchors [B, 2],
    crop shapes [B, 2], labels [B]) of global step ``base_step + batch_info.iteration``."""

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        bad: dict[str, str],
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        crop_scale: tuple[float, float],
        threads: int,
        accum: int = 1,
    ):
        self.paths, self.labels, self.n = paths, labels, len(paths)
        self.bad = dict(bad)  # path -> reason; grows when a file fails at run time
        self.sampler = StepBatchSampler(self.n, batch_size, seed, rank, world_size, accum=accum)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.seed, self.crop_scale = seed, tuple(crop_scale)
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None  # file readers, started on first use
        self.base_step = 0
        self.records: dict[int, _StepRecord] = {}
        self._reads: dict[int, list[tuple[int, Future]]] = {}  # step -> (index, read) per sample
        self._order: tuple[int, list[int]] = (-1, [])

    def restart(self, step: int) -> None:
        """The next call with iteration 0 is step ``step``; forget what was planned after it."""
        self.base_step = step
        for s in [s for s in self._reads if s >= step]:
            for _, f in self._reads.pop(s):
                f.cancel()
        self.records = {s: r for s, r in self.records.items() if s < step}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._reads = None, {}

    def indices(self, step: int) -> tuple[int, list[int]]:
        """(epoch, dataset indices) of ``step`` on this rank: the CPU loader's ``StepBatchSampler``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, self.sampler.epoch_indices(epoch).tolist())
        b = self.sampler.batch_size
        return epoch, self._order[1][i * b : (i + 1) * b]

    def _good_from(self, i: int) -> tuple[int, int]:
        """(first index at or after i, cyclically, not known to be bad; how many bad ones it passed)."""
        for tries in range(self.n):
            j = (i + tries) % self.n
            if self.paths[j] not in self.bad:
                return j, tries
        raise RuntimeError(f"no image of the {self.n} in the data source could be decoded")

    @staticmethod
    def _read(path: str) -> tuple[np.ndarray, tuple[int, int]]:
        data = np.fromfile(path, dtype=np.uint8)
        with Image.open(io.BytesIO(data)) as img:  # header only: the size for the crop window
            return data, img.size

    def _submit(self, step: int) -> None:
        if step not in self._reads:
            _, idx = self.indices(step)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-read")
            self._reads[step] = [
                (j, self._pool.submit(self._read, self.paths[j])) for j in (self._good_from(i)[0] for i in idx)
            ]

    def _take(self, i: int, planned: tuple[int, Future]) -> tuple[np.ndarray, tuple[int, int], int, int]:
        """(encoded file, its (w, h), index used, bad files passed) for dataset index ``i``: the file
        read ahead, unless it failed or files found bad since changed which one is due."""
        j, tries = self._good_from(i)
        result = None
        if planned[0] == j:
            try:
                result = planned[1].result()
            except Exception as err:  # unreadable since validation: bad from now on
                self.bad[self.paths[j]] = describe(err)
        while result is None:  # rare: read the next good file here
            j, tries = self._good_from(i)
            try:
                result = self._read(self.paths[j])
            except Exception as err:
                self.bad[self.paths[j]] = describe(err)
        return result[0], result[1], j, tries

    def __call__(self, info) -> tuple:
        step = self.base_step + info.iteration
        for s in range(step, step + _READ_AHEAD + 1):
            self._submit(s)
        planned = self._reads.pop(step)
        epoch, idx = self.indices(step)
        data, anchors, shapes, labels = [], [], [], []
        record = _StepRecord(epoch, 0, ())
        bad: list[str] = []
        for i, plan in zip(idx, planned):
            encoded, (w, h), j, tries = self._take(i, plan)
            if tries:  # as the CPU loader: a sample whose own file is bad counts one, and names it
                bad.append(f"{self.paths[i]} ({self.bad.get(self.paths[i], 'undecodable')})")
            rng = crop_rng(self.seed, epoch, j)  # the CPU loader's crop stream
            left, top, cw, ch = crop_box(w, h, self.crop_scale, dp.RATIO, rng)
            data.append(encoded)
            anchors.append((left, top))
            shapes.append((cw, ch))
            labels.append(self.labels[j])
            record.paths.append(self.paths[j])
        record.bad, record.skipped = tuple(bad), len(bad)
        self.records[step] = record
        return (
            data,
            np.asarray(anchors, dtype=np.int32),
            np.asarray(shapes, dtype=np.int32),
            np.asarray(labels, dtype=np.int64),
        )


# ---------------------------------------------------------------------------------------------- loader
