"""The summary ``make gpu-check`` prints last, merged over every stage that has run: each stage's
device, date and commit; each part's status and key figure; the steps' images/s, MFU and GPU-hours
beside the paper; for each step row with a phase split, the step model's predicted milliseconds per
phase beside the measured ones (``ijepa_fast.models.step_model``: where the model is wrong); the
kernels against the roofline of the measured copy bandwidth.

    python -m profiling.gpu_summary RESULTS_DIR [--detail STAGE] [--full-to FILE]

RESULTS_DIR holds one folder per stage (profiling/gpu_check.sh writes them): ``status.tsv`` (one
``part<TAB>status<TAB>seconds`` line per part), ``about.tsv`` (``key<TAB>value`` lines: stage,
started, device, date, commit, seconds) and the JSON and log each part wrote as ``<part>.json`` and
``<part>.log``. Stages are shown in the order they ran; ``--detail STAGE`` keeps the step and
kernel tables of that stage only. A part without JSON, or with JSON this
module cannot read, gets a row without figures: the summary never fails for want of a result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ijepa_fast.bench.predict import predicted_vs_measured
from ijepa_fast.bench.sources import default_config

KERNEL_PARTS = ("masked_gather", "ema")


def read_json(path: Path) -> dict | None:
    """The JSON object at ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_step_result(data: dict | None) -> bool:
    """An ijepa-bench result (``ijepa_fast.bench.measure.run``): rows of configurations and a spec in its meta."""
    return bool(data) and "rows" in data and "spec" in data.get("meta", {})


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


# ----------------------------------------------------------------------------------------- one line per part


def key_figure(out_dir: Path, part: str) -> str:
    """The one-line result of ``part`` for the parts table."""
    if part.startswith("pytest"):
        return pytest_tally(out_dir / f"{part}.log")
    data = read_json(out_dir / f"{part}.json")
    if data is None:
        return ""
    if is_step_result(data):
        return step_figure(data)
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return ""
    first = rows[0]
    if "vs_authors" in first:
        return kernel_figure(rows)
    if "tokens" in first and "method" in first:
        return attention_figure(rows)
    if "loader" in first and "images_per_s" in first:
        return data_figure(rows)
    if "efficiency" in first and "stage" in first:
        return scaling_figure(rows)
    return f"{len(rows)} rows"


def pytest_tally(log: Path) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 40.1s"), without its decoration."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if " in " in line and any(w in line for w in ("passed", "failed", "error", "skipped", "deselected")):
            return line.strip(" =")
    return ""


def step_figure(data: dict) -> str:
    rows = {r["name"]: r for r in data["rows"] if r.get("ok")}
    fast, authors = rows.get(default_config().name), rows.get("authors")
    bits = []
    if fast:
        mem = f", peak {fast['peak_mem_gib']:.1f} GiB" if fast.get("peak_mem_gib") is not None else ""
        bits.append(f"default {fast['images_per_s']:.1f} img/s, MFU {_pct(fast.get('mfu'))}{mem}")
    if authors:
        bits.append(f"authors {authors['images_per_s']:.1f} img/s")
    if fast and authors:
        bits.append(f"x{fast['images_per_s'] / authors['images_per_s']:.2f}")
    failed = [r["name"] for r in data["rows"] if not r.get("ok")]
    if failed:
        bits.append(f"failed: {', '.join(failed)}")
    return "; ".join(bits)


def kernel_figure(rows: list[dict]) -> str:
    kern = [r for r in rows if r.get("method") == "kernel"]
    if not kern:
        return ""
    x = [r["vs_authors"] for r in kern]
    bw = [r["pct_copy"] for r in kern]
    return f"kernel x{min(x):.2f}-{max(x):.2f} vs authors, {min(bw):.0f}-{max(bw):.0f}% of copy bandwidth"


def attention_figure(rows: list[dict]) -> str:
    """The fastest backend of each full-sequence case and of the ViT-H/14 predictor, against math."""
    bits = []
    for case in dict.fromkeys(r["case"] for r in rows):
        ok = [r for r in rows if r["case"] == case and r.get("ok")]
        ref = next((r for r in ok if r["method"] == "math"), None)
        if ok and ("target" in case or case.startswith("vith14 predictor")):
            best = min(ok, key=lambda r: r["median_ms"])
            vs = f" x{ref['median_ms'] / best['median_ms']:.1f} vs math" if ref else ""
            bits.append(f"{case.split(' (')[0]}: {best['method']}{vs}")
    return "; ".join(bits)


def scaling_figure(rows: list[dict]) -> str:
    """The modelled efficiency of each ZeRO stage at 16 GPUs (else the most GPUs modelled)."""
    gpus = 16 if any(r["gpus"] == 16 for r in rows) else max(r["gpus"] for r in rows)
    stages = ", ".join(
        f"{'FSDP2' if r['stage'] == 'fsdp2' else 'ZeRO-' + str(r['stage'])} {100 * r['efficiency']:.0f}%"
        for r in rows
        if r["gpus"] == gpus
    )
    return f"model, {gpus} GPUs: {stages}"


def data_figure(rows: list[dict]) -> str:
    best: dict[str, dict] = {}
    for r in rows:
        if r["images_per_s"] > best.get(r["loader"], {}).get("images_per_s", -1):
            best[r["loader"]] = r
    return "; ".join(f"{k} {r['images_per_s']:.0f} img/s ({r['workers']} workers)" for k, r in best.items())


# ----------------------------------------------------------------------------------------- sections


def last_line(log: Path, width: int = 150) -> str:
    """The last non-empty line of ``log`` (what a failed part said last), cut to ``width``."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:width].replace("|", "/") if lines else ""


def stage_dirs(root: Path) -> list[Path]:
    """The stage folders under ``root`` (those with a status.tsv), in the order they started."""
    found = [d for d in root.iterdir() if (d / "status.tsv").is_file()] if root.is_dir() else []

    def started(folder: Path) -> float:
        try:
            return float(read_about(folder).get("started", "inf"))
        except ValueError:
            return float("inf")

    return sorted(found, key=lambda d: (started(d), d.name))


def read_about(folder: Path) -> dict[str, str]:
    """A stage's ``about.tsv``: {key: value}; empty when missing."""
    try:
        lines = (folder / "about.tsv").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def read_status(folder: Path) -> list[tuple[str, str, str]]:
    """(part, status, seconds) of each line of a stage's status.tsv."""
    rows = []
    for line in (folder / "status.tsv").read_text().splitlines():
        cells = line.split("\t")
        if len(cells) >= 3:
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def stages_table(stages: list[Path]) -> list[str]:
    lines = ["| stage | device | date | commit | seconds |", "|---|---|---|---|---|"]
    for folder in stages:
        about = read_about(folder)
        cells = [about.get(k, "?") for k in ("device", "date", "commit", "seconds")]
        lines.append(f"| {folder.name} | {' | '.join(cells)} |")
    return lines


def plain_default_rate(stages: list[Path]) -> float | None:
    """Images/s of the plain engine's default configuration, from the first step result that has it."""
    for folder in stages:
        for part, _, _ in read_status(folder):
            data = read_json(folder / f"{part}.json")
            if is_step_result(data) and not part.startswith("deepspeed"):
                row = next((r for r in data["rows"] if r.get("ok") and r["name"] == default_config().name), None)
                if row:
                    return row["images_per_s"]
    return None


def parts_table(stages: list[Path]) -> list[str]:
    """One row per part of every stage: its status and seconds, its key figure (or, when it failed
    without one, the last line of its log); a DeepSpeed step also against the plain engine's."""
    plain = plain_default_rate(stages)
    lines = ["| stage | part | status | seconds | result |", "|---|---|---|---|---|"]
    for folder in stages:
        for part, status, secs in read_status(folder):
            result = key_figure(folder, part)
            if not result and status.startswith(("failed", "timeout")):
                result = last_line(folder / f"{part}.log")
            data = read_json(folder / f"{part}.json")
            if part.startswith("deepspeed") and plain and is_step_result(data):
                ok = [r for r in data["rows"] if r.get("ok")]
                row = next((r for r in ok if r["name"] == default_config().name), ok[0] if ok else None)
                if row:
                    result += f"; x{row['images_per_s'] / plain:.2f} the plain engine's default"
            lines.append(f"| {folder.name} | {part} | {status} | {secs} | {result} |")
    return lines


def step_section(part: str, data: dict) -> list[str]:
    """The configurations' images/s, speed-up over the authors' preset and MFU, then GPU-hours."""
    meta, spec = data["meta"], data["meta"]["spec"]
    peak = meta.get("peak_bf16_tflops")
    matmul = meta.get("matmul_bf16_tflops")
    ceilings = f"MFU against the bf16 datasheet peak, {peak:.0f} TFLOP/s" if peak else "no datasheet peak"
    if matmul:
        ceilings += f"; an 8192^3 matmul ran at {matmul:.0f}"
    lines = [
        f"{part}: {spec['model']}/{spec['patch']} at {spec['img']} px, batch {spec['batch']}, {meta['amp']} "
        f"· {meta['device']} ({ceilings})",
        "",
        "| configuration | images/s | x authors | MFU | step ms | attention |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if not r.get("ok"):
            error = " ".join(str(r.get("error", "?")).split()).replace("|", "/")[:100]
            lines.append(f"| {r['name']} | failed: {error} |  |  |  |  |")
            continue
        speedup = r.get("speedup_vs_authors")
        lines.append(
            f"| {r['name']} | {r['images_per_s']:.1f} | {f'{speedup:.2f}' if speedup else 'n/a'} "
            f"| {_pct(r.get('mfu'))} | {r['step_ms_median']:.1f} | {r.get('attention', '?')} |"
        )
    if data.get("projection"):
        lines += [
            "",
            "| run | images/s per GPU | basis | GPU-hours here | paper |",
            "|---|---|---|---|---|",
        ]
        for p in data["projection"]:
            paper = (
                f"< {p['paper_gpu_hours']:.0f} {p['paper_device']} GPU-hours "
                f"(>= {p['paper_images_per_s_per_gpu']:.0f} images/s per GPU)"
                if p.get("paper_gpu_hours")
                else "n/a"
            )
            lines.append(
                f"| {p['run']} | {p['images_per_s_per_gpu']:.1f} | {p['basis']} | {p['gpu_hours']:,.0f} | {paper} |"
            )
    return lines


def model_section(part: str, data: dict) -> list[str]:
    """The step model's prediction beside the measured phases of each row (none without a phase split);
    a model that cannot price a row says so in one line instead of failing the summary."""
    try:
        lines = predicted_vs_measured(data)
    except Exception as exc:  # a result of an older or newer config: the summary still prints
        return [f"{part}: step model: failed: {type(exc).__name__}: {exc}"]
    return [f"{part}: " + lines[0], *lines[1:]] if lines else []


def kernel_section(stages: list[Path]) -> list[str]:
    """Each kernel case: the kernel's time beside its roofline (its bytes, read once and written
    once, at the copy bandwidth measured in the same run) and its speed-up over the authors' ops."""
    lines = []
    for folder in stages:
        for part in KERNEL_PARTS:
            data = read_json(folder / f"{part}.json")
            rows = [r for r in (data or {}).get("rows", []) if isinstance(r, dict) and r.get("method") == "kernel"]
            copy = (data or {}).get("meta", {}).get("copy_bandwidth_gb_s")
            if not rows or not copy:
                continue
            if not lines:
                lines += [
                    "Kernels against the roofline of the measured copy bandwidth:",
                    "",
                    "| kernel | case | ms | roofline ms | % of roofline | x authors |",
                    "|---|---|---|---|---|---|",
                ]
            for r in rows:
                roofline_ms = r["bytes"] / (copy * 1e9) * 1e3
                lines.append(
                    f"| {part} | {r['case']} | {r['median_ms']:.4f} | {roofline_ms:.4f} "
                    f"| {100 * roofline_ms / r['median_ms']:.0f} | {r['vs_authors']:.2f} |"
                )
    return lines


def summary(root: str | Path, detail: str | None = None) -> str:
    """The summary over the stage folders under ``root``: the stages, the parts table, each step
    result of several configurations, the kernels; the last two for stage ``detail`` alone when
    given (what a device call's reply has room for)."""
    stages = stage_dirs(Path(root))
    sections = [stages_table(stages), parts_table(stages)]
    if detail is not None:
        stages = [folder for folder in stages if folder.name == detail]
    for folder in stages:
        for part, _, _ in read_status(folder):
            data = read_json(folder / f"{part}.json")
            if is_step_result(data) and len(data["rows"]) > 1:
                sections.append(step_section(f"{folder.name}/{part}", data))
            if is_step_result(data) and data["meta"].get("device_type") == "cuda":  # the model is a GPU's
                sections.append(model_section(f"{folder.name}/{part}", data))
    kernels = kernel_section(stages)
    if kernels:
        sections.append(kernels)
    return "\n\n".join("\n".join(s) for s in sections if s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="the folder of stage folders")
    p.add_argument("--detail", default=None, metavar="STAGE", help="step and kernel tables of this stage only")
    p.add_argument(
        "--full-to", type=Path, default=None, metavar="FILE", help="also write the summary of every stage in full here"
    )
    args = p.parse_args(argv)
    if args.full_to is not None:  # one process for both: each start imports torch, seconds of a device lease
        args.full_to.write_text(summary(args.results) + "\n")
    print(summary(args.results, args.detail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
