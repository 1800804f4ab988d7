"""What every command shows a new user before it runs: ``--version``, ``--help`` as plain text, and
``ijepa-pretrain --print-config``. The commands are the console scripts setup.py declares."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from ijepa_fast import config
from ijepa_fast.cli import pretrain

SETUP_PY = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
COMMANDS = dict(re.findall(r'"(ijepa-[\w-]+)=([\w.]+:\w+)"', SETUP_PY))  # {command: "module:function"}


def run_command(command: str, argv: list[str]) -> int | str | None:
    """The exit code of ``command`` (its console-script function) on ``argv``, which must exit."""
    module, function = COMMANDS[command].split(":")
    with pytest.raises(SystemExit) as stopped:
        getattr(importlib.import_module(module), function)(argv)
    return stopped.value.code


def one_error_line(capsys, command: str) -> str:
    """The one line a command printed on stderr for a bad input (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: "), lines
    return lines[0]


def test_setup_declares_the_eight_commands():
    assert set(COMMANDS) == {
        "ijepa-pretrain", "ijepa-demo", "ijepa-eval", "ijepa-export", "ijepa-extract", "ijepa-bench", "ijepa-shard",
        "ijepa-finetune",
    }  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_the_package_version(command, capsys):
    version = re.search(r'\bversion="([^"]+)"', SETUP_PY).group(1)
    assert run_command(command, ["--version"]) == 0
    assert capsys.readouterr().out == f"{command} {version}\n"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_text_is_plain_text(command, capsys):
    assert run_command(command, ["--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: {command} ") and "--version" in shown
    assert "``" not in shown  # reStructuredText markup of the docstrings, raw on a terminal


def test_print_config_prints_the_resolved_config_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "configs/demo.yaml", "--print-config", "optim.lr=5e-4", "run.out_dir=runs", "--data", "d"]
    assert pretrain.main(argv) == 0
    shown = capsys.readouterr().out
    printed = yaml.safe_load(shown)
    assert (printed["optim"]["lr"], printed["run"]["out_dir"], printed["data"]["root"]) == (5e-4, "runs", "d")
    assert list(tmp_path.iterdir()) == []  # no run folder, no log
    (tmp_path / "printed.yaml").write_text(shown)
    expected = config.load("demo", ["optim.lr=5e-4", "run.out_dir=runs", "data.root=d"])
    assert config.load(str(tmp_path / "printed.yaml")) == expected


def test_print_config_of_a_bad_config_is_the_usual_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert pretrain.main(["--config", "demo", "--print-config", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "optim.lr='fast'" in err
    assert list(tmp_path.iterdir()) == []


def test_the_license_file_is_the_mit_license_setup_py_declares():
    license_text = (Path(__file__).resolve().parent.parent / "LICENSE").read_text()
    assert re.search(r'\blicense="MIT"', SETUP_PY)
    assert license_text.startswith("MIT License\n") and "Copyright (c) 2026 the ijepa_fast authors" in license_text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in license_text


def test_console_logging_writes_to_the_current_stderr_not_a_closed_one(monkeypatch):
    """A stderr replaced after set-up (a test's capture, a redirect) gets the records; the stream that
    was current at set-up may be closed by then."""
    import io
    import logging
    import sys

    from ijepa_fast.cli.pretrain import setup_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("ijepa_fast.test").warning("a record after the stream changed")
    assert "a record after the stream changed" in second.getvalue()
