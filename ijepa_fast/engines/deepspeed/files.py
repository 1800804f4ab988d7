"""The DeepSpeed checkpoints folder, read and tidied without an engine.

One tag per saved step (``step_XXXXXXXX``) holds DeepSpeed's own files and one small file per rank
(``ijepa_rankNNNNN.pt``) with what differs per rank (RNG, stage-3 target partitions), the world size
and the ZeRO stage; ``latest`` names the newest complete tag and is written last, atomically, after
every rank has finished. A tag written by another number of ranks is converted to DeepSpeed's
universal checkpoint in ``universal/<tag>`` beside the tags.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ijepa_fast.engines.deepspeed import universal as uc
from ijepa_fast.engines.deepspeed.patches import deepspeed_safe_globals
from ijepa_fast.io import checkpoint as ckpt

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8,})$")
_RANK_FILE = "ijepa_rank{:05d}.pt"
_UNIVERSAL = "universal"  # save_dir/universal/<tag>: a tag converted for another number of ranks


def tag(step: int) -> str:
    """The tag (folder name) of the checkpoint of ``step``."""
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    """The file of rank ``rank`` in the checkpoint tag ``tag_dir``."""
    return tag_dir / _RANK_FILE.format(rank)


def universal_folder(tag_dir: Path) -> Path:
    """Where the tag ``tag_dir`` is converted to a universal checkpoint."""
    return tag_dir.parent / _UNIVERSAL / tag_dir.name


def check_zero_stage(tag_dir: Path, saved: int | None, stage: int) -> None:
    """A checkpoint resumes under the ZeRO stage that wrote it (``saved``; None: not recorded)."""
    if saved is not None and saved != stage:
        raise ValueError(
            f"--resume: {tag_dir} was written with run.zero_stage={saved}, this run has run.zero_stage={stage}: "
            f"resume with run.zero_stage={saved}"
        )


def write_latest(save_dir: Path, tag: str) -> None:
    tmp = ckpt.temp_path(save_dir / "latest")
    tmp.write_text(tag)
    os.replace(tmp, save_dir / "latest")


def remove_partial_files_in(save_dir: str | Path) -> list[Path]:
    """Delete the temporary files that an interrupted save left in ``save_dir`` and in its tags.

    DeepSpeed writes its own files in place, without temporary files; a tag it did not finish is
    never named by ``latest`` (written last) and is overwritten when the run saves that step again.
    """
    save_dir = Path(save_dir)
    removed = ckpt.remove_partial_files(save_dir)
    for step in list_tags(save_dir):
        removed += ckpt.remove_partial_files(save_dir / tag(step))
    return removed


def list_tags(save_dir: str | Path) -> list[int]:
    """Steps of the checkpoint tags in ``save_dir``, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


def latest_step(save_dir: str | Path) -> int | None:
    """The step of ``save_dir/latest`` (no engine needed: the trainer builds its loader from it)."""
    latest = Path(save_dir) / "latest"
    if not latest.is_file():
        return None
    m = _TAG.match(latest.read_text().strip())
    if m is None:
        raise ValueError(f"{latest} names {latest.read_text().strip()!r}, not a step_XXXXXXXX tag of this trainer")
    return int(m.group(1))


def convert_to_universal(tag_dir: Path, universal: Path, zero_stage: int) -> None:
    """Rewrite the checkpoint tag ``tag_dir`` as DeepSpeed's universal checkpoint in ``universal``
    (deleting what conversions of other tags left beside it); at stage 3 with the target encoder's
    partitions of every saved rank joined into whole parameters."""
    saved_world = saved_world_size(tag_dir)

    def target_partitions() -> list[list[torch.Tensor]]:
        files = [rank_file(tag_dir, r) for r in range(saved_world)]
        return [ckpt.load_file(f, override=None)["target_partitions"] for f in files]

    shutil.rmtree(universal.parent, ignore_errors=True)
    log.info("converting %s (%d ranks) to a universal checkpoint in %s", tag_dir, saved_world, universal)
    uc.convert(tag_dir, universal, deepspeed_safe_globals(), target_partitions if zero_stage == 3 else None)


def saved_world_size(tag_dir: str | Path) -> int:
    """The number of ranks that wrote the checkpoint tag ``tag_dir`` (one ``ijepa_rank*.pt`` each)."""
    tag_dir = Path(tag_dir)
    found = sorted(tag_dir.glob("ijepa_rank*.pt"))
    if not found or found != [rank_file(tag_dir, r) for r in range(len(found))]:
        raise ValueError(
            f"{tag_dir} does not hold one ijepa_rankNNNNN.pt per rank from 0 on ({len(found)} found): "
            f"the save that wrote it did not finish; resume from an earlier step_XXXXXXXX"
        )
    return len(found)


def checkpoint_bytes(student_module: nn.Module, target_module: nn.Module, zero_stage: int) -> int:
    """About how many bytes one ``DeepSpeedEngine.save`` writes to the run folder's disk, every rank's files
    together, from the full parameter sizes (no collective, no file read; the same on every rank).

    The tag folder: the student's weights as DeepSpeed saves them (stages 0-2: the module's
    tensors in one file; stage 3: only placeholders, the weights live in the optimizer files),
    AdamW's two fp32 moments of each trainable parameter and, under ZeRO (stages 1-3), the
    optimizer's fp32 master copy of it; the target encoder (stages 0-2: in the client state;
    stage 3: its partitions in the ranks' own files). Then the consolidated fp32 export of both.
    """
    student, target = _tensor_bytes(student_module), _tensor_bytes(target_module)
    trainable = sum(_numel(p) for p in student_module.parameters() if p.requires_grad)
    fp32 = 4  # master weights and moments: fp32 at every stage (DeepSpeed's bf16 mode is off)
    optimizer = (2 if zero_stage == 0 else 3) * trainable * fp32
    module = student if zero_stage < 3 else 0
    consolidated = sum(_numel(t) * fp32 for m in (student_module, target_module) for t in _tensors(m))
    return module + optimizer + target + consolidated


def _numel(t: torch.Tensor) -> int:
    """The full element count: a ZeRO-3 parameter's own tensor is an empty placeholder."""
    return int(getattr(t, "ds_numel", t.numel()))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of the module's full parameters and buffers in their own dtypes."""
    return sum(_numel(t) * t.element_size() for t in _tensors(module))
