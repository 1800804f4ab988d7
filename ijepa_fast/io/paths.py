"""What a path given for a checkpoint stands for: a file as is, a run folder its
``checkpoints/latest.pt``, a checkpoints folder its ``latest.pt`` (missing, or pointing at a deleted
file: the newest checkpoint that loads, with a warning)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ijepa_fast.io.checkpoint import list_checkpoints, newest_loadable

log = logging.getLogger(__name__)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A file as is; a run folder -> its ``checkpoints/latest.pt``; a checkpoints folder -> ``latest.pt``.
    Where latest.pt is missing or points at a deleted file, the newest checkpoint beside it that loads,
    named in a warning."""
    path = Path(path)
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            latest = folder / "latest.pt"
            if latest.exists():
                return latest.resolve()
            if latest.is_symlink() or list_checkpoints(folder):
                return _newest_instead_of(latest)
        raise FileNotFoundError(f"{path} is a folder without checkpoints/latest.pt or latest.pt")
    if path.name == "latest.pt" and path.is_symlink() and not path.exists():
        return _newest_instead_of(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def _newest_instead_of(latest: Path) -> Path:
    """The newest checkpoint beside a ``latest.pt`` that is missing or points at nothing (a checkpoint
    deleted by hand), with a warning saying so."""
    if latest.is_symlink():
        gone = f"{latest} points at {os.readlink(latest)}, which does not exist"
    else:
        gone = f"{latest.parent} has no latest.pt"
    newest = newest_loadable(latest.parent)
    if newest is None:
        raise FileNotFoundError(f"{gone}, and no other checkpoint in {latest.parent} loads")
    log.warning("%s: loading the newest checkpoint that loads, %s", gone, newest)
    return newest
