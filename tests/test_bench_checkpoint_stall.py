"""The checkpoint-stall benchmark (profiling/bench_checkpoint_stall.py) times both save modes, and the
size it reports is what the save wrote (no file counted twice: ``latest.pt`` is a link), next to the
estimate the disk check uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ijepa_fast.runtime.optional import available

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "stall.json"
    argv = ["--model", "vit_tiny", "--rounds", "1", "--threads", "1", "--step-size", "64"]
    argv += ["--dir", str(tmp_path / "ckpt"), "--json", str(out), *extra]
    argv += ["model.pred_depth=1", "data.crop_size=64"]  # seconds, not tens of them
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "profiling.bench_checkpoint_stall", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| in the step |" in proc.stdout and "| background |" in proc.stdout, proc.stdout
    assert not (tmp_path / "ckpt").exists(), "the benchmark leaves its checkpoints behind"
    return json.loads(out.read_text())


def _check_rows(rows: list[dict]) -> None:
    assert [r["mode"] for r in rows] == ["in the step", "background"]
    for r in rows:
        assert r["stall_s"] == pytest.approx(r["blocked_s"] + r["slower_steps_s"])
        assert 0 < r["blocked_s"] <= r["write_s"]
    in_step, background = rows
    assert in_step["slower_steps_s"] == 0 and in_step["steps_during_write"] == 0  # nothing runs beside it
    # Each mode's files are the same state: the sizes agree, and match the disk check's estimate.
    assert background["checkpoint_gb"] == pytest.approx(in_step["checkpoint_gb"], rel=0.01)
    assert in_step["checkpoint_gb"] == pytest.approx(in_step["estimate_gb"], rel=0.05)


def test_stall_rows_of_deepspeed_or_without_it_the_plain_engine(tmp_path):
    """DeepSpeed where it is installed (its checkpoint folder and the consolidated export, whose
    ``latest.pt`` is a link as the plain engine's), else the plain engine: one process either way."""
    extra = ["--engine", "deepspeed", "--zero-stage", "1"] if available("deepspeed") else []
    _check_rows(_run(tmp_path, *extra))
