"""Run metrics: accumulated on the device, read to the host once every ``log_every`` steps.

``DeviceMeter`` sums the loss on the device (no sync) and remembers the first step whose loss was
not finite; ``MetricsWriter`` appends rows to ``metrics.csv`` and TensorBoard event files, first
dropping the rows past the step the run starts from (left by an earlier attempt that got further, or
cut short by a kill), so a resumed or restarted run's CSV reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import torch

from ijepa_fast.optional import available

log = logging.getLogger(__name__)

CSV_FIELDS = ["step", "epoch", "loss", "lr", "wd", "momentum", "images_per_s", "skipped", "elapsed_s"]


class DeviceMeter:
    """Sums losses on the device and tracks the first non-finite step, without host syncs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.loss_sum += loss.detach().double()
        self.count += 1
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def read(self) -> tuple[float, int]:
        """(mean loss since the last read, first non-finite step or -1): one host sync."""
        values = torch.stack([self.loss_sum / max(self.count, 1), self.first_bad_step.double()]).tolist()
        self.reset()
        return values[0], int(values[1])


class MetricsWriter:
    """metrics.csv (always) and TensorBoard events (when installed and enabled) in the run folder."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, start_step: int = 0):
        self.path = Path(run_dir) / "metrics.csv"
        if self.path.exists():
            self._truncate_after(start_step)
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="")  # noqa: SIM115 (open for the writer's life; close())
        self._csv = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)
        if new:
            self._csv.writeheader()
        self._tb = None
        if tensorboard:
            if available("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step)
            else:
                log.warning(
                    "TensorBoard logging is on but tensorboard is not installed (pip install tensorboard); "
                    "writing metrics.csv only"
                )

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as fh:  # a row cut short by a kill lacks its last field: dropped
            rows = [r for r in csv.DictReader(fh) if r.get(CSV_FIELDS[-1]) is not None and int(r["step"]) <= step]
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        self._csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self._fh.flush()
        if self._tb is not None:
            for key in ("loss", "lr", "wd", "momentum", "images_per_s"):
                if key in row and isinstance(row[key], float) and math.isfinite(row[key]):
                    self._tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_loss(csv_path: Path, png_path: Path) -> bool:
    """Loss and learning-rate curves from metrics.csv to a PNG; False when matplotlib is missing."""
    if not available("matplotlib"):
        log.warning("matplotlib is not installed (pip install matplotlib): no loss plot written")
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    if not rows:
        return False
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [float(r["loss"]) for r in rows], lw=1.2)
    ax[0].set(xlabel="step", ylabel="loss", title="I-JEPA training loss")
    ax[0].grid(alpha=0.3)
    ax[1].plot(steps, [float(r["lr"]) for r in rows], lw=1.2, color="tab:orange")
    ax[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True
