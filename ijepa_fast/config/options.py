"""Checks of the command-line options that several commands share, one implementation each, so that
the same bad value gets the same one-line ``ConfigError`` (naming the option) from every command."""

from __future__ import annotations

from ijepa_fast.config.schema import _check, check_device


def check_data_options(batch_size: int, num_workers: int | None, limit: int, device: str) -> None:
    """``--batch-size``, ``--num-workers`` (None: the command's default), ``--limit`` and ``--device`` of
    the commands that read a labelled dataset (``ijepa-eval``, ``ijepa-extract``, ``ijepa-finetune``)."""
    _check(batch_size >= 1, "--batch-size", batch_size, "an integer >= 1")
    _check(num_workers is None or num_workers >= 0, "--num-workers", num_workers, "an integer >= 0")
    _check(limit >= 0, "--limit", limit, "an integer >= 0 (0: all)")
    check_device("--device", device)
