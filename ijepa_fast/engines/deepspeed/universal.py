"""Resuming a DeepSpeed run on another number of ranks: DeepSpeed's universal checkpoint, read weights-only.

A ZeRO checkpoint holds each rank's partition of the fp32 weights and the AdamW state, cut for the
world size that wrote it. ``convert`` rewrites one tag as DeepSpeed's universal checkpoint (one
folder per parameter with its whole fp32 value and AdamW state: ``ds_to_universal``), which an
engine of any world size loads with ``checkpoint.load_universal``; the ZeRO-3 target encoder, kept
in our per-rank files as partitions, is joined into whole parameters beside it (``TARGET_FILE``).

DeepSpeed reads and converts these files with ``torch.load(weights_only=False)``, which would run
whatever a planted object asks for; ``patches.weights_only_torch_load`` routes those calls through
``checkpoint.load_file`` (weights only, DeepSpeed's plain records allowed) while they run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ijepa_fast.engines.deepspeed import patches
from ijepa_fast.io import checkpoint as ckpt

TARGET_FILE = "ijepa_target.pt"  # the ZeRO-3 target encoder's whole flat parameters, in parameter order
_DONE = "ijepa_converted"  # written last: the folder is complete


def is_converted(folder: Path) -> bool:
    return (Path(folder) / _DONE).is_file()


def convert(tag_dir: Path, out_dir: Path, allowed: list[type], target_partitions: Callable[[], list] | None) -> None:
    """Write ``tag_dir`` (a ZeRO checkpoint of any stage 1-3) as a universal checkpoint in ``out_dir``.

    ``target_partitions()`` (ZeRO-3 only) returns, for each saved rank in rank order, its list of
    target-encoder partitions; they are joined into ``out_dir/TARGET_FILE``. Written into a
    temporary folder, renamed when complete: an interrupted conversion leaves nothing ``out_dir``.
    """
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    patches.run_ds_to_universal(tag_dir, partial, allowed)
    if target_partitions is not None:
        ckpt.atomic_torch_save(join_partitions(target_partitions()), partial / TARGET_FILE)
    (partial / _DONE).write_text(tag_dir.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)


def join_partitions(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each parameter's partitions, rank by rank ([ranks][params] flat tensors), joined into one flat
    tensor (still padded to a multiple of the number of ranks, as ZeRO-3 pads)."""
    return [torch.cat(parts) for parts in zip(*per_rank, strict=True)]


def partition_of(flat: torch.Tensor, numel: int, rank: int, size: int) -> torch.Tensor:
    """ZeRO-3's partition ``rank`` (``size`` elements, zero-padded at the end) of a parameter of
    ``numel`` elements, from its flat values (``flat[:numel]``; what follows is padding)."""
    part = torch.zeros(size, dtype=flat.dtype)
    piece = flat[:numel][rank * size : (rank + 1) * size]
    part[: piece.numel()] = piece
    return part
