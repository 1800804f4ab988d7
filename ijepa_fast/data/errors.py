"""The error for a data source that cannot be read as a whole (a single bad image is skipped and
counted instead)."""

from __future__ import annotations

import os


class DataSourceError(ValueError):
    """A data source that cannot be read: every image undecodable, a damaged webdataset shard.

    The message is one line naming the folder or file. A DataLoader re-raises a worker's exception
    as ``type(err)(text)``, where the text holds the worker's traceback, whose last line is
    ``<module>.DataSourceError: <message>``: only that message is kept.
    """

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:  # re-raised in the main process from a DataLoader worker
            message = message.rstrip().rsplit("\n", 1)[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message.replace("\n", " "))


def no_decodable_image(root: str | os.PathLike, n: int, first: str) -> DataSourceError:
    """The error for a source none of whose ``n`` images decodes; ``first``: "path (error)" of one."""
    return DataSourceError(
        f"{root}: none of its {n} images can be decoded (first: {first}); check that the files are images"
    )
