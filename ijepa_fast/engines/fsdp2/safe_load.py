"""Reading a ``torch.distributed.checkpoint`` (DCP) folder weights-only.

DCP (torch 2.13) reads two things with the full unpickler, which can run any code a file names:

- the folder's ``.metadata`` file: ``FileSystemReader.read_metadata`` calls ``pickle.load``;
- every value that is not a tensor (an optimizer's ``lr``, ``betas``...): ``DefaultLoadPlanner.load_bytes``
  calls ``torch.load(weights_only=False)``.

``SafeReader`` unpickles ``.metadata`` allowing only the records DCP writes there (its metadata
dataclasses, ``torch.Size``, dtypes, layouts; listed in ``ALLOWED``), and ``SafePlanner`` reads the
other values with ``torch.load(weights_only=True)``. Anything else is refused with
``checkpoint.UntrustedCheckpointError`` naming the file and the object, before it is built.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ijepa_fast.io.checkpoint import NotACheckpointError, UntrustedCheckpointError

METADATA = ".metadata"  # DCP's name; written last (a temporary file renamed), so it marks a complete save

# (module, name) of every global DCP's FileSystemWriter pickles into .metadata (torch 2.13)
_DCP_RECORDS = (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
ALLOWED = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in _DCP_RECORDS}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a layout by its name: what torch's weights_only loader allows
        ("pathlib", "PosixPath"),  # the checkpoint's folder (StorageMeta.checkpoint_id)
        ("pathlib", "WindowsPath"),
        ("pathlib._local", "PosixPath"),  # the same on Python >= 3.13
        ("pathlib._local", "WindowsPath"),
    }
)


def _allowed(module: str, name: str) -> bool:
    dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in ALLOWED or dtype


def refusal(path: Path, what: str) -> str:
    return (
        f"{path} holds an object other than DCP's records, tensors, numbers, strings and containers ({what}), so "
        f"it is refused: unpickling it could run arbitrary code; there is no override here: this package never "
        f"writes such objects"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise UntrustedCheckpointError(refusal(self.path, f"{module}.{name}"))
        return super().find_class(module, name)


def read_metadata_file(path: Path):
    """DCP's ``Metadata`` from ``path``, unpickling only ``ALLOWED`` globals."""
    with open(path, "rb") as fh:
        try:
            return _RestrictedUnpickler(fh, Path(path)).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise NotACheckpointError(f"{path} is damaged or not DCP metadata ({err})") from None


class SafeReader(FileSystemReader):
    """DCP's filesystem reader with ``.metadata`` read by ``read_metadata_file``."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / METADATA
        metadata = read_metadata_file(path)
        if getattr(metadata, "storage_meta", None) is None:  # as the reader it replaces does
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading values that are not tensors weights-only."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        where = f"{self.folder} (value {read_item.dest_index.fqn})"
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise UntrustedCheckpointError(refusal(Path(where), found.group(1) if found else "?")) from None
        # The parent class applies the value (its nesting rules) after a full torch.load: hand it a
        # file of the plain object just read, which holds nothing but what weights_only allowed.
        plain = io.BytesIO()
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def load(state: dict, folder: Path, no_dist: bool = False) -> None:
    """``dcp.load`` of ``folder`` into ``state`` in place, weights-only (``SafeReader``, ``SafePlanner``).

    DCP raises a rank's error wrapped in its ``CheckpointException`` (a ``BaseException``, with every
    rank's traceback); a refused or damaged file is raised as itself, naming the file."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp_load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner(folder), no_dist=no_dist)
    except CheckpointException as err:
        for exc, _ in err.failures.values():
            if isinstance(exc, (UntrustedCheckpointError, NotACheckpointError)):
                raise exc from None
        raise
