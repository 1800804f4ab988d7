"""The FSDP2 engine's checkpoints: ``torch.distributed.checkpoint`` (DCP) folders, saved asynchronously
and loaded on any number of ranks, plus the consolidated copy ``ijepa-eval`` reads.

``RUN/fsdp2/step_XXXXXXXX/`` holds DCP's files (each rank's shards of the student, the target encoder
and AdamW's state; ``.metadata``, which DCP writes last, by renaming a temporary file) and one small
``ijepa_rankN.pt`` per rank (the trainer's metadata and that rank's RNG). A folder without
``.metadata`` is an unfinished save: never loaded, deleted at the next start.

Saving (``Saver``): every rank stages a copy of its shards in host memory and returns to training;
a background thread writes the files (``dcp.async_save``, over a gloo group of its own, so its
collectives never interleave with the training's), then rank 0 writes the consolidated fp32 copy
into ``RUN/checkpoints/`` (``ijepa_fast.io.checkpoint``'s format, gathered while staging) and keeps
the newest ``keep`` of each. A save waits for the previous one; ``Saver.wait`` waits for the last.
A process killed while the thread writes leaves the step's folder without ``.metadata``, so the
previous checkpoint stays the latest.

Loading (``load``): DCP reads each rank's rows of every tensor from whatever shards hold them, so a
checkpoint written by N ranks loads on M; a rank without its own file takes the RNG of rank
``rank % N``. Every file is read weights-only (``safe_load``).
"""

from __future__ import annotations

import logging
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ijepa_fast.engines.fsdp2 import safe_load
from ijepa_fast.engines.fsdp2.safe_load import METADATA, read_metadata_file
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.runtime import distributed as dist_

log = logging.getLogger(__name__)

FOLDER = "fsdp2"
FSDP2 = "fsdp2"  # the engine's name, in every file it writes
_TAG = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = re.compile(r"^ijepa_rank(\d+)\.pt$")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"ijepa_rank{rank}.pt"


def _tags(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _TAG.match(p.name)) and p.is_dir())


def complete_steps(folder: Path) -> list[int]:
    """Steps whose DCP save finished (``.metadata`` written), oldest first."""
    return [step for step, path in _tags(folder) if (path / METADATA).is_file()]


def latest_step(folder: Path) -> int | None:
    steps = complete_steps(folder)
    return steps[-1] if steps else None


def saved_ranks(folder: Path, step: int | None = None) -> int | None:
    """The number of ranks that wrote ``step`` (default: the latest complete one); None: none."""
    step = latest_step(folder) if step is None else step
    if step is None:
        return None
    return sum(1 for p in (Path(folder) / tag(step)).iterdir() if _RANK_FILE.match(p.name))


def remove_partial(folder: Path) -> list[Path]:
    """Delete the step folders of unfinished saves (no ``.metadata``); return them. Only while no
    other process writes there (the trainer holds the run folder's lock)."""
    partial = [path for _, path in _tags(folder) if not (path / METADATA).is_file()]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def _prune(folder: Path, step: int, keep: int) -> None:
    """Delete complete step folders older than the newest ``keep`` up to ``step`` (newer ones, from an
    interrupted save that never finished, are neither counted nor deleted here)."""
    for old in [s for s in complete_steps(folder) if s <= step][:-keep]:
        shutil.rmtree(Path(folder) / tag(old), ignore_errors=True)


# ---------------------------------------------------------------------------------------- state


def sharded_state(engine) -> dict:
    """Collective on first use (AdamW's state is created if empty): the DTensor state dicts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "student": get_model_state_dict(engine.student),
        "target_encoder": get_model_state_dict(engine.target_encoder),
        "optim": get_optimizer_state_dict(engine.student, engine.optimizer),
    }


def consolidated_state(engine) -> dict | None:
    """Collective: fp32 ``encoder``, ``predictor`` and ``target_encoder`` state dicts (full tensors,
    private copies) on rank 0; None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(engine.student, options=options)
    target = get_model_state_dict(engine.target_encoder, options=options)
    if dist_.get_rank() != 0:
        return None

    def part(prefix: str) -> dict:  # a copy: in a world of one a "full" tensor may be the shard itself
        return {k[len(prefix) :]: v.detach().clone() for k, v in student.items() if k.startswith(prefix)}

    return {
        "encoder": part("encoder."),
        "predictor": part("predictor."),
        "target_encoder": {k: v.detach().clone() for k, v in target.items()},
    }


def _writer(tag_dir: Path):
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(tag_dir))


class Saver:
    """One asynchronous save at a time (module docstring); every rank calls ``save`` and ``wait``."""

    def __init__(self):
        # DCP's background collectives need a CPU backend, and must not share a queue with the
        # training's (NCCL on GPUs): a gloo group of their own, created now, by every rank at once.
        # It takes the job's collective timeout (runtime.distributed.init sets every group's default).
        self.group = torch.distributed.new_group(backend="gloo")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsdp2-checkpoint")
        self._pending: Future | None = None

    def save(self, engine, run_dir: Path, step: int, meta: dict, keep: int) -> Path | None:
        from torch.distributed.checkpoint import async_save

        self.wait()
        folder, rank, world = run_dir / FOLDER, dist_.get_rank(), dist_.get_world_size()
        tag_dir = folder / tag(step)
        tag_dir.mkdir(parents=True, exist_ok=True)
        full = consolidated_state(engine)  # collective: gathered now, written by rank 0 after the shards
        rng = ckpt.rng_state()
        own = {**meta, "step": step, "rank": rank, "world_size": world, "engine": FSDP2, "rng": rng}
        ckpt.atomic_torch_save(own, rank_file(tag_dir, rank))
        # Returns once the shards are staged (copied to host memory); the writing goes on in a thread.
        response = async_save(sharded_state(engine), storage_writer=_writer(tag_dir), process_group=self.group)
        upload = getattr(response, "upload_completion", response)
        export = None
        if full is not None:
            export = {**meta, **full, "opt": {}, "rng": rng, "world_size": world, "engine": FSDP2}
        self._pending = self._executor.submit(self._finish, upload, run_dir, step, keep, export)
        return run_dir / "checkpoints" / ckpt.checkpoint_name(step) if full is not None else None

    @staticmethod
    def _finish(upload: Future, run_dir: Path, step: int, keep: int, export: dict | None) -> Path | None:
        """In the background: wait for DCP's files, then (rank 0) the consolidated copy and retention."""
        upload.result()
        if export is None:
            return None
        _prune(run_dir / FOLDER, step, keep)
        return ckpt.save_checkpoint(run_dir / "checkpoints", export, step, keep)

    def wait(self) -> Path | None:
        """Wait for the save under way (if any); raise the error it ended with."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None


# ---------------------------------------------------------------------------------------- loading


def load(engine, run_dir: Path, check=None) -> dict | None:
    """Collective: restore the newest complete checkpoint in ``run_dir/fsdp2`` into ``engine``, on any
    number of ranks. ``check(meta)`` may refuse it before anything is applied. Returns the metadata
    (with ``step``) or None when there is no checkpoint."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(run_dir) / FOLDER
    step = latest_step(folder)
    if step is None:
        return None
    tag_dir, rank = folder / tag(step), dist_.get_rank()
    saved = saved_ranks(folder, step)
    if not saved:
        raise FileNotFoundError(f"{tag_dir} holds no ijepa_rank*.pt file: it was not written by this package")
    own = ckpt.load_file(rank_file(tag_dir, rank % saved), override=None)
    # DCP wraps a reader's error in its own; read .metadata once here to refuse a payload by name
    read_metadata_file(tag_dir / METADATA)
    if check is not None:
        check(own)
    state = sharded_state(engine)
    safe_load.load(state, tag_dir)
    set_model_state_dict(engine.student, state["student"])
    set_model_state_dict(engine.target_encoder, state["target_encoder"])
    set_optimizer_state_dict(engine.student, engine.optimizer, state["optim"])
    ckpt.set_rng_state(own["rng"])
    if saved != dist_.get_world_size():
        log.info("resumed %s, written by %d rank(s), on %d", tag_dir, saved, dist_.get_world_size())
    return own
