"""Run metrics: accumulated on the device, read to the host once every ``log_every`` steps.

``DeviceMeter`` sums the loss on the device (no sync), remembers the first step whose loss was not
finite and holds the window's collapse monitors (``feature_summary`` of a batch's target features:
per-dimension std and RankMe); ``CollapseWatch`` warns when RankMe falls to collapse;
``MetricsWriter`` appends rows to ``metrics.csv`` and TensorBoard event files, first dropping the
rows past the step the run starts from (left by an earlier attempt that got further, or cut short by
a kill), so a resumed or restarted run's CSV reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ijepa_fast.io.checkpoint import no_follow, refuse_link  # how every file of a run folder is opened
from ijepa_fast.models.ops import TARGET_NORM_EPS  # the LayerNorm the loss's targets get
from ijepa_fast.runtime.errors import ConfigError
from ijepa_fast.runtime.optional import MissingDependencyError, available, require

log = logging.getLogger(__name__)

MONITOR_FIELDS = ["feature_std", "feature_std_min", "rankme"]  # empty in a row whose window measured none
# the online probe's scores (train.online_probe), test top-1 in %, on the rows of the steps it scored
PROBE_FIELDS = ["probe_knn_top1", "probe_linear_top1"]
CSV_FIELDS = [
    "step", "epoch", "loss", "lr", "wd", "momentum", "images_per_s", "skipped", "elapsed_s", *MONITOR_FIELDS,
    *PROBE_FIELDS,
]  # fmt: skip
TENSORBOARD_FIELDS = ["loss", "lr", "wd", "momentum", "images_per_s", *MONITOR_FIELDS, *PROBE_FIELDS]

RANKME_EPS = 1e-7  # RankMe's epsilon (Garrido et al., 2023): p_k = sigma_k / sum(sigma) + eps

# Collapse: the target encoder maps every patch to (nearly) the same vector, so the predictor meets
# its targets without modelling the image. The tokens' per-dimension std then falls towards 0 and
# RankMe towards 1, the one direction of the common vector (not centred, as RankMe is defined, it
# reads 1 however the small remainder is spread); in dimensional collapse the tokens keep only a few
# directions and RankMe falls to about that few. The threshold is relative to the run's first
# measurement (near initialisation: features that have learned nothing yet); falling below a quarter
# of it means most of the directions the features used have merged into others. The floor flags a run that starts
# (or resumes) collapsed: below 2, less spread than two equally used directions.
COLLAPSE_RANK_FRACTION = 0.25
COLLAPSE_RANK_FLOOR = 2.0
# What the monitors show, what healthy and collapsing runs look like, and what to change first.
COLLAPSE_DOC = "docs/collapse.md"


def feature_summary(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The collapse monitors' device tensors for token features [..., D]; no host sync.

    Each token is normalised as the loss's targets are (LayerNorm without affine), so the std is on
    the loss's scale: a token's D values have variance 1, and the mean over dims of the variance
    across tokens is 1 - |mean token|^2 / D, 0 when every token is the same. Returns, in float64:
    ``feature_std`` and ``feature_std_min`` (0-d: mean and min over dims of the std across the T
    tokens) and ``feature_gram`` ([D, D]: Z^T Z of the normalised tokens Z [T, D], from which
    ``rankme_from_gram`` reads RankMe; float64 because rounding in a float32 Z^T Z lifts the zero
    singular values of a collapsed batch to about sqrt(float32 eps) of the largest, which summed
    over many dims reads a rank-1 batch as clearly more than 1). Called on logging steps only.
    """
    with torch.autocast(features.device.type, enabled=False):
        dim = features.shape[-1]
        z = F.layer_norm(features.detach().float(), (dim,), eps=TARGET_NORM_EPS).reshape(-1, dim)  # (T, D)
        std = z.std(dim=0)  # (D,)
        z = z.double()
        return {"feature_std": std.mean().double(), "feature_std_min": std.min().double(), "feature_gram": z.T @ z}


def rankme_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """RankMe (Garrido et al., 2023) of Z [T, D] from its Gram matrix Z^T Z [D, D], as a 0-d tensor.

    exp of the entropy of p_k = sigma_k / sum(sigma) + eps, the singular values sigma_k of Z being
    the square roots of the Gram matrix's eigenvalues: about k for k equally used directions, 1 for
    a rank-1 Z, D at most. With fewer tokens than dims (T < D) the D - T zeros beyond Z's T
    singular values count too, each adding eps * |log eps| < 2e-6 to the entropy. NaN when the Gram
    matrix is not finite. On CUDA, torch.linalg checks the decomposition's convergence on the host:
    one wait, which is why this runs in ``DeviceMeter.read``, beside the read that waits anyway.
    """
    gram = gram.double()
    finite = torch.isfinite(gram).all()
    eigenvalues = torch.linalg.eigvalsh(torch.where(finite, gram, torch.zeros_like(gram)))
    rank = rankme_of_singular_values(eigenvalues.clamp_min(0).sqrt())
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def rankme_of_singular_values(sigma: torch.Tensor) -> torch.Tensor:
    """RankMe, exp(-sum_k p_k log p_k) with p_k = sigma_k / sum(sigma) + eps, of singular values
    ``sigma`` [K], as a 0-d tensor (about 1 + K eps |log eps| when every sigma is 0)."""
    p = sigma / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny) + RANKME_EPS
    return torch.exp(-(p * p.log()).sum())


@dataclass
class MeterReading:
    loss: float  # mean loss of the window
    first_bad_step: int  # the first step whose loss or gradients were not finite, or -1
    monitors: dict[str, float] = field(default_factory=dict)  # MONITOR_FIELDS, when the window measured them


class DeviceMeter:
    """Sums losses on the device, tracks the first non-finite step and keeps the window's feature
    summary, without host syncs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.features: dict[str, torch.Tensor] | None = None  # feature_summary of the window's last measurement

    def update(self, out: dict[str, torch.Tensor], step: int) -> None:
        """``out``: the training step's output, its ``loss``, ``step_finite`` when it stepped the
        optimizer (false: the step was skipped, its loss or gradients not finite) and, when it
        measured them, the ``feature_summary`` tensors."""
        loss = out["loss"].detach()
        self.loss_sum += loss.double()
        self.count += 1
        bad = ~torch.isfinite(loss)
        if "step_finite" in out:
            bad = bad | ~out["step_finite"]
        bad = bad & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)
        if "feature_gram" in out:
            self.features = {k: out[k] for k in ("feature_std", "feature_std_min", "feature_gram")}

    def read(self) -> MeterReading:
        """The window since the last read, in one host sync (RankMe's decomposition waits with it)."""
        values = [self.loss_sum / max(self.count, 1), self.first_bad_step.double()]
        if self.features is not None:
            f = self.features
            values += [f["feature_std"], f["feature_std_min"], rankme_from_gram(f["feature_gram"])]
        host = torch.stack(values).tolist()
        self.reset()
        return MeterReading(host[0], int(host[1]), dict(zip(MONITOR_FIELDS, host[2:])))


class CollapseWatch:
    """Says once when RankMe falls below the collapse threshold, and once when it is back above.

    The threshold is ``COLLAPSE_RANK_FRACTION`` of the first RankMe it sees (this process's start:
    after a resume, the resumed run's), but never below ``COLLAPSE_RANK_FLOOR``.
    """

    def __init__(self):
        self.threshold: float | None = None
        self.collapsed = False

    def check(self, step: int, monitors: dict[str, float]) -> str | None:
        """A message when this reading crosses the threshold (either way), else None."""
        rank = monitors.get("rankme", math.nan)
        if not math.isfinite(rank):
            return None
        if self.threshold is None:
            self.threshold = max(COLLAPSE_RANK_FRACTION * rank, COLLAPSE_RANK_FLOOR)
        if rank < self.threshold and not self.collapsed:
            self.collapsed = True
            return (
                f"the target features may be collapsing at step {step}: RankMe {rank:.2f} fell below "
                f"{self.threshold:.2f} ({COLLAPSE_RANK_FRACTION:g} of its first value, at least "
                f"{COLLAPSE_RANK_FLOOR:g}), per-dimension std {monitors['feature_std']:.3g} "
                f"(min {monitors['feature_std_min']:.3g}); see metrics.csv and loss.png, and {COLLAPSE_DOC} in the "
                "ijepa_fast repository for what to change first"
            )
        if rank >= self.threshold and self.collapsed:
            self.collapsed = False
            return f"the target features' RankMe is back above {self.threshold:.2f} at step {step}: {rank:.2f}"
        return None


WANDB_PROJECT = "ijepa_fast"  # unless $WANDB_PROJECT names another
WANDB_ID_FILE = "wandb_id"  # in the run folder: a resumed run logs to the same W&B run


def wandb_mode(setting: str) -> str | None:
    """The W&B mode ``run.wandb`` asks for (None: off). "on" means offline: the metrics stay in the
    run folder until ``wandb sync``; only "online" sends them anywhere."""
    return None if setting == "off" else "offline" if setting == "on" else setting


def check_wandb(setting: str) -> None:
    """Fail before training (a ``ConfigError``: the setting asks for what is missing) when
    ``run.wandb`` asks for W&B and it is not installed."""
    if not wandb_mode(setting):
        return
    try:
        require("wandb", f"run.wandb={setting}")
    except MissingDependencyError as err:
        raise ConfigError(f"{err}; or set run.wandb=off") from None


def _start_wandb(wandb, mode: str, run_dir: Path, run_id: str, **init_kwargs) -> tuple[object, str, str]:
    """(``wandb.init``'s run, its mode, its id). An online start that fails (no API key; no server:
    W&B gives up after its ``init_timeout``) logs offline instead, under a new id (W&B keeps the
    failed one in use), with a warning saying how to upload later."""
    try:
        return wandb.init(mode=mode, dir=str(run_dir), id=run_id, **init_kwargs), mode, run_id
    except Exception as err:  # W&B's UsageError, CommError, AuthenticationError...: any failed start
        if mode != "online":
            raise
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        log.warning(
            "W&B online could not start (%s): logging offline instead; after `wandb login` (or with "
            "WANDB_API_KEY set), `wandb sync %s` uploads the run",
            reason,
            Path(run_dir) / "wandb",
        )
        run_id = secrets.token_hex(4)
        return wandb.init(mode="offline", dir=str(run_dir), id=run_id, **init_kwargs), "offline", run_id


class WandbLogger:
    """The run's metrics in Weights & Biases, under the run folder's own W&B id (kept in
    ``run_dir/wandb_id``), so that a resumed run continues its W&B run instead of starting another.
    W&B drops rows of steps it already holds: a run resumed from an earlier checkpoint than its last
    log keeps its first record of those steps there (metrics.csv holds the resumed ones)."""

    def __init__(self, run_dir: Path, mode: str, name: str, config: dict, resumed: bool = False):
        wandb = require("wandb", f"run.wandb={mode}")
        id_path = Path(run_dir) / WANDB_ID_FILE
        refuse_link(id_path)  # before W&B starts: the id is written there once it has
        # A run restarted from step 0 is a new W&B run; a resumed one continues its own.
        if resumed and id_path.exists():
            with open(id_path, opener=no_follow) as fh:
                run_id = fh.read().strip()
        else:
            run_id = secrets.token_hex(4)
        self._run, mode, run_id = _start_wandb(
            wandb,
            mode,
            run_dir,
            run_id,
            project=None if os.environ.get("WANDB_PROJECT") else WANDB_PROJECT,
            name=name,
            resume="allow",
            config=config,
        )
        with open(id_path, "w", opener=no_follow) as fh:
            fh.write(run_id + "\n")
        log.info(
            "Weights & Biases (%s): run %s in %s%s",
            mode,
            run_id,
            Path(run_dir) / "wandb",
            "; upload later with `wandb sync` on that folder" if mode == "offline" else "",
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """metrics.csv (always), TensorBoard events (when installed and enabled) and W&B (``wandb``: a
    ``WandbLogger``, or None) in the run folder."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, start_step: int = 0, wandb: WandbLogger | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        if self.path.exists():
            self._truncate_after(start_step)
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="", opener=no_follow)  # noqa: SIM115 (open for the writer's life; close())
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
        self._wandb = wandb

    def _truncate_after(self, step: int) -> None:
        # a row cut short by a kill lacks its last field: dropped
        with open(self.path, newline="", opener=no_follow) as fh:
            reader = csv.DictReader(fh)
            last = reader.fieldnames[-1] if reader.fieldnames else CSV_FIELDS[-1]  # a run's older CSV: its own
            rows = [r for r in reader if r.get(last) is not None and self._step_of(r, reader.line_num) <= step]
        with open(self.path, "w", newline="", opener=no_follow) as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def _step_of(self, row: dict, line: int) -> int:
        try:
            return int(row["step"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.path}, line {line}: step {row['step']!r} is not a whole number; correct or delete that row"
            ) from None

    def write(self, row: dict) -> None:
        self._csv.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self._fh.flush()
        scalars = {
            f"train/{key}": row[key]
            for key in TENSORBOARD_FIELDS
            if key in row and isinstance(row[key], float) and math.isfinite(row[key])
        }
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, row["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_loss(csv_path: Path, png_path: Path) -> bool:
    """Loss, learning rate and the collapse monitors from metrics.csv to a PNG; False when
    matplotlib is missing."""
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
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
    ax[0].plot(steps, [float(r["loss"]) for r in rows], lw=1.2)
    ax[0].set(xlabel="step", ylabel="loss", title="I-JEPA training loss")
    ax[0].grid(alpha=0.3)
    ax[1].plot(steps, [float(r["lr"]) for r in rows], lw=1.2, color="tab:orange")
    ax[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    ax[1].grid(alpha=0.3)
    _plot_monitors(ax[2], rows)
    fig.tight_layout()
    with open(png_path, "wb", opener=no_follow) as fh:  # the run folder's file: never through a link
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return True


def _plot_monitors(ax, rows: list[dict]) -> None:
    """RankMe (left axis) and the per-dimension std (right axis) of the rows that measured them."""
    measured = [r for r in rows if r.get("rankme")]  # empty: not measured in that window (or an older CSV)
    ax.set(xlabel="step", title="target features (collapse: RankMe -> 1, std -> 0)")
    ax.grid(alpha=0.3)
    if not measured:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    steps = [int(r["step"]) for r in measured]
    ax.plot(steps, [float(r["rankme"]) for r in measured], lw=1.2, color="tab:green", label="RankMe")
    ax.set_ylabel("RankMe", color="tab:green")
    std_ax = ax.twinx()
    std_ax.plot(steps, [float(r["feature_std"]) for r in measured], lw=1.2, color="tab:purple", label="mean std")
    std_ax.plot(
        steps, [float(r["feature_std_min"]) for r in measured], lw=1, ls="--", color="tab:purple", label="min std"
    )
    std_ax.set_ylabel("per-dimension std", color="tab:purple")
    std_ax.legend(loc="upper right", fontsize=8)
