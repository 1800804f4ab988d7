"""The Markdown report that ``ijepa-eval`` and ``ijepa-finetune`` share: a table of what was evaluated
(rows the caller gives), then one row per (training labels, head) with its top-1."""

from __future__ import annotations

from typing import Any

from ijepa_fast.io.encoder import weights_label

_WEIGHTS = {"target": "target (the EMA encoder)", "context": "context"}


def loaded_fields(loaded) -> dict[str, Any]:
    """What a report says of a loaded encoder (``io.load.load_encoder``'s result): its file, format,
    which encoder of it, and its architecture."""
    spec = loaded.spec
    return {
        "checkpoint": str(loaded.path),
        "format": loaded.format,
        "which": loaded.which,
        "weights": weights_label(loaded.which),
        "encoder": f"{spec.name or 'custom'}: width {spec.embed_dim}, depth {spec.depth}, {spec.num_heads} heads, "
        f"patch {spec.patch_size}, {spec.img_size} px",
    }


def weights_text(report: dict[str, Any]) -> str:
    """Which encoder a report's numbers are of, in words."""
    return _WEIGHTS.get(report["weights"], report["weights"])


def data_text(data: dict[str, Any]) -> str:
    """Where the train and test images came from, and how many."""
    return (
        f"{data['root']} ({data['dataset']}): {data['n_train']} train images ({data['train_split']}), "
        f"{data['n_test']} test images ({data['test_split']})"
    )


def markdown(title: str, report: dict[str, Any], rows: list[tuple[str, str]]) -> str:
    """``# title``, the (name, text) ``rows`` then device and date, then the results table."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {text} |" for name, text in rows]
    lines += [
        f"| device | {report['device']}, {report['dtype']}, torch {report['torch']} |",
        f"| date | {report['date']} |",
        "",
        "| train labels | train images | head | pooling | top-1 |",
        "|---|---:|---|---|---:|",
    ]
    lines += [
        f"| {r['train_labels']} | {r['n_train']} | {r['head']} | {r['pooling']} | {100 * r['top1']:.2f}% |"
        for r in report["results"]
    ]
    return "\n".join(lines) + "\n"
