"""``ijepa-export`` (one encoder of a checkpoint to safetensors, timm or Hugging Face) and
``ijepa-extract`` (frozen features of a dataset to a file)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ijepa_fast.cli.args import (
    add_checkpoint_args,
    add_data_args,
    check_data_args,
    command_parser,
    eval_img_size,
    load_from_args,
    num_workers,
    open_eval_dataset,
)
from ijepa_fast.cli.args import resolve_device as resolve_cli_device
from ijepa_fast.cli.pretrain import known_failures, one_line
from ijepa_fast.io.encoder import weights_label
from ijepa_fast.io.hf import check_export_folder, export_hf
from ijepa_fast.io.outputs import check_file, check_folder, write_files
from ijepa_fast.io.safetensors_timm import (
    TIMM_GAP_MODEL,
    _safetensors_torch,
    export_safetensors,
    save_safetensors,
    timm_kwargs,
    to_timm_state_dict,
)
from ijepa_fast.models.vit import VisionTransformer
from ijepa_fast.runtime.errors import ConfigError

EXPORT_HELP = """\
Export one encoder of a checkpoint:
  --out FILE.safetensors         our (the authors') parameter names and the architecture as metadata
  --out FILE.safetensors --timm  timm's names, for timm.create_model("vit_base_patch16_gap_224",
                                 **timm_kwargs) with the kwargs printed and stored in the file (a
                                 vit_*_gap model: no class token, average pooling, no fc_norm)
  --hf DIR                       a Hugging Face transformers IJepaModel folder: config.json,
                                 model.safetensors, preprocessor_config.json

Which encoder: --which target (default; the EMA encoder, what the paper evaluates) or --which
context. The Hugging Face and timm converters of the authors' checkpoints take the CONTEXT encoder
('encoder'), so an export of the target encoder differs from their published weights. The export
records which one it holds: 'which' and 'weights' in its metadata (for --hf, also under
'ijepa_fast' in config.json).
"""


def export_main(argv: list[str] | None = None) -> int:
    """``ijepa-export CHECKPOINT (--out encoder.safetensors [--timm] | --hf DIR) [--which target|context]``."""
    p = command_parser("ijepa-export", EXPORT_HELP)
    add_checkpoint_args(p)
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="output .safetensors file")
    dest.add_argument(
        "--hf",
        metavar="DIR",
        help="output folder for Hugging Face transformers (IJepaModel): new, empty, or an earlier --hf export",
    )
    p.add_argument("--timm", action="store_true", help="with --out: timm's names; prints timm's constructor kwargs")
    args = p.parse_args(argv)
    if args.timm and args.hf:
        p.error("--timm goes with --out FILE, not with --hf")
    try:  # the destination first: a path that cannot be written costs no checkpoint loading
        if args.hf:
            check_export_folder(check_folder(args.hf, "--hf"))
        else:
            check_file(args.out, "--out")
        loaded = load_from_args(args)
        meta = {
            "source": Path(loaded.path).name,  # not the path: an export is shared, the local folders stay private
            "source_format": loaded.format,
            "which": loaded.which,
            "weights": weights_label(loaded.which),
        }
        if args.hf:
            export_hf(loaded.encoder, args.hf, meta, card=_card(loaded, meta))
        elif args.timm:
            _export_timm(loaded.encoder, args.out, meta)
        else:
            export_safetensors(loaded.encoder, args.out, meta)
    except ConfigError as err:  # an option the checkpoint cannot go with
        print(f"ijepa-export: {err}", file=sys.stderr)
        return 2
    except (*known_failures(), KeyError, RuntimeError, ImportError) as err:
        print(f"ijepa-export: {one_line(err)}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.hf or args.out} ({loaded.spec.name or 'custom'}, {weights_label(loaded.which)} encoder, "
        f"from a {loaded.format} checkpoint)"
    )
    return 0


def _card(loaded, meta: dict[str, str]) -> str:
    """The export's model card: the checkpoint's training config, and the eval reports of its run folder."""
    from ijepa_fast.io.model_card import find_eval_reports, model_card, run_folder_of

    provenance = {**meta, **{k: loaded.meta[k] for k in ("epoch", "step") if k in loaded.meta}}
    if loaded.format == "hf" and loaded.meta.get("source_format", "authors") == "authors":
        provenance["origin"] = "authors"  # a published facebook/ijepa_* folder, or our export of the authors' weights
    run_dir = run_folder_of(loaded.path) if loaded.format == "ijepa_fast" else None
    return model_card(loaded.spec, provenance, loaded.config, find_eval_reports(run_dir))


def _export_timm(encoder: VisionTransformer, out: str, meta: dict[str, str]) -> None:
    """timm's names; the metadata name the model and kwargs to build (LayerNorm eps and GELU are timm's defaults)."""
    _safetensors_torch("exporting to safetensors")
    kwargs = {k: v for k, v in timm_kwargs(encoder).items() if k not in ("norm_layer", "act_layer")}
    meta = {**meta, "format": "timm-vit", "timm_model": TIMM_GAP_MODEL, "timm_kwargs": json.dumps(kwargs)}
    tensors = {k: v.contiguous() for k, v in to_timm_state_dict(encoder).items()}
    write_files([(out, lambda tmp: save_safetensors(tensors, tmp, meta))])
    print(f"timm kwargs: {json.dumps(kwargs)}")
    print(f"timm: timm.create_model({TIMM_GAP_MODEL!r}, pretrained=False, **timm_kwargs), then load_state_dict")


def extract_main(argv: list[str] | None = None) -> int:
    """``ijepa-extract CHECKPOINT --data ROOT --out feats.npy|feats.safetensors``."""
    from ijepa_fast.eval.features import FEATURE_MODES, extract_features

    p = command_parser(
        "ijepa-extract",
        "Write frozen features of a dataset (and its labels) to .npy (labels beside it as <stem>.labels.npy) "
        "or .safetensors (tensors 'features' and 'labels').",
        formatter_class=argparse.HelpFormatter,
    )
    add_checkpoint_args(p)
    add_data_args(p)
    p.add_argument("--split", default="", help="idx: train|test (default train); folder: a sub-folder or '' for root")
    p.add_argument("--features", default="avgpool", choices=FEATURE_MODES)
    p.add_argument("--out", required=True, help="output file: .npy or .safetensors")
    args = p.parse_args(argv)
    check_data_args(p, args)
    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        print(f"ijepa-extract: --out must end in .npy or .safetensors, got {out.name}", file=sys.stderr)
        return 2
    labels_out, names_out = _beside(out)
    try:  # the outputs first: a path that cannot be written costs no extraction
        check_file(out, "--out")
        if out.suffix == ".npy":
            check_file(labels_out, "--out", what="the labels file")
        if args.dataset == "folder":
            check_file(names_out, "--out", what="the paths file")
        device = resolve_cli_device(args.device)
        loaded = load_from_args(args)
        split = args.split or ("train" if args.dataset == "idx" else "")
        dataset = open_eval_dataset(args, split, eval_img_size(args, loaded.spec))
        feats, labels = extract_features(
            loaded.encoder.to(device),
            dataset,
            mode=args.features,
            batch_size=args.batch_size,
            num_workers=num_workers(args),
            dtype=args.dtype,
            progress=not args.no_progress,
            desc=f"features {split}",
        )
        files = _feature_files(args, out, loaded, split, feats, labels, dataset)
        write_files(list(files.items()))
    except ConfigError as err:  # an option the checkpoint cannot go with
        print(f"ijepa-extract: {err}", file=sys.stderr)
        return 2
    except (*known_failures(), KeyError, RuntimeError, ImportError) as err:
        print(f"ijepa-extract: {one_line(err)}", file=sys.stderr)
        return 1
    print(f"wrote {out}: features {tuple(feats.shape)}, labels {tuple(labels.shape)}")
    return 0


def _beside(out: Path) -> tuple[Path, Path]:
    """The labels (.npy output) and image paths (folders) files ``ijepa-extract`` writes beside ``out``."""
    return out.with_name(out.stem + ".labels.npy"), out.with_name(out.stem + ".paths.txt")


def _feature_files(args, out: Path, loaded, split: str, feats, labels, dataset) -> dict[Path, Callable[[Path], None]]:
    """What ``ijepa-extract`` writes: {path: write(temporary path)}, for ``write_files``."""
    files: dict[Path, Callable[[Path], None]] = {}
    if out.suffix == ".npy":
        files[out] = _npy_writer(feats.numpy())
        files[_beside(out)[0]] = _npy_writer(labels.numpy())
    else:
        meta = {"checkpoint": str(loaded.path), "which": loaded.which, "features": args.features, "split": split}
        meta["img_size"] = str(eval_img_size(args, loaded.spec))
        tensors = {"features": feats.contiguous(), "labels": labels.contiguous()}
        files[out] = lambda tmp: save_safetensors(tensors, tmp, meta)
    source = getattr(dataset, "source", None)
    if args.dataset == "folder" and hasattr(source, "describe"):  # image folders: the file of each row
        text = "".join(f"{source.describe(i)}\n" for i in range(len(labels)))
        files[_beside(out)[1]] = lambda tmp: tmp.write_text(text)
    return files


def _npy_writer(array) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        import numpy as np

        with open(tmp, "wb") as fh:  # a file object: given a name, np.save would add .npy to the temporary one
            np.save(fh, array)

    return write
