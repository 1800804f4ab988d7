"""The fine-tuning report: JSON and Markdown, in the shape of ``ijepa-eval``'s (what was tuned, on
what data, with which recipe, and the test top-1)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ijepa_fast.eval.report import data_text, loaded_fields, markdown, weights_text
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.train.metrics import read_metrics

if TYPE_CHECKING:
    from ijepa_fast.finetune.run import Finetuner

RECIPE_KEYS = (
    "epochs", "batch_size", "lr", "layer_decay", "weight_decay", "warmup_epochs", "min_lr",
    "label_smoothing", "drop_path", "crop_scale", "seed",
)  # fmt: skip


def build_report(tuner: Finetuner, steps: int, accuracy: float, seconds: float, saved: Path | None) -> dict[str, Any]:
    loaded, cfg = tuner.loaded, tuner.cfg
    metrics = tuner.out_dir / "metrics.csv"
    curve = (
        [{"step": int(r["step"]), "loss": float(r["loss"])} for r in read_metrics(metrics)] if metrics.exists() else []
    )
    return {
        **loaded_fields(loaded),
        "pooling": cfg.pooling,
        "data": {
            "root": cfg.data,
            "dataset": cfg.dataset,
            "train_split": cfg.train_split,
            "test_split": tuner.test_split,
            "n_train": len(tuner.loader.dataset),
            "n_test": len(tuner.test_set),
            "num_classes": tuner.num_classes,
            "limit": cfg.limit,
        },
        "recipe": {k: cfg.to_dict()[k] for k in RECIPE_KEYS},
        "steps": steps,
        "steps_per_epoch": tuner.steps_per_epoch,
        "seconds_this_process": round(seconds, 1),
        "finetuned_checkpoint": str(saved) if saved else None,
        "device": str(tuner.device),
        "dtype": tuner.precision.name,
        "torch": torch.__version__,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loss_curve": curve,
        "results": [{"train_labels": "all", "n_train": len(tuner.loader.dataset), "head": "fine-tuned",
                     "pooling": cfg.pooling, "top1": accuracy}],
    }  # fmt: skip


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: what was fine-tuned and how, then its top-1."""
    recipe_text = ", ".join(f"{k} {v}" for k, v in report["recipe"].items())
    rows = [
        ("encoder", f"{report['encoder']} ({report['format']} checkpoint)"),
        ("weights", f"{weights_text(report)}, fine-tuned end to end"),
        ("pooling", report["pooling"]),
        ("data", f"{data_text(report['data'])}, {report['data']['num_classes']} classes"),
        ("recipe", recipe_text),
        ("steps", f"{report['steps']} ({report['steps_per_epoch']} per epoch)"),
    ]
    return markdown(f"ijepa-finetune: {report['checkpoint']}", report, rows)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """``report.json`` and ``report.md`` in ``out_dir``, each written atomically; the JSON's path."""
    path = Path(out_dir) / "report.json"
    write_text(path, json.dumps(report, indent=2) + "\n")
    write_text(path.with_suffix(".md"), markdown_report(report))
    return path


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (``io.checkpoint.write_atomically``)."""
    ckpt.write_atomically(path, lambda tmp: tmp.write_text(text))
