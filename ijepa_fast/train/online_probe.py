"""The online probe (``online_probe`` config section): the target encoder scored while it trains.

Every ``online_probe.every`` epochs (or steps), after that step, the trainer calls the probe: it
extracts the average-pooled features (``eval.features``) of the first ``train_images`` / ``test_images``
images of a labelled dataset (IDX, class folders, or webdataset shards with ``.cls`` labels;
centre-cropped to the training size) and fits kNN (``eval.knn``) and a quick linear probe
(``eval.probe`` with ``linear_steps`` steps). The test top-1 (%) lands in that step's row of
metrics.csv, TensorBoard and W&B (``metrics.PROBE_FIELDS``), and the curve in ``online_probe.png``.

Its time is kept out of images/s (the trainer pauses the window's clock), and a stop signal ends it
where it is. It runs on rank 0 only: the other ranks go on to their next step, whose first
collective waits for rank 0, so they wait as long as the probe takes. That wait must stay below the
collective timeout (``run.dist_timeout_s``); the subset sizes bound it, and a probe that took more
than half the timeout is warned about. Scoring sharded over the ranks would shorten the wait but make
every rank extract features and join in gathers; a subset of a few thousand images takes seconds on
a GPU, so one rank is simpler.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from torch import nn

from ijepa_fast.config import Config, DataConfig, OnlineProbeConfig
from ijepa_fast.runtime import distributed
from ijepa_fast.runtime.optional import available

log = logging.getLogger(__name__)

PLOT_NAME = "online_probe.png"


def probe_data_config(cfg: Config) -> DataConfig:
    """The labelled data the probe reads: its own root and kind, or the training data's."""
    probe = cfg.online_probe
    kind = probe.dataset or cfg.data.dataset
    return dataclasses.replace(
        cfg.data, dataset="folder" if kind == "shards" else kind, root=probe.root or cfg.data.root
    )


def open_split(cfg: Config, split: str, limit: int):
    """(image [3, S, S], label) dataset of the first ``limit`` images of ``split``, centre-cropped."""
    from ijepa_fast.data.evaluation import EvalDataset, build_eval_dataset
    from ijepa_fast.data.sources import folder_root

    data = dataclasses.replace(probe_data_config(cfg), split=split)
    if (cfg.online_probe.dataset or cfg.data.dataset) == "shards":
        from ijepa_fast.data.shards import LabelledShards

        return EvalDataset(LabelledShards(folder_root(data)), data.crop_size, limit, crop_fraction=0.875)
    return build_eval_dataset(data, split=split, limit=limit)


class OnlineProbe:
    """The trainer's step callback: ``due(step)``, then ``__call__(step, encoder) -> {field: top-1 %}``
    (empty on ranks other than 0)."""

    def __init__(self, cfg: Config, steps_per_epoch: int, run_dir: Path, is_main: bool):
        self.cfg: OnlineProbeConfig = cfg.online_probe
        self.full_cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main
        self.period = self.cfg.every * (steps_per_epoch if self.cfg.unit == "epochs" else 1)
        self._data = None  # (train, test) datasets, opened at the first call
        self.timeout_s = distributed.resolve_timeout(cfg.run.dist_timeout_s or None).total_seconds()

    def due(self, step: int) -> bool:
        return self.period > 0 and step > 0 and step % self.period == 0

    def check_data(self) -> None:
        """Open both splits now (rank 0), so that a missing dataset fails before training."""
        if self.is_main and self.period > 0:
            root = self.cfg.root
            if root and not Path(root).exists():  # named by its key: the data errors name data.root's kind only
                raise FileNotFoundError(f"online_probe.root={root} does not exist")
            self._datasets()

    def _datasets(self):
        if self._data is None:
            probe = self.cfg
            kind = probe.dataset or self.full_cfg.data.dataset
            test_split = probe.test_split or ("test" if kind == "idx" else "val")
            self._data = (
                open_split(self.full_cfg, probe.train_split, probe.train_images),
                open_split(self.full_cfg, test_split, probe.test_images),
            )
        return self._data

    def __call__(self, step: int, encoder: nn.Module) -> dict[str, float]:
        if not self.is_main:
            return {}
        started = time.perf_counter()
        scores = score(encoder, *self._datasets(), self.cfg)
        seconds = time.perf_counter() - started
        log.info(
            "online probe at step %d: kNN %.2f%%, linear %s (%.1f s)",
            step,
            scores["probe_knn_top1"],
            f"{scores['probe_linear_top1']:.2f}%" if "probe_linear_top1" in scores else "off",
            seconds,
        )
        if seconds > self.timeout_s / 2:
            log.warning(
                "the online probe took %.0f s, more than half the collective timeout (%.0f s) the other ranks "
                "wait under: lower online_probe.train_images / test_images or raise run.dist_timeout_s",
                seconds,
                self.timeout_s,
            )
        return scores


def score(encoder: nn.Module, train, test, cfg: OnlineProbeConfig) -> dict[str, float]:
    """kNN and (``linear_steps`` > 0) the quick linear probe, fitted on ``train``'s average-pooled
    features and scored on ``test``'s: {"probe_knn_top1", "probe_linear_top1"}, top-1 in %."""
    from ijepa_fast.eval.features import extract_features
    from ijepa_fast.eval.knn import knn_accuracy
    from ijepa_fast.eval.probe import linear_probe

    device = next(encoder.parameters()).device
    common = {"batch_size": cfg.batch_size, "progress": False, "mode": "avgpool"}
    train_x, train_y = extract_features(encoder, train, desc="probe train", **common)
    test_x, test_y = extract_features(encoder, test, desc="probe test", **common)
    out = {"probe_knn_top1": 100.0 * knn_accuracy(train_x, train_y, test_x, test_y, k=cfg.k, device=device).top1}
    if cfg.linear_steps:
        probe = linear_probe(train_x, train_y, test_x, test_y, steps=cfg.linear_steps, device=device)
        out["probe_linear_top1"] = 100.0 * probe.top1
    return out


def plot_curve(rows: list[dict], png_path: Path) -> bool:
    """Top-1 (kNN, linear) of the rows of metrics.csv that hold the probe's scores, against the step;
    False when matplotlib is missing or no row holds them."""
    scored = [r for r in rows if r.get("probe_knn_top1")]
    if not scored or not available("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ijepa_fast.io.checkpoint import no_follow

    steps = [int(r["step"]) for r in scored]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(steps, [float(r["probe_knn_top1"]) for r in scored], "s-", label="kNN")
    linear = [(s, float(r["probe_linear_top1"])) for s, r in zip(steps, scored) if r.get("probe_linear_top1")]
    if linear:
        ax.plot(*zip(*linear), "o-", label="linear probe")
    ax.set(xlabel="step", ylabel="test top-1 %", title="online probe of the target encoder")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with open(png_path, "wb", opener=no_follow) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return True
