"""The outputs of a run: the Markdown report (printed, or appended to a RESULTS.md-style file with
device, date, commit and the exact command), the JSON (rewritten atomically) and the PNG plots;
each file is written whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ijepa_fast.bench.timing import PHASES
from ijepa_fast.io.outputs import write_files


def _f(x, fmt: str = ".1f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def markdown_report(result: dict) -> str:
    """The report: a header with device, date, commit and command, then throughput, phases, GPU-hours."""
    meta, rows = result["meta"], result["rows"]
    spec = meta["spec"]
    ok = [r for r in rows if r.get("ok")]
    lines = [
        f"### {spec['model']}/{spec['patch']} at {spec['img']} px, batch {spec['batch']} · {meta['device']} "
        f"· {meta['date']}",
        "",
        f"- device: {meta['device']} (bf16 peak {_f(meta['peak_bf16_tflops'], '.0f')} TFLOP/s datasheet"
        f", {_f(meta['matmul_bf16_tflops'], '.0f')} measured 8192^3 matmul); torch {meta['torch']}",
        f"- commit: `{meta['commit']}`; command: `{meta['command']}`",
        f"- autocast: {meta['amp']} ({meta.get('amp_reason', 'reason not recorded')}); data: {meta['loader']}; "
        f"predictor depth {meta['pred_depth']}; "
        f"steps: {spec['warmup']} warm-up, {spec['steps']} timed, {spec['phase_steps']} phase-split",
    ]
    if ok:
        r0 = ok[0]
        lines.append(
            f"- masks (timed batches): M = {r0['num_pred_masks']}, mean Kc = {r0['mean_kc']:.1f}, "
            f"mean Kt = {r0['mean_kt']:.1f}; {r0['gflop_per_image']:.3g} GFLOP per image "
            f"(ijepa_fast.models.flops)"
        )
    lines += [
        "",
        "| configuration | images/s | x authors | step ms median (p20-p80) | patch tokens/s | TFLOP/s "
        "| MFU | peak mem GiB | attention |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        if not r.get("ok"):
            err = " ".join(str(r.get("error", "?")).split()).replace("|", "/")[:200]
            lines.append(f"| {r['name']} | failed: {err} |  |  |  |  |  |  |  |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(
            f"| {r['name']} | {r['images_per_s']:.1f} | {_f(r.get('speedup_vs_authors'), '.2f')} "
            f"| {r['step_ms_median']:.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f}) "
            f"| {r['tokens_per_s']:.0f} | {r['tflops']:.2f} | {mfu} | {_f(r.get('peak_mem_gib'), '.1f')} "
            f"| {r.get('attention', '?')} |"
        )
    phased = [r for r in ok if r.get("phases_ms")]
    if phased:
        lines += [
            "",
            "Phase split, ms (median of the phase-split steps; "
            + ("CUDA events" if meta["device_type"] == "cuda" else "perf_counter")
            + "):",
            "",
            "| configuration | " + " | ".join(PHASES) + " | sum | plain step | phases/step |",
            "|" + "---|" * (len(PHASES) + 4),
        ]
        for r in phased:
            cells = " | ".join(_f(r["phases_ms"].get(p), ".2f", "-") for p in PHASES)
            lines.append(
                f"| {r['name']} | {cells} | {r['phases_total_ms']:.1f} | {r['step_ms_median']:.1f} "
                f"| {r['phases_over_step']:.2f} |"
            )
    if result.get("projection"):
        lines += [
            "",
            "GPU-hours (one GPU's rate times the GPUs, perfect scaling):",
            "",
            "| run | images/s per GPU | basis | GPU-hours (ours, device) | paper |",
            "|---|---|---|---|---|",
        ]
        for p in result["projection"]:
            paper = (
                (
                    f"< {p['paper_gpu_hours']:.0f} {p['paper_device']} GPU-hours "
                    f"(>= {p['paper_images_per_s_per_gpu']:.0f} images/s per GPU)"
                )
                if p["paper_gpu_hours"]
                else "n/a"
            )
            lines.append(
                f"| {p['run']} | {p['images_per_s_per_gpu']:.1f} | {p['basis']} "
                f"| {p['gpu_hours']:,.0f} ({p['device']}) | {paper} |"
            )
    return "\n".join(lines) + "\n"


def record(result: dict, path: str | Path) -> Path:
    """Append the report to a RESULTS.md-style file (created if missing, e.g. a file to append later).
    The file is rewritten whole, atomically: a full disk leaves it as it was, never cut mid-report."""
    path = Path(path)
    before = path.read_text() if path.exists() else ""
    write_files([(path, lambda tmp: tmp.write_text(before + "\n" + markdown_report(result)))])
    return path


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    write_files([(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2, default=str)))])
    return path


def write_plots(result: dict, out_dir: str | Path, prefix: str = "bench") -> list[Path]:
    """``<prefix>_throughput.png`` (images/s per configuration) and ``<prefix>_phases.png`` (phase
    split, stacked); [] when matplotlib is not installed."""
    from ijepa_fast.runtime.optional import available

    if not available("matplotlib"):
        return []
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result["rows"] if r.get("ok")]
    if not ok:
        return []
    title = (
        f"{result['meta']['spec']['model']}/{result['meta']['spec']['patch']} "
        f"{result['meta']['spec']['img']}px b{result['meta']['spec']['batch']} · {result['meta']['device']}"
    )
    names = [r["name"] for r in ok]
    paths = []

    fig = Figure(figsize=(8, 0.5 * len(ok) + 1.5))
    ax = fig.add_subplot()
    ips = [r["images_per_s"] for r in ok]
    bars = ax.barh(names, ips, color="tab:blue")
    for bar, r in zip(bars, ok):
        speedup = r.get("speedup_vs_authors")
        label = f"{r['images_per_s']:.1f}" + (f"  x{speedup:.2f}" if speedup else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(ips) * 1.3)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_throughput.png")
    write_files([(paths[-1], lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))])

    phased = [r for r in ok if r.get("phases_ms")]
    if phased:
        fig = Figure(figsize=(8, 0.5 * len(phased) + 2))
        ax = fig.add_subplot()
        left = [0.0] * len(phased)
        for p in PHASES:
            vals = [r["phases_ms"].get(p, 0.0) for r in phased]
            if any(vals):
                ax.barh([r["name"] for r in phased], vals, left=left, label=p)
                left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title("phase split · " + title, fontsize=9)
        ax.legend(
            fontsize=7,
            ncol=len(PHASES),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12 - 0.3 / len(phased)),
            frameon=False,
            handlelength=1.0,
            columnspacing=0.8,
        )
        paths.append(out_dir / f"{prefix}_phases.png")
        write_files([(paths[-1], lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))])
    return paths


# ----------------------------------------------------------------------------------------- provenance


def git_commit(repo: Path | None = None) -> str:
    """``IJEPA_COMMIT`` if set (a copy without .git), else ``git rev-parse --short HEAD`` (+ "-dirty")."""
    if os.environ.get("IJEPA_COMMIT"):
        return os.environ["IJEPA_COMMIT"]
    cwd = str(repo or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_command(argv: list[str] | None = None) -> str:
    """The command line as typed (``argv``: the arguments given to ``main``, when not sys.argv's)."""
    argv = sys.argv[:] if argv is None else ["ijepa-bench", *argv]
    prog = Path(argv[0]).name if argv else "ijepa-bench"
    if prog in ("__main__.py", "bench.py"):
        prog = "python -m ijepa_fast.cli.bench"
    elif prog == "bench_step.py":
        prog = "python -m profiling.bench_step"
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])
