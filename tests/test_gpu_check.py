"""``make gpu-check``'s own pieces: the list of packages that travel to a bare GPU machine, the
folder check, the preflight, the environment builder, and the whole CPU form of the check in a
virtualenv as bare as a GPU machine's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement

from ijepa_fast import bench, optional
from ijepa_fast import config as config_mod
from profiling import gpu_env, gpu_wheels, preflight, scaling
from profiling.gpu_wheels import normalize

REPO = Path(__file__).resolve().parent.parent
# The requirement markers of the GPU machines' Python (only what a marker can name).
GPU_MARKERS = {
    "python_version": gpu_wheels.GPU_PYTHON,
    "python_full_version": f"{gpu_wheels.GPU_PYTHON}.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


# ---------------------------------------------------------------------------------------------- wheel list
def test_every_requirement_of_a_carried_package_is_on_the_list():
    """Each carried package is at the version the CPU tests run with, and each of its requirements
    on the GPU machines' Python is on the list (carried, on the machine, or absent with a reason) at
    a version the requirement accepts."""
    entries = gpu_wheels.read_list()
    listed = {normalize(e.name): e for e in entries}
    assert len(listed) == len(entries), "a package is on two lines"
    problems = []
    for entry in (e for e in entries if e.carried):
        dist = importlib.metadata.distribution(entry.name)
        if dist.version != entry.version:
            problems.append(f"{entry.name}=={entry.version} is listed; the CPU tests run {dist.version}")
        for req in map(Requirement, dist.requires or []):
            if req.marker is not None and not req.marker.evaluate(GPU_MARKERS):
                continue
            on_list = listed.get(normalize(req.name))
            if on_list is None:
                problems.append(f"{entry.name} requires {req}, which is not on the list")
            elif on_list.version and not req.specifier.contains(on_list.version, prereleases=True):
                problems.append(f"{entry.name} requires {req}; the list has {on_list.version}")
    assert problems == []


def test_the_list_keeps_setup_pys_pins():
    pins = {}
    for req in map(Requirement, importlib.metadata.requires("ijepa_fast")):
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[normalize(req.name)] = exact[0]
    kept = {normalize(e.name): e.version for e in gpu_wheels.read_list() if normalize(e.name) in pins and e.version}
    assert kept == {name: pins[name] for name in kept}
    assert "deepspeed" in kept  # the pinned package that travels


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("pytest==9.2.0", "expected one of"),
        ("pytest wheel", "needs an exact version"),
        ("psutil==7.2.2 absent", "say why"),
    ],
)
def test_a_malformed_line_is_named(tmp_path, line, complaint):
    path = tmp_path / "gpu_wheels.txt"
    path.write_text(f"# a comment\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"gpu_wheels.txt:3: .*{complaint}"):
        gpu_wheels.read_list(path)


def test_the_folder_check_finds_strays_gaps_and_an_overflow(tmp_path):
    entries = gpu_wheels.read_list()
    folder = tmp_path / ".whl"
    folder.mkdir()
    (folder / "pytest-9.2.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    (folder / "pytest-8.0.0-py3-none-any.whl").write_bytes(b"")  # another version: a stray
    (folder / "deepspeed-0.19.8.tar.gz").write_bytes(b"")
    (folder / "notes.txt").write_bytes(b"")
    assert [p.name for p in gpu_wheels.stray_files(entries, folder)] == ["notes.txt", "pytest-8.0.0-py3-none-any.whl"]
    missing = {e.name for e in gpu_wheels.missing_entries(entries, folder)}
    assert "pytest" not in missing and "deepspeed" not in missing
    assert missing == {e.name for e in entries if e.carried} - {"pytest", "deepspeed"}
    assert "within" in gpu_wheels.check_fits(folder, tree=500, limit=1500)
    with pytest.raises(ValueError, match="over the"):
        gpu_wheels.check_fits(folder, tree=501, limit=1500)


# ---------------------------------------------------------------------------------------------- preflight
def read_facts(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in shlex.split(path.read_text()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU form")
def test_preflight_on_a_cpu_reports_each_check_and_its_facts(tmp_path, capsys):
    assert preflight.main(["--facts", str(tmp_path / "facts")]) == 0
    out = capsys.readouterr().out.split("preflight:\n", 1)[1]  # (importing DeepSpeed may log first)
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["python", "cuda", "bf16", "memory", "compiler", "Python.h", "triton", "optional"]
    assert "triton    launch skipped (no CUDA)" in out
    optional_line = next(line for line in out.splitlines() if line.strip().startswith("optional"))
    present, absent = (part.split(", ") for part in optional_line.split("present: ")[1].split("; absent: "))
    assert [item.split()[0] for item in present if item != "none"] == [
        n for n in optional.known() if optional.available(n)
    ]
    assert [item for item in absent if item != "none"] == [n for n in optional.known() if not optional.available(n)]
    facts = read_facts(tmp_path / "facts")
    assert facts == {
        "CUDA": "0",
        "DEVICE": "CPU (no CUDA)",
        "TRITON": "skipped: no CUDA",
        "DALI": "1" if optional.available("dali") else "0",
    }


@pytest.fixture
def stub_cuda(monkeypatch):
    """torch.cuda answering as one Hopper GPU would (the preflight only asks)."""
    props = SimpleNamespace(name="Stub H100", major=9, minor=0, multi_processor_count=132)
    for name, value in {
        "is_available": lambda: True,
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "get_device_properties": lambda dev: props,
        "is_bf16_supported": lambda: True,
        "mem_get_info": lambda dev: (80 * 2**30, 96 * 2**30),
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)


def test_preflight_on_cuda_names_a_missing_compiler_and_a_failed_launch(tmp_path, capsys, monkeypatch, stub_cuda):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    monkeypatch.setattr(optional, "available", lambda name: name == "triton")

    def launch(device):
        raise RuntimeError("Failed to compile\n/tmp/main.c: fatal error: Python.h: No such file or directory")

    monkeypatch.setattr(preflight, "triton_launch", launch)
    assert preflight.main(["--facts", str(tmp_path / "facts")]) == 1
    out = capsys.readouterr().out
    assert "Stub H100, capability 9.0 (sm_90), 132 SMs" in out and "80.0 GiB free of 96.0 GiB" in out
    assert "compiler  NONE: Triton cannot build its launcher (install gcc, or set CC)   <-- FAILS" in out
    assert "launch failed: RuntimeError: /tmp/main.c: fatal error: Python.h: No such file or directory" in out
    facts = read_facts(tmp_path / "facts")
    assert facts["CUDA"] == "1" and facts["DEVICE"] == "Stub H100" and facts["TRITON"].startswith("failed: ")


@pytest.mark.skipif(not optional.available("triton"), reason="triton is not installed")
def test_preflight_launch_checks_the_kernel_against_its_reference(monkeypatch):
    """Under Triton's interpreter the preflight's launch runs the real kernel on the CPU; a kernel
    that computes the wrong thing is reported."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert preflight.triton_launch(torch.device("cpu")).startswith("ok (")
    from ijepa_fast.kernels import ema

    monkeypatch.setattr(ema, "ema_update_", lambda t, s, m: t[0].add_(1e-3))
    assert preflight.triton_launch(torch.device("cpu")).startswith("failed: ran, but differs from the reference")


# ---------------------------------------------------------------------------------------------- environment
def test_gpu_env_keeps_a_python_that_imports_the_package(tmp_path, capsys):
    assert gpu_env.main(["--env", str(tmp_path / "env"), "--wheels", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == sys.executable
    assert not (tmp_path / "env").exists()


def test_gpu_env_refuses_to_replace_a_folder_that_is_not_a_virtualenv(tmp_path):
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "keep.txt").write_text("mine")
    with pytest.raises(gpu_env.EnvError, match="exists and is not a virtualenv"):
        gpu_env.build(sys.executable, tmp_path / "env", [])
    assert (tmp_path / "env" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- the CPU form
def part_statuses(summary: str) -> dict[str, str]:
    """{part: status} from the summary's parts table, in the order of its rows."""
    table = summary.split("| part | status | seconds | result |\n|---|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    return {
        cells[0]: cells[1] for cells in ([c.strip() for c in row.strip("|").split("|")] for row in table.splitlines())
    }


def offline_pip_options() -> list[str]:
    """pip options that reach only this machine's own package sources: the find-links folders and
    file:// indexes of pip's configuration (the network indexes left out)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values.setdefault(key.rsplit(".", 1)[-1], []).extend(value.strip("'\"").split())
    links = sorted(set(values.get("find-links", [])))
    indexes = [u for k in ("index-url", "extra-index-url") for u in values.get(k, []) if u.startswith("file:")]
    options = [f"--find-links={link}" for link in links]
    if not indexes:
        return ["--no-index", *options]
    return [f"--index-url={indexes[0]}", *(f"--extra-index-url={u}" for u in indexes[1:]), *options]


@pytest.mark.slow
def test_the_cpu_form_of_gpu_check_runs_end_to_end_in_a_bare_virtualenv(tmp_path):
    """A virtualenv with only torch (CPU), triton, numpy and pillow, as a GPU machine has besides
    CUDA: gpu_check.sh installs the package itself, offline, runs every CPU part and ends with the
    summary table. Parts may fail only for want of pytest, which the GPU machine gets from .whl/."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "triton", "numpy")]
    # Only this machine's sources: the test must not download a CUDA build of torch.
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    pip = [str(bare / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, *offline_pip_options(), *pins, "pillow"],
        capture_output=True,
        text=True,
        env=pip_env,
    )
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.skip(f"not available offline here: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")} | {
        "PYTHON": str(bare / "bin" / "python"),
        "GPU_CHECK_ENV": str(tmp_path / "env"),
        "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"),
        "OUT": str(tmp_path / "out"),
    }
    run = subprocess.run(["bash", "profiling/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    out = run.stdout
    assert run.returncode in (0, 1), out[-3000:] + run.stderr[-2000:]
    assert out.rfind("==================== gpu-check summary") > out.rfind("\n=== "), "the summary is not last"
    assert len(out + run.stderr) <= 12_000, "more than one device call returns"
    rows = part_statuses((tmp_path / "out" / "summary.md").read_text())
    assert rows["environment"] == "ok" and rows["preflight"] == "ok", rows
    assert rows["pytest_gpu"] == "skipped (no CUDA)"
    assert rows["deepspeed_zero2"] == rows["deepspeed_zero3"] == "skipped (no CUDA)"
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        logs = {
            Path(m.name).stem: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".log")
        }
    for part in ("step_vith14", "masked_gather", "ema", "attention", "data", "scaling"):
        if rows[part] != "ok":
            assert "No module named 'pytest'" in logs[part], (part, rows[part], logs[part][-2000:])


def test_an_interrupted_gpu_check_still_ends_with_the_summary(tmp_path):
    """SIGTERM while a part runs (as when a device call runs out of time) stops that part and prints
    the summary table last, with what finished and the exit status of the signal."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHON": sys.executable,
        "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"),
        "GPU_CHECK_SKIP": "preflight masked_gather ema attention data",
        "OUT": str(tmp_path / "out"),
    }
    proc = subprocess.Popen(
        ["bash", "profiling/gpu_check.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("=== step_vith14"):
            proc.terminate()
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 143
    out = "".join(lines)
    assert out.rfind("==================== gpu-check summary") > out.rfind("\n=== ")
    assert "| environment | ok |" in out and "| preflight | skipped (GPU_CHECK_SKIP) |" in out
    assert "step_vith14 |" not in out and "stopped early (exit status 143)" in out
    assert (tmp_path / "out" / "gpu_check.tar.gz").exists()


# ---------------------------------------------------------------------------------------------- the GPU form
# A stand-in for a GPU machine's Python: gpu_check.sh's environment and preflight calls answered as
# there (CUDA, Triton working, no DALI), every part printing FLOOD_LINES long lines, writing the JSON
# a GPU run writes, and failing (so gpu_check shows its longest tails); the summary runs for real.
FLOOD_LINES = 400
STUB = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
fixtures, real = {fixtures!r}, {python!r}
if args[:2] == ["-m", "profiling.gpu_summary"]:
    os.execv(real, [real, *args])
if args[:2] == ["-m", "profiling.gpu_env"]:
    print(sys.argv[0])
    sys.exit(0)
if args[:1] == ["-c"]:
    print("3.12.3 torch 2.11.0+cu130 (stand-in)" if "torch" in args[1] else "", end="")
    sys.exit(0)
if args[:2] == ["-m", "profiling.preflight"]:
    facts = args[args.index("--facts") + 1]
    with open(facts, "w") as fh:
        fh.write("CUDA=1\\nDEVICE='NVIDIA H200'\\nTRITON='ok (stand-in)'\\nDALI=0\\n")
    print("preflight:")
    sys.exit(0)
with open(os.path.join(fixtures, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps(args) + "\\n")
module = args[1].rsplit(".", 1)[-1]
out = args[args.index("--json") + 1] if "--json" in args else None
if "--out" in args:
    out = os.path.join(args[args.index("--out") + 1], args[args.index("--tag") + 1] + ".json")
if out and os.path.exists(os.path.join(fixtures, module + ".json")):
    shutil.copy(os.path.join(fixtures, module + ".json"), out)
for i in range({lines}):
    print(f"{{module}} line {{i}} " + "x" * 300)
sys.exit(1)
"""


def gpu_step_result() -> dict:
    """An ijepa-bench ablation result as a GPU run writes it: every row, the real projection."""
    cfg = config_mod.Config()
    names = [c.name for c in bench.ablation_configs(torch.device("cuda"))]
    rows = [
        {
            "name": name,
            "ok": True,
            "batch": 128,
            "images_per_s": 60.0 + 11.1 * i,
            "speedup_vs_authors": (60.0 + 11.1 * i) / 60.0,
            "mfu": 0.123 + 0.0271 * i,
            "step_ms_median": 128e3 / (60.0 + 11.1 * i),
            "gflop_per_image": 654.6,
            "attention": "math" if i == 0 else "sdpa",
        }
        for i, name in enumerate(names)
    ]
    meta = {
        "spec": {"model": cfg.model.name, "patch": cfg.model.patch_size, "img": cfg.data.crop_size, "batch": 128},
        "amp": "bf16",
        "device": "NVIDIA H200",
        "peak_bf16_tflops": bench.peak_bf16_tflops("NVIDIA H200"),
        "matmul_bf16_tflops": 777.7,
    }
    return {"meta": meta, "rows": rows, "projection": bench.project(rows, cfg, "NVIDIA H200")}


def kernel_result(cases: list[str]) -> dict:
    rows = [
        {"case": case, "method": method, "bytes": 123456789, "median_ms": ms, "pct_copy": 12.3, "vs_authors": 1.23}
        for case in cases
        for method, ms in (("authors", 0.5432), ("builtin", 0.3456), ("kernel", 0.1234))
    ]
    return {"meta": {"copy_bandwidth_gb_s": 3456.7}, "rows": rows}


def write_gpu_fixtures(folder: Path) -> None:
    from profiling import bench_attention

    folder.mkdir()
    methods = ("math", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash_attn", "flash_attn3", "xformers")
    attention = [
        {**case, "method": m, "median_ms": 1.234 * (8 - i), "ok": True}
        for case in bench_attention.cases(list(bench_attention.MODELS), 16)
        for i, m in enumerate(methods)
    ]
    dtypes = ("float32", "bfloat16")
    results = {
        "bench_step": gpu_step_result(),
        "bench_masked_gather": kernel_result(
            [f"{op} {d}" for d in dtypes for op in ("gather", "context+pos", "mask_tokens", "targets")]
        ),
        "bench_ema": kernel_result(["fp32", "bf16", "fp32+bf16 copy"]),
        "bench_attention": {"meta": {}, "rows": attention},
        "bench_data": {"rows": [{"loader": "pytorch", "workers": w, "images_per_s": 444.4 * w} for w in (4, 8)]},
    }
    for name, result in results.items():
        (folder / f"{name}.json").write_text(json.dumps(result))


def test_the_gpu_form_runs_the_parts_in_order_and_its_output_fits_one_reply(tmp_path):
    """With every part flooding its log and failing, on a stand-in GPU machine: the parts run in the
    order of the check, each log keeps everything, the summary (images/s, MFU, GPU-hours beside the
    paper, the kernels against their roofline) prints last, and the whole output stays within the
    ~12,000 characters one device call returns."""
    fixtures = tmp_path / "fixtures"
    write_gpu_fixtures(fixtures)
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable, fixtures=str(fixtures), lines=FLOOD_LINES))
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHON": str(stub),
        "OUT": str(tmp_path / "out"),
    }
    run = subprocess.run(["bash", "profiling/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-3000:]
    assert len(out) <= 12_000, len(out)
    summary = out[out.rindex("==================== gpu-check summary") :]
    assert summary.count("\n=== ") == 0 and out.count("==================== gpu-check summary") == 1
    order = ["environment", "preflight", "pytest_gpu", "step_vith14", "masked_gather", "ema", "attention", "data"]
    order += ["deepspeed_zero2", "deepspeed_zero3"]
    assert list(part_statuses(summary)) == [*order, "scaling"], summary
    assert "| authors | 60.0 | 1.00 | 12.3% |" in summary and "| all on (default) |" in summary
    assert "< 1200 A100 GPU-hours" in summary and "Kernels against the roofline" in summary
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        for part in order[2:]:
            log = tar.extractfile(f"gpu_check/{part}.log").read().decode()
            assert log.count(" line ") == FLOOD_LINES, part

    calls = [json.loads(line) for line in (fixtures / "calls.jsonl").read_text().splitlines()]
    step_args = next(c[2:] for c in calls if c[1] == "profiling.bench_step")
    args = bench.parse_args(step_args)
    cfg = bench.spec_from_args(args).config_for({})
    assert args.ablation and (cfg.model.name, cfg.model.patch_size, cfg.data.crop_size) == ("vit_huge", 14, 224)
    assert cfg.data.batch_size == 128 and cfg.run.device == "auto"


# ---------------------------------------------------------------------------------------------- the scaling model
def test_the_scaling_model_sends_the_bytes_the_engine_sends():
    """The DeepSpeed engine keeps fp32 weights and reduces gradients in fp32 at every stage, so the
    model counts 4 bytes per gradient and per gathered parameter, read from the engine's config."""
    assert {stage: scaling.engine_bytes(stage) for stage in scaling.STAGES} == dict.fromkeys(scaling.STAGES, (4, 4))


def test_sixteen_gpus_under_zero2_and_zero3_against_a_hand_computation(capsys):
    """ViT-H/14 (student P, encoder E parameters), a 223 ms step, 16 GPUs on two nodes of 8: the
    ring runs at 50 GB/s per GPU; fp32 traffic, no overlap."""
    rows = scaling.main(["--step-ms", "223", "--gpus", "16", "--stages", "2", "3"])
    params, encoder = scaling.student_params("vit_huge", 14, 224)
    ring, bw, step = 15 / 16, 50e9, 0.223
    zero2 = ring * (4 * params) / bw + ring * (4 * params) / bw  # reduce-scatter grads + all-gather params
    zero3 = ring * (4 * params) / bw + ring * (2 * 4 * params + 4 * encoder) / bw  # + gathers fwd, bwd, target
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage[2]["comm_s"] == pytest.approx(zero2)
    assert by_stage[3]["comm_s"] == pytest.approx(zero3)
    assert by_stage[2]["efficiency"] == pytest.approx(step / (step + zero2))
    assert by_stage[3]["efficiency"] == pytest.approx(step / (step + zero3))
    table = capsys.readouterr().out
    assert "| 16 | 2 | 2 | 50 |" in table and "| 69% |" in table  # bf16 traffic would print 82%
    assert "| 16 | 2 | 3 | 50 |" in table and "| 53% |" in table  # bf16: 65%
    assert "as ijepa_fast's DeepSpeed engine sends them: 2: 4/4, 3: 4/4 (4 = fp32, 2 = bf16)" in table
