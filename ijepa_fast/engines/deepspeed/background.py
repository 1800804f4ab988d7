"""DeepSpeed checkpoints written in the background (``run.async_checkpoint``): the step waits for the
host copy only.

``stage_save`` runs DeepSpeed's own ``save_checkpoint`` (collective, as in the step) with its
checkpoint engine swapped for ``HostCopies``, which copies each state DeepSpeed hands it to host
memory instead of writing it; it does the same for this rank's own file and rank 0's consolidated
export. The returned write runs on the trainer's writer thread: every file written atomically, then
a barrier on a gloo group of the engine's own (so it never interleaves with the training's
collectives), then rank 0 names the tag in ``latest``, applies retention and writes the export. A
write killed part-way leaves a tag that ``latest`` never named: the previous one stays the latest,
and the next start deletes the partial tag, exactly as for a save in the step.

Each save's host copies become the next one's buffers (``host_copy(into=...)``), found by file name
within the tag, as the plain engine reuses its own: fresh host memory is slow to fault in. The
trainer's ``Checkpointer`` joins a write before it stages the next save, so no write still reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ijepa_fast.engines.deepspeed import files
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.async_save import host_copy
from ijepa_fast.runtime import distributed as dist_


def host_copies_engine(real, buffers: dict[str, Any]):
    """A checkpoint engine like ``real`` (the engine's ``patches._CheckpointFiles``) whose ``save``
    keeps a host copy of each state in ``captured`` instead of writing it, into the copy of the file
    of the same name in ``buffers`` where there is one. Everything else (directories, commit,
    loading) is ``real``'s."""

    class HostCopies(type(real)):
        def __init__(self):
            self.__dict__.update(real.__dict__)
            self.captured: list[tuple[str, Any]] = []

        def save(self, state_dict, path: str):
            self.captured.append((str(path), host_copy(state_dict, into=buffers.get(Path(path).name))))

    return HostCopies()


def stage_save(engine, run_dir: Path, step: int, meta: dict, keep: int) -> tuple[Path | None, Callable[[], None]]:
    """Collective (every rank, at the same step): see the module docstring. Returns (the consolidated
    export's path on rank 0, None elsewhere; the write)."""
    real = engine.engine.checkpoint_engine
    if not getattr(real, "_atomic_saves", False):  # another writer from run.ds_config: it writes now
        path = engine.save(run_dir, step, meta, keep)
        return path, lambda: None
    save_dir, tag = run_dir / "deepspeed", engine.tag(step)
    (save_dir / tag).mkdir(parents=True, exist_ok=True)
    rank = dist_.get_rank()
    last = engine._staged  # the previous save's copies, by file name
    own = host_copy(engine.own_state(step), into=last.get("own"))
    capture = host_copies_engine(real, last)
    engine.engine.checkpoint_engine = capture
    try:
        engine.engine.save_checkpoint(
            str(save_dir), tag=tag, client_state=engine.client_state(meta, step), save_latest=False
        )
    finally:
        engine.engine.checkpoint_engine = real
    export = engine.export_state({**meta, "rng": ckpt.rng_state()})
    export = None if export is None else host_copy(export, into=last.get("export"))
    engine._staged = {**{Path(path).name: state for path, state in capture.captured}, "own": own, "export": export}
    group = write_group(engine)
    export_dir = run_dir / "checkpoints"

    def write() -> None:
        for path, state in capture.captured:
            _write(state, Path(path))
        _write(own, files.rank_file(save_dir / tag, rank))
        if group is not None:
            torch.distributed.barrier(group=group)  # every rank's files are complete
        engine.name_tag(save_dir, step, keep)
        if export is not None:
            ckpt.save_checkpoint(export_dir, export, step, keep)

    return (export_dir / ckpt.checkpoint_name(step) if rank == 0 else None), write


def write_group(engine):
    """The engine's gloo group for the writes' barrier, made at its first background save (every
    rank at once: it is a collective); None in a world of one."""
    if dist_.get_world_size() == 1:
        return None
    if engine._write_group is None:
        engine._write_group = torch.distributed.new_group(backend="gloo")
    return engine._write_group


def _write(state: Any, path: Path) -> None:
    """One file of the tag, written as the save in the step writes it (``patches._CheckpointFiles``)."""
    ckpt.atomic_torch_save(state, path)
