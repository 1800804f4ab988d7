"""Shared fixtures. Test isolation: a command line a test runs sets up the root logger (console and train.log handlers,
level INFO) for its process; each test gets back the logging it started with, so that one test's
set-up never adds lines to what the next one captures."""

from __future__ import annotations

import logging
import sys

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _private_cache_home(monkeypatch, tmp_path):
    """The DALI image check caches its verdicts under the user's cache folder: each test gets its own."""
    monkeypatch.setenv("IJEPA_CACHE_DIR", str(tmp_path / "ijepa-cache"))


@pytest.fixture
def no_wandb(monkeypatch):
    """W&B not installed: ``import wandb`` raises ImportError, and the optional-package probe forgets
    what it found before."""
    from ijepa_fast.runtime import optional

    monkeypatch.setitem(sys.modules, "wandb", None)
    optional._try_import.cache_clear()
    yield
    optional._try_import.cache_clear()
