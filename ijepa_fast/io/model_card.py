"""The model card (``README.md``) of a Hugging Face export: architecture, which encoder, where the
weights come from, the training config, the evaluation reports found in the run folder, the license,
and how to load the folder with transformers, with this package and with torch.hub.

An export is shared, so the card holds no local path: a path in the training config is shown by its
last component only (``<local>/NAME``), and a report is shown by its numbers and file name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ijepa_fast.io.encoder import EncoderSpec, weights_label
from ijepa_fast.models.vit import VIT_SIZES

log = logging.getLogger(__name__)

PROJECT_LICENSE = "mit"  # the project's LICENSE; weights trained with it are the user's, shared under it here
AUTHORS_LICENSE = "cc-by-nc-4.0"  # the authors' released I-JEPA weights
WHICH_TEXT = {
    "target": "the **target encoder**: the exponential moving average of the context encoder, what the I-JEPA "
    "paper evaluates and what this package evaluates by default",
    "context": "the **context encoder**: the encoder the predictor reads during training (the one Hugging Face's "
    "and timm's converters of the authors' checkpoints take)",
}
DEMO_REPORT, EVAL_REPORT_GLOB = "probe.json", "eval*.json"
NO_REPORT = "No evaluation report was found in the run folder (`ijepa-eval RUN --data DIR --out RUN/eval.json`)."


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The run folder of one of our checkpoints (``RUN/checkpoints/ckpt-*.pt``), or None."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name == "checkpoints" else None


def find_eval_reports(run_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(file name, report) of the demo's ``probe.json`` and ``ijepa-eval``'s ``eval*.json`` in ``run_dir``;
    a file that does not parse is skipped with a warning naming it."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found = []
    for path in [run_dir / DEMO_REPORT, *sorted(run_dir.glob(EVAL_REPORT_GLOB))]:
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("model card: %s is not a readable report (%s); left out", path.name, err)
            continue
        if isinstance(report, dict):
            found.append((path.name, report))
    return found


def _no_local_paths(value: Any) -> Any:
    """``value`` with every absolute path (or ``~`` path) replaced by ``<local>/`` and its last component."""
    if isinstance(value, Mapping):
        return {k: _no_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_local_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return f"<local>/{Path(value).name}" if Path(value).name else "<local>"
    return value


def _size_name(spec: EncoderSpec) -> str:
    """The size's name (``vit_tiny``), with its blocks when fewer or more than the size's, or ``custom``."""
    if spec.name:
        return spec.name
    for name, size in VIT_SIZES.items():
        if (size.embed_dim, size.num_heads) == (spec.embed_dim, spec.num_heads):
            return f"{name} ({spec.depth} blocks)"
    return "custom"


def _report_section(name: str, report: Mapping[str, Any]) -> list[str]:
    """A report as Markdown: the demo's (features -> probe, kNN, RankMe) or ijepa-eval's (one row per head)."""
    if "top1_percent" in report:  # the demo's probe.json
        lines = [
            f"`{name}` (the demo's probe: {report.get('train_images')} train / {report.get('test_images')} test "
            "images, frozen average-pooled features):",
            "",
            "| features | linear probe top-1 % | kNN top-1 % | RankMe |",
            "|---|---:|---:|---:|",
        ]
        ranks = report.get("rankme", {})
        for row, top1 in report["top1_percent"].items():
            rank = ranks.get(row)
            rank_text = f"{rank:.2f}" if isinstance(rank, (int, float)) else ""
            lines.append(f"| {row} | {top1['linear_probe']:.1f} | {top1['knn']:.1f} | {rank_text} |")
        return [*lines, ""]
    data = report.get("data", {})
    checkpoint = Path(str(report.get("checkpoint", ""))).name
    lines = [
        f"`{name}` (ijepa-eval of `{checkpoint}`, {report.get('weights', '?')} weights, {report.get('features')} "
        f"features at {report.get('img_size', '?')} px; {data.get('n_train')} train / {data.get('n_test')} test "
        f"images, {data.get('dataset')} data):",
        "",
        "| train labels | train images | head | top-1 % |",
        "|---|---:|---|---:|",
    ]
    for r in report.get("results", []):
        lines.append(f"| {r['train_labels']} | {r['n_train']} | {r['head']} | {100 * r['top1']:.2f} |")
    return [*lines, ""]


def _license(provenance: Mapping[str, Any]) -> tuple[str, str]:
    """(license id, sentence): the authors' weights keep their license; anything else is the project's."""
    if provenance.get("source_format") == "authors" or provenance.get("origin") == "authors":
        return AUTHORS_LICENSE, (
            "These weights are converted from the I-JEPA authors' released checkpoint, which they publish under "
            "CC BY-NC 4.0 (non-commercial); that license applies. The conversion code (ijepa_fast) is MIT."
        )
    return PROJECT_LICENSE, "MIT, as ijepa_fast (the code that trained and exported these weights)."


def model_card(
    spec: EncoderSpec,
    provenance: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    reports: list[tuple[str, dict[str, Any]]] | None = None,
) -> str:
    """The card's Markdown (YAML front matter first, as the Hugging Face Hub reads it)."""
    which = weights_label(str(provenance.get("which", "target_encoder")))
    license_id, license_text = _license(provenance)
    name = _size_name(spec)
    tokens = spec.grid * spec.grid
    size, _, blocks = name.partition(" (")  # "vit_tiny (2 blocks)" -> "vit_tiny/7 (2 blocks)"
    title = f"I-JEPA {size}/{spec.patch_size}{f' ({blocks}' if blocks else ''} {which} encoder"
    lines = [
        "---",
        f"license: {license_id}",
        "library_name: transformers",
        "pipeline_tag: image-feature-extraction",
        "tags: [ijepa, self-supervised, vision-transformer, ijepa_fast]",
        "---",
        "",
        f"# {title}",
        "",
        "An image encoder pretrained with I-JEPA (Assran et al., CVPR 2023: predict the representations of "
        "target blocks of an image from one context block), exported by ijepa_fast as a Hugging Face "
        "`IJepaModel` folder.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| model | Vision Transformer {name}, no class token |",
        f"| width, depth, heads | {spec.embed_dim}, {spec.depth} blocks, {spec.num_heads} heads |",
        f"| MLP | hidden {int(spec.embed_dim * spec.mlp_ratio)} (ratio {spec.mlp_ratio:g}), exact GELU |",
        f"| patch, image size | {spec.patch_size} px patches, trained at {spec.img_size} px "
        f"({spec.grid}x{spec.grid} = {tokens} tokens) |",
        "| position embeddings | fixed 2-D sin-cos; other image sizes interpolate them (bicubic) |",
        "| output | the final LayerNorm's patch tokens [B, tokens, width]; their average is the paper's "
        "linear-probe feature |",
        "",
        "## Which encoder",
        "",
        f"This folder holds {WHICH_TEXT.get(which, which)}.",
        "",
        "## Source",
        "",
        f"Exported from the {provenance.get('source_format', 'unknown')} checkpoint `{provenance.get('source', '?')}`"
        + "".join(f", {k} {provenance[k]}" for k in ("epoch", "step") if k in provenance)
        + ".",
        "",
        "## Training config",
        "",
    ]
    if config:
        lines += ["```yaml", yaml.safe_dump(_no_local_paths(dict(config)), sort_keys=False).rstrip(), "```", ""]
    else:
        lines += ["The checkpoint records no training config (the authors' keep it in a separate YAML file).", ""]
    lines += ["## Evaluation", ""]
    if reports:
        for report_name, report in reports:
            lines += _report_section(report_name, report)
    else:
        lines += [NO_REPORT, ""]
    lines += [*_how_to_load(spec, which), "## License", "", license_text, ""]
    return "\n".join(lines)


def _how_to_load(spec: EncoderSpec, which: str) -> list[str]:
    from ijepa_fast.io.hub import HUB_ENTRIES

    entry = next((name for name, e in HUB_ENTRIES.items() if e.fits(spec)), "ijepa_encoder")
    return [
        "## How to load",
        "",
        "With transformers:",
        "",
        "```python",
        "from transformers import IJepaModel",
        "",
        'model = IJepaModel.from_pretrained("path/to/this/folder").eval()',
        "tokens = model(pixel_values=images).last_hidden_state  # [B, tokens, width]",
        "features = tokens.mean(1)  # what the paper's linear probe reads",
        "# at another image size (a multiple of the patch): interpolated position embeddings",
        "tokens = model(pixel_values=larger_images, interpolate_pos_encoding=True).last_hidden_state",
        "```",
        "",
        "With ijepa_fast (`pip install -e .` in its checkout):",
        "",
        "```python",
        "from ijepa_fast.io.load import load_encoder",
        "",
        'encoder = load_encoder("path/to/this/folder").encoder.eval()',
        "tokens = encoder(images)  # [B, 3, H, W] -> [B, tokens, width]",
        "",
        "import torch",
        "",
        f'encoder = torch.hub.load("path/to/ijepa_fast", "{entry}", source="local", weights="path/to/this/folder")',
        "```",
        "",
        f"or from the command line: `ijepa-eval path/to/this/folder --data DIR` (linear probe and kNN of the "
        f"{which} encoder; `--img-size N` evaluates at N px).",
        "",
        "Inputs: RGB images scaled to [0, 1] and normalised with the ImageNet mean and std "
        "(`preprocessor_config.json`).",
        "",
    ]
