"""``ijepa-eval`` / ``python -m ijepa_fast.eval``: linear probe, kNN, low-shot and attentive probes on frozen features.

    ijepa-eval runs/demo-20260101-120000 --data /usr/share/datasets/fashion-mnist
    ijepa-eval IN1K-vit.h.14-300e.pth.tar --data /data/imagenet --dataset folder --model vit_huge --patch 14 \\
        --low-shot 1% --no-full
    ijepa-eval ijepa_vith14_1k/ --data /data/imagenet --dataset folder --low-shot 5 --attentive --no-full

CHECKPOINT: ours (a ``.pt`` file, or a run folder: its ``checkpoints/latest.pt``), the authors'
``.pth.tar`` (size inferred from the tensor shapes, or ``--model/--patch``), a ``.safetensors``
export, or a Hugging Face IJepa folder. Data: IDX files (``--dataset idx``: train and t10k pairs) or
an ImageNet-style folder (``--dataset folder``: ``ROOT/train`` and ``ROOT/val`` with one sub-folder
per class), centre-cropped to the encoder's training size, or to ``--img-size N`` (a multiple of the
patch): the encoder then interpolates its position embeddings to the larger or smaller grid
(bicubic, as Hugging Face's IJepa with ``interpolate_pos_encoding=True``).

Protocol. The encoder is frozen; heads are fitted on the train split and scored (top-1) on the
whole test split.
  linear probe  multinomial logistic regression on the PCA-whitened --features (avgpool: the mean of
                the last layer's normed patch tokens, the paper's probe); learning rate and weight
                decay swept on a held-out 10% of the training images, then refitted on all of them.
  kNN           cosine similarity; the k=20 nearest training images vote with weight exp(s / 0.07).
  low-shot      --low-shot 1% and/or --low-shot N (repeatable): the probes trained on a seeded,
                class-balanced subset of the train labels: 1% of each class's images (the paper's
                ImageNet-1% evaluation: 12 or 13 images per class), or N images of each class. The
                seed is --seed; the report records each subset's per-class counts and indices.
  attentive     --attentive: a learned query's multi-head cross-attention over the frozen patch
                tokens, then a linear layer (the successor papers' attentive probe), trained with
                AdamW on each training set (all labels, and each low-shot subset).
--no-full skips the heads on all labels (only the low-shot subsets). Reports: JSON (--out) and
Markdown beside it (.md), each naming the encoder, its weights (target or context), the pooling,
the data sizes and the top-1 of every head.
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

from ijepa_fast.cli.args import (
    add_checkpoint_args,
    add_data_args,
    check_data_args,
    command_parser,
    eval_img_size,
    load_from_args,
    num_workers,
    open_eval_dataset,
    positive_int,
    resolve_device,
)
from ijepa_fast.eval.report import data_text, loaded_fields, markdown, weights_text
from ijepa_fast.runtime.device import resolve_precision
from ijepa_fast.runtime.errors import ConfigError

log = logging.getLogger(__name__)

KNN_K = 20  # the default neighbours; the vote takes all the training images when they are fewer


def _low_shot(spec: str):
    from ijepa_fast.eval.lowshot import LowShot

    try:
        return LowShot.parse(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ijepa_fast.eval.features import FEATURE_MODES

    p = command_parser("ijepa-eval", __doc__)
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
    p.add_argument(
        "--k",
        type=positive_int,
        default=None,
        help=f"kNN neighbours (default {KNN_K}: all the training images when fewer; a --k above their number is "
        "refused)",
    )
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument(
        "--low-shot",
        type=_low_shot,
        action="append",
        default=[],
        metavar="1%|N",
        help="also train the probes on a class-balanced subset: a percentage of each class's labels, or N per class",
    )
    p.add_argument(
        "--full", action=argparse.BooleanOptionalAction, default=True, help="run the heads on all train labels"
    )
    p.add_argument("--attentive", action="store_true", help="also train an attentive (cross-attention) probe")
    p.add_argument("--attentive-epochs", type=int, default=None, help="attentive probe epochs (default 20)")
    p.add_argument("--attentive-steps", type=int, default=None, help="attentive probe steps (overrides the epochs)")
    p.add_argument("--attentive-lr", type=float, default=None, help="attentive probe AdamW learning rate")
    p.add_argument(
        "--attentive-heads", type=positive_int, default=8, help="attentive probe heads (must divide the width)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the low-shot subsets, held-out split and shuffling")
    p.add_argument(
        "--out", help="JSON report path, not .md (default: eval-<checkpoint stem>.json); Markdown beside it as .md"
    )
    args = p.parse_args(argv)
    check_data_args(p, args)
    if not args.full and not args.low_shot:
        p.error("--no-full leaves nothing to evaluate: add --low-shot 1% or --low-shot N")
    if not (args.probe or args.attentive or (args.knn and args.full)):
        given = "--no-probe --no-knn" if not args.knn else "--no-probe with --no-full (kNN runs on all labels only)"
        p.error(f"{given} leaves nothing to evaluate: drop --no-probe, or add --attentive")
    return args


def _report_header(
    args: argparse.Namespace, loaded, device: torch.device, dtype: str, test_split: str
) -> dict[str, Any]:
    spec = loaded.spec
    return {
        **loaded_fields(loaded),
        "img_size": eval_img_size(args, spec),
        "checkpoint_meta": loaded.meta,
        "model": spec.to_metadata(),
        "features": args.features,
        "pooling": args.features,
        "data": {
            "root": str(args.data),
            "dataset": args.dataset,
            "train_split": args.train_split,
            "test_split": test_split,
            "limit": args.limit,
        },
        "device": str(device),
        "dtype": dtype,
        "torch": torch.__version__,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": [],
    }


def _extract(args: argparse.Namespace, encoder, dataset, split: str, tokens: bool = False):
    from ijepa_fast.eval.features import extract_features, extract_tokens

    common = dict(
        batch_size=args.batch_size,
        num_workers=num_workers(args),
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    if tokens:
        return extract_tokens(encoder, dataset, desc=f"tokens {split}", **common)
    return extract_features(encoder, dataset, mode=args.features, desc=f"features {split}", **common)


def _check_token_memory(images: int, spec, img_size: int) -> None:
    """Refuse an attentive probe whose cached tokens would take more than half the machine's memory."""
    import os

    need = images * (img_size // spec.patch_size) ** 2 * spec.embed_dim * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total // 2:
        raise ValueError(
            f"--attentive keeps the patch tokens of {images} images in memory ({need / 2**30:.1f} GiB, more than "
            f"half of this machine's {total / 2**30:.0f} GiB): evaluate fewer images (--limit N) or only the "
            f"low-shot subsets (--no-full)"
        )


def _add_result(report: dict, train_labels: str, n_train: int, head: str, pooling: str, top1: float) -> None:
    report["results"].append(
        {"train_labels": train_labels, "n_train": n_train, "head": head, "pooling": pooling, "top1": top1}
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, extract, fit and score every requested head; returns the report (also written to ``--out``)."""
    from ijepa_fast.eval.knn import knn_accuracy
    from ijepa_fast.eval.lowshot import label_subset
    from ijepa_fast.eval.probe import linear_probe

    device = resolve_device(args.device)
    precision = resolve_precision(device, args.dtype, option="--dtype")
    if precision.slow:
        log.warning("precision: %s", precision)
    loaded = load_from_args(args)
    if args.attentive and loaded.spec.embed_dim % args.attentive_heads:  # known now, not after extracting
        raise ValueError(
            f"--attentive-heads {args.attentive_heads} does not divide the encoder's width {loaded.spec.embed_dim}"
        )
    encoder = loaded.encoder.to(device)
    test_split = args.test_split or ("test" if args.dataset == "idx" else "val")
    report = _report_header(args, loaded, device, precision.name, test_split)
    if test_split == args.train_split:
        log.warning("train and test split are both %r: the accuracies measure fitting, not generalisation", test_split)
    splits, datasets, opening, feats = {"train": args.train_split, "test": test_split}, {}, {}, []
    for role, split in splits.items():  # both opened, so their sizes are checked before any extraction
        started = time.perf_counter()
        datasets[role] = open_eval_dataset(args, split, report["img_size"])
        opening[role] = time.perf_counter() - started
    if args.k is not None and args.knn and args.full and args.k > (n := len(datasets["train"])):
        raise ConfigError(f"--k {args.k} is more than the {n} training images: choose --k {n} or fewer")
    for role, split in splits.items():
        started = time.perf_counter() - opening[role]  # the seconds reported count the opening too
        x, y = _extract(args, encoder, datasets[role], split)
        feats.append((x, y))
        report["data"][f"n_{role}"] = len(y)
        report["data"][f"replaced_{role}"] = replaced = datasets[role].replaced_count()
        if replaced:
            log.warning("%s split: %d undecodable image(s) replaced by the next decodable one", split, replaced)
        report[f"extract_seconds_{role}"] = time.perf_counter() - started
    (train_x, train_y), (test_x, test_y) = feats
    report["feature_dim"] = train_x.shape[1]
    num_classes = int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    subsets = [label_subset(train_y, protocol, args.seed) for protocol in args.low_shot]
    # training sets: (name, rows of the train split or None for all, the report section to fill)
    training_sets = [("all", None, report)] if args.full else []
    for subset in subsets:
        section = {"subset": subset.to_dict()}
        report.setdefault("low_shot", []).append(section)
        training_sets.append((f"{subset.protocol.name} (seed {subset.seed})", subset.indices, section))
    for name, rows, section in training_sets:
        xs, ys = (train_x, train_y) if rows is None else (train_x[rows], train_y[rows])
        if args.probe:
            result = linear_probe(
                xs, ys, test_x, test_y, seed=args.seed, device=device, preprocess=args.probe_preprocess,
                num_classes=num_classes,
            )  # fmt: skip
            section["probe"] = result.to_dict()
            _add_result(report, name, len(ys), "linear probe", args.features, result.top1)
        if args.knn and rows is None:
            result = knn_accuracy(
                xs, ys, test_x, test_y, k=args.k or KNN_K, temperature=args.temperature, device=device
            )
            section["knn"] = result.to_dict()
            _add_result(report, name, len(ys), "kNN", args.features, result.top1)
    if args.attentive:
        _run_attentive(args, encoder, loaded.spec, datasets, training_sets, num_classes, report, device)
    return report


def _run_attentive(args, encoder, spec, datasets, training_sets, num_classes, report, device) -> None:
    """The attentive probe on each training set: the tokens of the rows it needs, extracted once."""
    from ijepa_fast.eval.attentive import attentive_probe

    full = any(rows is None for _, rows, _ in training_sets)
    rows_needed = None if full else torch.unique(torch.cat([rows for _, rows, _ in training_sets]))
    n_train = len(datasets["train"]) if full else len(rows_needed)
    _check_token_memory(n_train + len(datasets["test"]), spec, report["img_size"])
    source = datasets["train"] if full else torch.utils.data.Subset(datasets["train"], rows_needed.tolist())
    train_tokens, train_y = _extract(args, encoder, source, args.train_split, tokens=True)
    test_tokens, test_y = _extract(args, encoder, datasets["test"], report["data"]["test_split"], tokens=True)
    fit = {"num_heads": args.attentive_heads, "seed": args.seed}
    options = (("epochs", args.attentive_epochs), ("steps", args.attentive_steps), ("lr", args.attentive_lr))
    fit |= {k: v for k, v in options if v is not None}
    for name, rows, section in training_sets:
        if rows is None or full:
            pick = slice(None) if rows is None else rows
        else:
            pick = torch.searchsorted(rows_needed, rows)  # rows of the split -> positions among the cached ones
        result = attentive_probe(
            train_tokens[pick], train_y[pick], test_tokens, test_y, num_classes=num_classes, device=device, **fit
        )
        section["attentive"] = result.to_dict()
        _add_result(report, name, len(train_y[pick]), "attentive probe", "attentive", result.top1)


def _img_size_note(report: dict[str, Any]) -> str:
    size, trained = report["img_size"], int(report["model"]["img_size"])
    if size == trained:
        return f"{size} px (the training size)"
    return f"{size} px (trained at {trained} px; position embeddings interpolated, bicubic)"


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: what was evaluated, then one row per (training labels, head)."""
    rows = [
        ("encoder", f"{report['encoder']} ({report['format']} checkpoint)"),
        ("image size", _img_size_note(report)),
        ("weights", weights_text(report)),
        ("pooling", f"{report['pooling']} (linear probe, kNN); attentive: cross-attention over the patch tokens"),
        ("data", data_text(report["data"])),
    ]
    return markdown(f"ijepa-eval: {report['checkpoint']}", report, rows)


def report_paths(out: Path) -> tuple[Path, Path]:
    """(JSON, Markdown) report paths: ``out`` and the Markdown beside it. ValueError for an ``out``
    ending in .md, whose Markdown would replace the JSON."""
    if out.suffix.lower() == ".md":
        raise ValueError(
            f"--out {out} is the JSON report's path, and the Markdown report goes beside it as .md: give a .json "
            f"path, e.g. {out.with_suffix('.json')}"
        )
    return out, out.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ijepa_fast.cli.pretrain import known_failures, one_line
    from ijepa_fast.io.encoder import CheckpointMismatchError
    from ijepa_fast.io.outputs import check_file, check_folder, write_files

    try:
        paths = report_paths(Path(args.out)) if args.out else ()
    except ValueError as err:
        print(f"ijepa-eval: {err}", file=sys.stderr)
        return 2
    try:  # the reports' paths first: one that cannot be written costs no evaluation
        for path, what in zip(paths, (None, "the Markdown report")):
            check_file(path, "--out", what)
        if not args.out:
            check_folder(Path("."), "--out")  # the default --out is in the current folder
        report = run(args)
        json_out, md_out = report_paths(Path(args.out or f"eval-{Path(report['checkpoint']).stem}.json"))
        write_files(
            [
                (json_out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n")),
                (md_out, lambda tmp: tmp.write_text(markdown_report(report))),
            ]
        )
    except ConfigError as err:  # an option the checkpoint or the data cannot go with
        print(f"ijepa-eval: {err}", file=sys.stderr)
        return 2
    except (*known_failures(), CheckpointMismatchError, KeyError, ImportError) as err:
        print(f"ijepa-eval: {one_line(err)}", file=sys.stderr)
        return 1
    data = report["data"]
    print(
        f"{report['encoder']}, {report['weights']} weights ({report['format']} checkpoint), at "
        f"{report['img_size']} px, {report['features']} features [{report['feature_dim']}], "
        f"{data['n_train']} train / {data['n_test']} test; "
        f"undecodable images replaced: {data['replaced_train']} train / {data['replaced_test']} test"
    )
    for r in report["results"]:
        print(f"{r['head']} top-1: {100 * r['top1']:.2f}%  ({r['train_labels']}: {r['n_train']} train images)")
    print(f"report: {json_out} and {md_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
