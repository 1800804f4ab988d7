"""A pickle payload to plant in checkpoint files: unpickled in full, it runs a shell command that
creates a marker file, so a test sees whether any code ran while a checkpoint was read."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch


class ShellPayload:
    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant(path: Path, marker: Path, key: str = "planted") -> None:
    """Add a payload under ``key`` to the dict checkpoint at ``path``, keeping everything else (any
    other file, e.g. a bare tensor, becomes the list [its content, the payload])."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # a file the test just wrote
    if isinstance(state, dict):
        state[key] = ShellPayload(marker)
    else:
        state = [state, ShellPayload(marker)]
    torch.save(state, path)
