"""``make demo``: pretrain a ViT-tiny I-JEPA on Fashion-MNIST on the CPU, then probe it.

1. Pretrains with ``configs/demo.yaml`` (progress bar; run folder with config, metrics.csv,
   TensorBoard events, loss.png and checkpoints).
   After each epoch it scores the target encoder on a small subset (``--curve-train`` /
   ``--curve-test`` images; epoch 0 is the initialisation): the curve goes to ``probe_curve.png``,
   ``probe_curve.json`` and, as a small table, to the output.
2. Fits a linear probe (``ijepa_fast.eval.probe``: whitened features, lr/wd chosen on a held-out
   tenth) and a kNN classifier (``ijepa_fast.eval.knn``: k=20, cosine) on frozen average-pooled
   features of the target encoder and prints test accuracy and the features' effective rank
   (``ijepa_fast.eval.rank.rankme``) beside the same architecture at random initialisation and raw
   pixels.

    python -m ijepa_fast.cli.demo [--data DIR] [--dataset idx|folder] [--probe-train N] [--probe-test N]
                              [--curve-train N] [--curve-test N] [overrides...]

Overrides may come before or after the options. Each run gets its own folder (``demo-<time>``, then
``-2``, ``-3``... for demos started in the same second). Data too small for the probe is refused
before training. SIGINT or SIGTERM during training (the per-epoch curve included) stops as
``ijepa-pretrain`` does: a checkpoint is saved, the probe skipped, and the exit status is 130 or 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ijepa_fast import config as config_mod

log = logging.getLogger("ijepa_fast")

DEMO_CONFIG = "demo"  # the packaged configs/demo.yaml
# Probe on a subset: feature extraction of all 70,000 images twice would double the demo's time
# on 2 cores, and 20,000 training images already separate the three rows clearly.
PROBE_TRAIN, PROBE_TEST = 20_000, 10_000
# The per-epoch curve scores a smaller subset, so that it costs a small part of an epoch's time.
CURVE_TRAIN, CURVE_TEST = 5_000, 2_000


def image_count(text: str) -> int:
    from ijepa_fast.eval.probe import MIN_TRAIN_IMAGES

    value = int(text)
    if value < MIN_TRAIN_IMAGES:
        raise argparse.ArgumentTypeError(f"{value}: need at least {MIN_TRAIN_IMAGES} images")
    return value


def curve_count(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return image_count(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err}, or 0 for no curve") from None


def parse_args(argv):
    from ijepa_fast.cli.args import command_parser

    p = command_parser("ijepa-demo", __doc__)
    p.add_argument("--data", help="data root (IDX files or an image folder); default: configs/demo.yaml's")
    p.add_argument("--dataset", choices=["idx", "folder"], help="kind of data at --data")
    p.add_argument(
        "--probe-train",
        type=image_count,
        default=PROBE_TRAIN,
        metavar="N",
        help=f"training images for the probe and kNN (default {PROBE_TRAIN:,})",
    )
    p.add_argument(
        "--probe-test",
        type=image_count,
        default=PROBE_TEST,
        metavar="N",
        help=f"test images scored (default {PROBE_TEST:,})",
    )
    p.add_argument(
        "--curve-train",
        type=curve_count,
        default=CURVE_TRAIN,
        metavar="N",
        help=f"training images of the per-epoch curve (default {CURVE_TRAIN:,}; 0: no curve)",
    )
    p.add_argument(
        "--curve-test",
        type=image_count,
        default=CURVE_TEST,
        metavar="N",
        help=f"test images of the per-epoch curve (default {CURVE_TEST:,})",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.epochs=2")
    return p.parse_intermixed_args(argv)  # overrides may come before, between and after the options


def demo_config(args) -> config_mod.Config:
    overrides = [f"run.name=demo-{time.strftime('%Y%m%d-%H%M%S')}"]
    overrides += [f"data.root={args.data}"] if args.data else []
    overrides += [f"data.dataset={args.dataset}"] if args.dataset else []
    return config_mod.load(DEMO_CONFIG, overrides + list(args.overrides))


def claim_run_folder(cfg: config_mod.Config, args) -> config_mod.Config:
    """``cfg`` with a run folder this process created: the timestamped default name gets -2, -3...
    while that folder exists (demos started in the same second); mkdir is atomic, so no two processes
    get the same folder. A run.name given on the command line is kept as it is."""
    if any(item.startswith("run.name=") for item in args.overrides):
        return cfg
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, n = cfg.run.name, 1
    while True:
        try:
            (out_dir / name).mkdir()
            return config_mod.apply_overrides(cfg, [f"run.name={name}"])
        except FileExistsError:
            n += 1
            name = f"{cfg.run.name}-{n}"


def probe_datasets(cfg: config_mod.Config, n_train: int, n_test: int):
    """(train, test): the first ``n_train`` / ``n_test`` images of each split, centre-cropped; too few
    training images for the probe is a ValueError naming the data, raised before any training."""
    from ijepa_fast.data.evaluation import build_eval_dataset
    from ijepa_fast.eval.probe import MIN_TRAIN_IMAGES

    train = build_eval_dataset(cfg.data, split="train", limit=n_train)
    if len(train) < MIN_TRAIN_IMAGES:
        found = f"{len(train)} training image{'' if len(train) == 1 else 's'}"
        raise ValueError(
            f"{train.source.root}: {found}; the probe needs at least {MIN_TRAIN_IMAGES} (one is held out to "
            f"choose its learning rate and weight decay)"
        )
    return train, build_eval_dataset(cfg.data, split="test", limit=n_test)


@dataclass
class Scores:
    probe: float  # whitened linear probe, test top-1 %
    knn: float  # kNN (k=20, cosine), test top-1 %
    rank: float  # RankMe of the training images' features


Features = tuple[torch.Tensor, torch.Tensor]  # (features [N, F], labels [N])


def score(train: Features, test: Features) -> Scores:
    """Linear probe and kNN fit on ``train``, scored on ``test``; RankMe of the train features."""
    from ijepa_fast.eval.knn import knn_accuracy
    from ijepa_fast.eval.probe import linear_probe
    from ijepa_fast.eval.rank import rankme

    probe = linear_probe(*train, *test)
    knn = knn_accuracy(*train, *test)
    return Scores(100.0 * probe.top1, 100.0 * knn.top1, rankme(train[0]))


def encoder_features(encoder, name: str, progress: bool = True) -> Callable[[object, str], Features]:
    """(dataset, split) -> average-pooled features of ``encoder`` and the labels.

    Taken with the fp32 residual stream whatever ``speed.bf16_residual`` trained with, as ijepa-eval
    takes them from a checkpoint and as the random-init row is: one evaluation for every run."""
    from ijepa_fast.eval.features import extract_features

    def features(dataset, split: str) -> Features:
        trained_with = encoder.bf16_residual
        encoder.set_bf16_residual(False)
        try:
            return extract_features(
                encoder, dataset, mode="avgpool", progress=progress, desc=f"{name} features ({split})"
            )
        finally:
            encoder.set_bf16_residual(trained_with)

    return features


def pixel_features(dataset, split: str) -> Features:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).flatten(1), torch.as_tensor(labels)


def initial_encoder(cfg: config_mod.Config):
    """The target encoder as the trainer builds it before step 0 (same seed, same init order)."""
    from ijepa_fast.models.ijepa import build_models

    torch.manual_seed(cfg.run.seed)
    return build_models(cfg.model, cfg.data.crop_size)[1]


class ProbeCurve:
    """Probe, kNN and RankMe of an encoder on a fixed subset, one point per epoch (epoch 0: the
    initialisation). ``add`` serves as the trainer's ``on_epoch_end`` through a closure."""

    def __init__(self, cfg: config_mod.Config, n_train: int, n_test: int):
        self.train, self.test = probe_datasets(cfg, n_train, n_test)
        self.points: dict[int, Scores] = {}
        self.seconds = 0.0  # spent scoring, in all

    def add(self, epoch: int, encoder) -> None:
        started = time.perf_counter()
        features = encoder_features(encoder, f"epoch {epoch}", progress=False)
        self.points[epoch] = score(features(self.train, "train"), features(self.test, "test"))
        self.seconds += time.perf_counter() - started

    def save(self, run_dir: Path) -> Path | None:
        """``probe_curve.json`` always; the PNG path, or None when matplotlib is missing."""
        epochs = sorted(self.points)
        report = {
            "train_images": len(self.train),
            "test_images": len(self.test),
            "seconds": round(self.seconds, 1),
            "epochs": {e: asdict(self.points[e]) for e in epochs},
        }
        (run_dir / "probe_curve.json").write_text(json.dumps(report, indent=2))
        png = run_dir / "probe_curve.png"
        return png if plot_curve(self.points, png) else None

    def text(self) -> str:
        """The curve as a table, one column per epoch."""
        epochs = sorted(self.points)
        lines = ["| epoch | " + " | ".join(map(str, epochs)) + " |", "| --- |" + " --- |" * len(epochs)]
        for label, key, fmt in (("probe %", "probe", ".1f"), ("kNN %", "knn", ".1f"), ("RankMe", "rank", ".2f")):
            values = " | ".join(format(getattr(self.points[e], key), fmt) for e in epochs)
            lines.append(f"| {label} | {values} |")
        return "\n".join(lines)


def plot_curve(points: dict[int, Scores], png_path: Path) -> bool:
    """Top-1 (probe, kNN) and RankMe against epoch; False when matplotlib is missing."""
    from ijepa_fast.runtime.optional import available

    if not available("matplotlib") or not points:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = sorted(points)
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    ax[0].plot(epochs, [points[e].probe for e in epochs], "o-", label="linear probe")
    ax[0].plot(epochs, [points[e].knn for e in epochs], "s-", label="kNN (k=20)")
    ax[0].set(xlabel="epoch (0: initialisation)", ylabel="test top-1 %", title="target encoder, per epoch")
    ax[0].legend()
    ax[1].plot(epochs, [points[e].rank for e in epochs], "o-", color="tab:green")
    ax[1].set(xlabel="epoch", ylabel="RankMe", title="effective rank of the pooled features")
    for a in ax:
        a.grid(alpha=0.3)
        a.set_xticks(epochs)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def probe_table(data: tuple, run_dir: Path, target_encoder, random_encoder) -> dict:
    """Linear probe, kNN top-1 (%) and RankMe of three feature sets on the same images (``data``:
    ``probe_datasets``' train and test): the report
    ``{"train_images", "test_images", "rows": [(features, Scores), ...]}``.

    Both classifiers come from ``ijepa_fast.eval`` (whitened probe with its lr/wd sweep; kNN with
    k=20, cosine similarity, temperature 0.07). Also written to ``run_dir/probe.json``.
    """
    train, test = data
    rows = []
    for name, features in (
        ("I-JEPA (pretrained)", encoder_features(target_encoder, "pretrained")),
        ("same ViT, random init", encoder_features(random_encoder, "random init")),
        ("raw pixels", pixel_features),
    ):
        rows.append((name, score(features(train, "train"), features(test, "test"))))
    counts = {"train_images": len(train), "test_images": len(test)}
    top1 = {name: {"linear_probe": s.probe, "knn": s.knn} for name, s in rows}
    ranks = {name: s.rank for name, s in rows}
    (run_dir / "probe.json").write_text(json.dumps({**counts, "top1_percent": top1, "rankme": ranks}, indent=2))
    return {**counts, "rows": rows}


def format_table(rows: list[tuple[str, Scores]]) -> str:
    lines = [
        "| features | linear probe top-1 % | kNN (k=20) top-1 % | RankMe |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {s.probe:.1f} | {s.knn:.1f} | {s.rank:.2f} |" for name, s in rows]
    return "\n".join(lines)


def format_gain(pretrained: Scores, random_init: Scores) -> str:
    """What pretraining added over the same ViT at random init, in words a new user can read."""
    return (
        f"pretraining vs random init: linear probe {pretrained.probe - random_init.probe:+.1f} points, "
        f"kNN {pretrained.knn - random_init.knn:+.1f} points; RankMe {pretrained.rank:.1f} vs {random_init.rank:.1f} "
        "(effective rank of the features: near 1 means collapsed)"
    )


def pretrain(cfg: config_mod.Config, curve: ProbeCurve | None):
    """(trainer, RunResult, training seconds without the curve's scoring)."""
    from ijepa_fast.train.trainer import Trainer

    def score_epoch(epoch: int) -> None:
        curve.add(epoch, trainer.engine.target_encoder)

    started = time.perf_counter()
    trainer = Trainer(cfg, on_epoch_end=None if curve is None else score_epoch)
    result = trainer.fit()
    return trainer, result, time.perf_counter() - started - (curve.seconds if curve else 0.0)


def print_report(result, seconds: float, precision, curve: ProbeCurve | None, png, report: dict) -> None:
    print(f"\nI-JEPA demo: {result.steps} steps in {seconds / 60:.1f} min of training; run folder {result.run_dir}")
    print(f"precision: {precision}; skipped images: {result.skipped}\n")
    if curve is not None:
        print(
            f"per-epoch curve of the target encoder (epoch 0: random init; first {len(curve.train):,} training / "
            f"{len(curve.test):,} test images; {curve.seconds:.0f} s of scoring in all)"
        )
        print(f"plot: {png or 'none (matplotlib missing)'}\n")
        print(curve.text() + "\n")
    print(
        f"frozen average-pooled features: classifiers fit on the first {report['train_images']:,} "
        f"training images, top-1 on the first {report['test_images']:,} test images\n"
    )
    print(format_table(report["rows"]))
    (_, pretrained), (_, random_init) = report["rows"][:2]
    print("\n" + format_gain(pretrained, random_init))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from ijepa_fast.cli.pretrain import known_failures, one_line, setup_logging
    from ijepa_fast.data.sources import check_data_source

    try:
        cfg = demo_config(args)
    except (config_mod.ConfigError, FileNotFoundError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    # Everything that can be checked before training is, before the run folder exists.
    try:
        check_data_source(cfg.data)
        data = probe_datasets(cfg, args.probe_train, args.probe_test)
        curve = ProbeCurve(cfg, args.curve_train, args.curve_test) if args.curve_train else None
        cfg = claim_run_folder(cfg, args)
    except (OSError, ValueError) as err:
        print(f"ijepa-demo: {one_line(err)}", file=sys.stderr)
        return 1
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    setup_logging(run_dir)
    try:
        trainer, result, seconds = pretrain(cfg, curve)
    except KeyboardInterrupt as err:  # a second SIGINT or SIGTERM: stopped at once (trainer.Aborted)
        log.error("%s", str(err) or "interrupted")
        return 128 + getattr(err, "signum", signal.SIGINT)
    except known_failures() as err:
        log.error("%s", one_line(err))
        return 1
    if result.stop_signal is not None:  # as ijepa-pretrain: saved, then 128 + the signal
        log.warning(
            "stopped by %s at step %d after saving a checkpoint in %s; no probe",
            signal.Signals(result.stop_signal).name,
            result.steps,
            run_dir,
        )
        return 128 + result.stop_signal
    random_encoder = initial_encoder(cfg)
    png = None
    if curve is not None:
        curve.add(0, random_encoder)
        png = curve.save(run_dir)
    report = probe_table(data, run_dir, trainer.engine.target_encoder, random_encoder)
    print_report(result, seconds, trainer.precision, curve, png, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
