"""Profiling harness for the training step: throughput, MFU, phase split, ablation, GPU-hours.

    ijepa-bench [--config FILE] [section.key=value ...] [--ablation] [--out DIR] [--record]
    python -m profiling.bench_step ...   (the same CLI)

The run is described by the training ``Config`` itself (its defaults are the paper's ViT-H/14 at
224 px, batch 128 per GPU), from ``--config`` and ``section.key=value`` overrides, exactly as
``ijepa-pretrain`` reads it. Each row builds the step ``ijepa-pretrain`` runs and times ``--steps``
optimizer steps after ``--warmup`` untimed ones, then ``--phase-steps`` phase-split steps;
``--loader`` picks synthetic batches or the real loaders; ``--ablation`` runs the ``authors``
preset, each optimisation alone from it, then all on; ``--model-step`` prints the step model's
predicted milliseconds per phase on an H100 (``ijepa_fast.models.step_model``) and measures nothing.
The report (printed; appended to ``profiling/RESULTS.md`` with ``--record``), JSON and PNG plots
(``--out DIR``) and a Chrome trace (``--trace PATH``) are written by the library, ``ijepa_fast.bench``,
whose modules say what is measured and how; this module is the argument parsing and ``main``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ijepa_fast import config as config_mod
from ijepa_fast.bench.measure import run
from ijepa_fast.bench.report import current_command, markdown_report, record, write_json, write_plots
from ijepa_fast.bench.sources import check_loader_data, select_configs, spec_from_args
from ijepa_fast.bench.timing import device_name
from ijepa_fast.cli.args import command_parser
from ijepa_fast.config import ConfigError
from ijepa_fast.io.outputs import check_file, check_folder
from ijepa_fast.runtime.device import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = command_parser("ijepa-bench", __doc__.split("\n\n")[0] + "\n\n" + config_mod.describe())
    p.add_argument(
        "--config", default="", help="YAML config (ours or the authors'); default: ViT-H/14, 224 px, batch 128"
    )
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides for every row")
    p.add_argument(
        "--set",
        dest="more_overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="one more override",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (at least one per synthetic batch)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    p.add_argument("--phase-steps", type=int, default=5, help="phase-split steps per configuration (0: none)")
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic micro-batches, used in turn")
    p.add_argument(
        "--loader", default="synthetic", choices=("synthetic", "pytorch", "dali"), help="real loaders read data.root"
    )
    p.add_argument("--ablation", action="store_true", help="authors, each switch alone, all on")
    p.add_argument(
        "--model-step",
        action="store_true",
        help="print the step model's predicted ms per phase on an H100, the default and each switch; measure nothing",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these rows (names as in the table; 'authors', 'all on (default)', ...)",
    )
    p.add_argument("--compare-authors", action="store_true", help="the authors' preset and the default only")
    p.add_argument(
        "--compile-on-cpu",
        action="store_true",
        help="on a CPU, compile the default and keep --ablation's 'compile off' row",
    )
    p.add_argument("--out", default="", help="folder for <tag>.json and the PNG plots")
    p.add_argument(
        "--device-label",
        default="",
        help="name the device in the report (e.g. '2-core CPU (dev machine)'); default: the driver's name",
    )
    p.add_argument("--tag", default="", help="file name stem in --out (default: step_<model>_<patch>_<img>)")
    p.add_argument("--json", default="", help="JSON path (default: <out>/<tag>.json when --out is given)")
    p.add_argument(
        "--record",
        nargs="?",
        const="profiling/RESULTS.md",
        default=None,
        metavar="PATH",
        help="append the Markdown report to PATH (default profiling/RESULTS.md)",
    )
    p.add_argument(
        "--trace",
        default="",
        help="Chrome trace of phase-labelled steps of the default configuration "
        "(or of the last one run when the default is not among them); .json or .json.gz",
    )
    p.add_argument("--trace-steps", type=int, default=2)
    return p.parse_intermixed_args(argv)


def run_cli(argv: list[str] | None = None) -> dict:
    """The command line's work; returns the result (``main`` is the console entry point)."""
    args = parse_args(argv)
    if args.model_step:
        from ijepa_fast.bench.predict import model_table

        print(model_table(spec_from_args(args).config_for({})), flush=True)
        return {"rows": []}
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    spec = spec_from_args(args)
    shape = spec.describe()  # loads the config: an error there ends the command before anything runs
    tag = args.tag or f"step_{shape['model']}_{shape['patch']}_{shape['img']}"
    json_path = args.json or (str(Path(args.out) / f"{tag}.json") if args.out else "")
    check_outputs(args, json_path)  # the cheap checks first: a bad path or data root costs no measurement
    if spec.loader != "synthetic":
        check_loader_data(spec.config_for({}))
    device = resolve_device(shape["device"])
    configs = select_configs(args, device)

    def on_row(result: dict, row: dict) -> None:
        status = (
            f"{row['images_per_s']:.1f} images/s, step {row['step_ms_median']:.1f} ms"
            if row.get("ok")
            else f"failed: {row.get('error')}"
        )
        print(f"[ijepa-bench] {row['name']}: {status}", flush=True)
        if json_path:
            write_json(result, json_path)

    label = f"{shape['model']}/{shape['patch']} at {shape['img']} px, batch {shape['batch']}"
    accum = f" x {shape['grad_accum']} accumulation" if shape["grad_accum"] > 1 else ""
    print(f"[ijepa-bench] {label}{accum} on {device_name(device)}: {len(configs)} configuration(s)", flush=True)
    result = run(spec, configs, on_row, device_label=args.device_label, command=current_command(argv))
    print()
    print(markdown_report(result), flush=True)  # before the files: a write that fails loses no measurement
    if args.out:
        result["plots"] = [str(p) for p in write_plots(result, args.out, tag)]
    if json_path:
        write_json(result, json_path)
    if args.record:
        print(f"[ijepa-bench] appended to {record(result, args.record)}")
    return result


def check_outputs(args: argparse.Namespace, json_path: str) -> None:
    """Refuse, before any measurement, an output path the run could not write at its end."""
    if args.out:
        check_folder(args.out, "--out")
    if json_path:
        check_file(json_path, "--json" if args.json else "--out", what=None if args.json else "the JSON report")
    if args.record:
        check_file(args.record, "--record")
    if args.trace:
        check_file(args.trace, "--trace")


def main(argv: list[str] | None = None) -> int:
    """``ijepa-bench``: exit status 0 when every configuration ran, 1 otherwise (or an error, named in
    one line: 2 for the config or command line, 1 for a file, folder or the data)."""
    from ijepa_fast.cli.pretrain import known_failures, one_line

    try:
        result = run_cli(argv)
    except ConfigError as err:
        print(f"ijepa-bench: config error: {err}", file=sys.stderr)
        return 2
    except known_failures() as err:
        print(f"ijepa-bench: {one_line(err)}", file=sys.stderr)
        return 1
    return 0 if all(r.get("ok") for r in result["rows"]) else 1  # --model-step: no rows, 0


if __name__ == "__main__":
    sys.exit(main())
