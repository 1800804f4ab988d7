"""A log line printed while a progress bar is open lands on a line of its own, above the bar, in
the trainer's output and in feature extraction's."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from ijepa_fast.cli import pretrain
from ijepa_fast.eval.features import extract_features
from ijepa_fast.models.vit import build_encoder
from ijepa_fast.runtime.progress import ProgressBar
from tests.test_trainer import tiny_overrides, write_idx

# setup_logging's format: "2026-01-02 03:04:05,678 INFO name: message"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) [\w.]+: .*")


@pytest.fixture
def restore_logging():
    """The root logger's handlers and level as they were before the test's setup_logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def screen_lines(err: str, text: str) -> list[str]:
    """What a terminal shows on each line holding ``text``: the part after the line's last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if text in line]


def test_a_log_line_while_the_bar_is_open_is_a_line_of_its_own(restore_logging, capsys):
    pretrain.setup_logging()  # the commands' console handler, on this test's captured stderr
    console = logging.getLogger().handlers[:]
    with ProgressBar(total=10, desc="work") as bar:
        bar.update(3)
        logging.getLogger("ijepa_fast.test").warning("halfway there")
        bar.update(7)
    err = capsys.readouterr().err
    shown = screen_lines(err, "halfway there")
    assert len(shown) == 1 and LOG_LINE.fullmatch(shown[0]) and shown[0].endswith("halfway there"), repr(err)
    assert "work: 100%" in err
    assert logging.getLogger().handlers == console  # the console handler is back once the bar closes


def test_the_trainers_log_lines_stay_off_its_bar(restore_logging, tmp_path, capsys):
    data = write_idx(tmp_path / "data", n=48)
    argv = tiny_overrides(data, tmp_path / "runs", "bar", **{"run.progress": "true", "run.log_every": 2})
    assert pretrain.main(argv) == 0
    err = capsys.readouterr().err
    assert "pretrain:" in err and "checkpoint " in err
    logged = [line for line in err.split("\n") if " INFO " in line or " WARNING " in line]
    assert logged and all(LOG_LINE.fullmatch(line.rsplit("\r", 1)[-1]) for line in logged), repr(err)


class LoggingDataset(torch.utils.data.Dataset):
    """Four images; reading the third logs a warning (as a replaced undecodable image does)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == 2:
            logging.getLogger("ijepa_fast.data").warning("image %d replaced", i)
        return torch.zeros(3, 32, 32), 0


def test_feature_extraction_log_lines_stay_off_its_bar(restore_logging, capsys):
    pretrain.setup_logging()
    encoder = build_encoder("vit_tiny", 32, 16)
    extract_features(encoder, LoggingDataset(), batch_size=1, dtype="fp32", progress=True, desc="features")
    err = capsys.readouterr().err
    shown = screen_lines(err, "image 2 replaced")
    assert "features:" in err and len(shown) == 1 and LOG_LINE.fullmatch(shown[0]), repr(err)
