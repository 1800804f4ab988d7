"""Value checks, one implementation each: the config's sections (``schema``) and the command-line
options several commands share use them, so that the same bad value gets the same one-line
``ConfigError`` naming its key or option from every command."""

from __future__ import annotations

import re
from typing import Any

from ijepa_fast.runtime.errors import ConfigError


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


def check_device(key: str, value: Any) -> None:
    """A device name ``runtime.device.resolve_device`` takes: run.device and every command's --device."""
    ok = isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None
    check(ok, key, value, "auto, cpu, cuda or cuda:N")


def check_range(key: str, pair: tuple[float, float], lo: float, hi: float, lo_open: bool = True) -> None:
    a, b = pair
    lo_ok = (a > lo) if lo_open else (a >= lo)
    relation = "<" if lo_open else "<="
    check(lo_ok and b <= hi and a <= b, key, pair, f"a pair (lo, hi) with {lo} {relation} lo <= hi <= {hi}")


def check_data_options(batch_size: int, num_workers: int | None, limit: int, device: str) -> None:
    """``--batch-size``, ``--num-workers`` (None: the command's default), ``--limit`` and ``--device`` of
    the commands that read a labelled dataset (``ijepa-eval``, ``ijepa-extract``, ``ijepa-finetune``)."""
    check(batch_size >= 1, "--batch-size", batch_size, "an integer >= 1")
    check(num_workers is None or num_workers >= 0, "--num-workers", num_workers, "an integer >= 0")
    check(limit >= 0, "--limit", limit, "an integer >= 0 (0: all)")
    check_device("--device", device)
