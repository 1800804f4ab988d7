"""``ijepa-eval`` / ``python -m ijepa_fast.eval``: linear probe and kNN on frozen features.

    ijepa-eval runs/demo-20260101-120000 --data /usr/share/datasets/fashion-mnist
    ijepa-eval IN1K-vit.h.14-300e.pth.tar --data /data/imagenet --dataset folder --model vit_huge --patch 14

CHECKPOINT: ours (a ``.pt`` file, or a run folder: its ``checkpoints/latest.pt``), the authors'
``.pth.tar`` (size inferred from the tensor shapes, or ``--model/--patch/--img-size``), or a
``.safetensors`` export. Data: IDX files (``--dataset idx``: train and t10k pairs) or an
ImageNet-style folder (``--dataset folder``: ``ROOT/train`` and ``ROOT/val`` with one sub-folder per
class), centre-cropped to the encoder's image size. Prints top-1 and writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ijepa_fast.precision import DTYPES, resolve_precision

log = logging.getLogger(__name__)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Data and extraction options shared by ``ijepa-eval`` and ``ijepa-extract``."""
    p.add_argument("--data", required=True, help="data root: IDX files or an image folder")
    p.add_argument("--dataset", default="idx", choices=["idx", "folder"], help="kind of data at --data")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers decoding images (default: 0 for idx, up to 8 for folder)",
    )
    p.add_argument("--limit", type=int, default=0, help="use only the first N images of each split (0: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="autocast for feature extraction: auto = bf16 where the device has native bf16, else fp32",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def num_workers(args: argparse.Namespace) -> int:
    if args.num_workers is not None:
        return args.num_workers
    import os

    return 0 if args.dataset == "idx" else min(8, os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    from ijepa_fast.trainer import resolve_device as resolve

    return resolve(name, option="--device")


def open_eval_dataset(args: argparse.Namespace, split: str, img_size: int):
    """Centre-cropped, normalised (image [3, S, S], label) dataset of ``split`` at ``img_size``."""
    from ijepa_fast.config import DataConfig
    from ijepa_fast.data.loader import build_eval_dataset

    cfg = DataConfig(dataset=args.dataset, root=str(args.data), split=split, crop_size=img_size)
    if not Path(cfg.root).exists():
        raise FileNotFoundError(f"--data {cfg.root} does not exist")
    return build_eval_dataset(cfg, split=split, limit=args.limit)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ijepa_fast.eval.features import FEATURE_MODES
    from ijepa_fast.interop import add_checkpoint_args

    p = argparse.ArgumentParser(
        prog="ijepa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint_args(p)
    add_data_args(p)
    p.add_argument("--train-split", default="train", help="split to fit on (default: train)")
    p.add_argument("--test-split", default="", help="split to test on (default: test for idx, val for folder)")
    p.add_argument(
        "--features",
        default="avgpool",
        choices=FEATURE_MODES,
        help="avgpool: mean of the last layer's normed tokens; last4: the last four layers' concatenated",
    )
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True, help="linear probe")
    p.add_argument(
        "--probe-preprocess",
        default="whiten",
        choices=["whiten", "standardize"],
        help="probe features: PCA-whitened (default; well conditioned) or standardised per dimension",
    )
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True, help="kNN (k=20, T=0.07)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe's held-out split and shuffling")
    p.add_argument("--out", help="JSON report path (default: eval-<checkpoint stem>.json in the working folder)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, extract, probe, kNN; returns the report (also written to ``--out``)."""
    from ijepa_fast.eval.features import extract_features
    from ijepa_fast.eval.knn import knn_accuracy
    from ijepa_fast.eval.probe import linear_probe
    from ijepa_fast.interop import load_from_args

    device = resolve_device(args.device)
    precision = resolve_precision(device, args.dtype, option="--dtype")
    if precision.slow:
        log.warning("precision: %s", precision)
    loaded = load_from_args(args)
    encoder = loaded.encoder.to(device)
    spec = loaded.spec
    test_split = args.test_split or ("test" if args.dataset == "idx" else "val")
    report: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "format": loaded.format,
        "which": loaded.which,
        "checkpoint_meta": loaded.meta,
        "model": spec.to_metadata(),
        "features": args.features,
        "data": {
            "root": str(args.data),
            "dataset": args.dataset,
            "train_split": args.train_split,
            "test_split": test_split,
            "limit": args.limit,
        },
        "device": str(device),
        "dtype": precision.name,
        "torch": torch.__version__,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if test_split == args.train_split:
        log.warning("train and test split are both %r: the accuracies measure fitting, not generalisation", test_split)
    feats = []
    for role, split in (("train", args.train_split), ("test", test_split)):
        started = time.perf_counter()
        dataset = open_eval_dataset(args, split, spec.img_size)
        x, y = extract_features(
            encoder,
            dataset,
            mode=args.features,
            batch_size=args.batch_size,
            num_workers=num_workers(args),
            dtype=args.dtype,
            progress=not args.no_progress,
            desc=f"features {split}",
        )
        feats.append((x, y))
        report["data"][f"n_{role}"] = len(y)
        report["data"][f"replaced_{role}"] = replaced = dataset.replaced_count()
        if replaced:
            log.warning("%s split: %d undecodable image(s) replaced by the next decodable one", split, replaced)
        report[f"extract_seconds_{role}"] = time.perf_counter() - started
    (train_x, train_y), (test_x, test_y) = feats
    report["feature_dim"] = train_x.shape[1]
    if args.probe:
        result = linear_probe(
            train_x, train_y, test_x, test_y, seed=args.seed, device=device, preprocess=args.probe_preprocess
        )
        report["probe"] = result.to_dict()
    if args.knn:
        result = knn_accuracy(train_x, train_y, test_x, test_y, k=args.k, temperature=args.temperature, device=device)
        report["knn"] = result.to_dict()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ijepa_fast.interop import CheckpointMismatchError, UntrustedCheckpointError

    try:
        report = run(args)
    except (
        CheckpointMismatchError,
        UntrustedCheckpointError,
        FileNotFoundError,
        KeyError,
        ValueError,
        ImportError,
    ) as err:
        print(f"ijepa-eval: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or f"eval-{Path(report['checkpoint']).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    name, data = report["model"]["name"] or "custom", report["data"]
    print(
        f"{name} {report['which']} ({report['format']} checkpoint), {report['features']} features "
        f"[{report['feature_dim']}], {data['n_train']} train / {data['n_test']} test; "
        f"undecodable images replaced: {data['replaced_train']} train / {data['replaced_test']} test"
    )
    if "probe" in report:
        p = report["probe"]
        print(
            f"linear probe top-1: {100 * p['top1']:.2f}%  (lr {p['best_lr']:g}, wd {p['best_wd']:g}, "
            f"{p['seconds']:.1f} s)"
        )
    if "knn" in report:
        k = report["knn"]
        print(f"kNN top-1: {100 * k['top1']:.2f}%  (k={k['k']}, T={k['temperature']:g}, {k['seconds']:.1f} s)")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
