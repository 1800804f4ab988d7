"""``make gpu-check``'s own pieces: the list of packages that travel to a bare GPU machine, the
folder check, the preflight, the environment builder, and the whole CPU form of the check in a
virtualenv as bare as a GPU machine's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement

from ijepa_fast import config as config_mod
from ijepa_fast.bench.paper import peak_bf16_tflops, project
from ijepa_fast.bench.sources import ablation_configs, select_configs, spec_from_args
from ijepa_fast.cli import bench
from ijepa_fast.runtime import optional
from profiling import gpu_env, gpu_wheels, preflight, scaling, torch_api
from profiling.gpu_wheels import normalize

REPO = Path(__file__).resolve().parent.parent


def fake_wheel(folder: Path, file: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal wheel named ``file`` (its name, version and tags), holding only its metadata."""
    name, version = file.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    tag = "-".join(file[: -len(".whl")].split("-")[-3:])
    path = folder / file
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{info}/METADATA", metadata)
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


# ---------------------------------------------------------------------------------------------- carried packages
def test_the_carried_set_installs_beside_the_machines_packages():
    """Every listed file installs on CPython 3.12, manylinux x86-64; every requirement of a carried
    package there is carried or on the machine at a version it accepts; the machine's packages
    travel only with a reason (typing-extensions: a version pydantic needs); and each carried
    package is the version the CPU tests run with."""
    entries, machine = gpu_wheels.read_list(), gpu_wheels.read_machine()
    assert gpu_wheels.problems(entries, machine, gpu_wheels.requires_from(REPO / ".whl")) == []
    assert {e.name: importlib.metadata.version(e.name) for e in entries} == {e.name: e.version for e in entries}
    assert {"deepspeed", "pydantic-core", "pydantic"} <= {e.name for e in entries}
    assert {e.name for e in entries if e.name in machine} == {"typing-extensions"}
    assert machine["torch"] == "2.11.0" and machine["triton"] == "3.6.0" and "pytest" in machine


def test_the_list_keeps_setup_pys_pins():
    pins = {}
    for req in map(Requirement, importlib.metadata.requires("ijepa_fast")):
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[normalize(req.name)] = exact[0]
    kept = {e.name: e.version for e in gpu_wheels.read_list() if e.name in pins}
    assert kept == {name: pins[name] for name in kept}
    assert "deepspeed" in kept  # the pinned package that travels


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("pytest-9.2.0-py3-none-any.whl", "expected one of"),
        ("pytest==9.2.0 wheel", "is not a wheel file name"),
        ("deepspeed-0.19.8.tar.gz built", "is not a wheel file name"),
    ],
)
def test_a_malformed_line_is_named(tmp_path, line, complaint):
    path = tmp_path / "gpu_wheels.txt"
    path.write_text(f"# a comment\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"gpu_wheels.txt:3: .*{complaint}"):
        gpu_wheels.read_list(path)


def test_the_check_names_what_would_not_install_there():
    """A wheel for another Python, a machine package carried without a reason, a requirement that
    nothing provides, and one the machine's known version does not meet."""
    entries = [
        gpu_wheels.Entry("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl", "wheel"),
        gpu_wheels.Entry("pytest-9.2.0-py3-none-any.whl", "wheel"),
        gpu_wheels.Entry("hjson-3.1.0-py3-none-any.whl", "wheel"),
    ]
    machine = {"pytest": None, "numpy": "2.5.2"}
    requires = {
        "pydantic-core": [],
        "pytest": [],
        "hjson": ["numpy>=3", "absent-thing", "pywin32; sys_platform == 'win32'"],
    }
    found = gpu_wheels.problems(entries, machine, lambda e: requires[e.name])
    assert found == [
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl does not install on CPython 3.12, manylinux x86-64",
        "pytest-9.2.0-py3-none-any.whl: the machine has pytest; carry it only with the reason on its line",
        "hjson-3.1.0-py3-none-any.whl requires numpy>=3; 2.5.2 is on the machine",
        "hjson-3.1.0-py3-none-any.whl requires absent-thing, which is neither carried nor on the machine",
    ]


def test_pip_selects_every_listed_file_for_the_gpu_machines_python(tmp_path):
    """pip's own dry run, for Python 3.12 on manylinux x86-64 from the folder alone: on stand-ins
    named as the list names the files (offline), on the real .whl/ when it holds the set; a wheel
    for another Python is named."""
    entries = gpu_wheels.read_list()
    for entry in entries:
        fake_wheel(tmp_path, entry.file)
    assert gpu_wheels.pip_dry_run(entries, tmp_path) == []
    real = REPO / ".whl"
    if real.is_dir() and not gpu_wheels.missing_entries(entries, real):
        assert gpu_wheels.check(entries, gpu_wheels.read_machine(), real)[0] == []
    other = gpu_wheels.Entry("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl", "wheel")
    (tmp_path / "other").mkdir()
    fake_wheel(tmp_path / "other", other.file)
    (found,) = gpu_wheels.pip_dry_run([other], tmp_path / "other")
    assert found.startswith("pip install --dry-run for CPython 3.12, manylinux x86-64 fails: ")


def test_the_folder_check_finds_strays_gaps_and_an_overflow(tmp_path):
    entries = gpu_wheels.read_list()
    folder = tmp_path / ".whl"
    folder.mkdir()
    (folder / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    (folder / "hjson-3.0.0-py3-none-any.whl").write_bytes(b"")  # another version: a stray
    (folder / "deepspeed-0.19.8.tar.gz").write_bytes(b"")  # a source archive: a stray
    assert [p.name for p in gpu_wheels.stray_files(entries, folder)] == [
        "deepspeed-0.19.8.tar.gz",
        "hjson-3.0.0-py3-none-any.whl",
    ]
    assert {e.name for e in gpu_wheels.missing_entries(entries, folder)} == {e.name for e in entries} - {"hjson"}
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
    assert names == ["python", "torch_api", "cuda", "bf16", "memory", "compiler", "Python.h", "triton", "optional"]
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


def test_every_torch_attribute_the_package_names_is_found_and_present_here():
    """Read off the source through each file's own names for torch (``F``, ``nn``, ``from torch.x
    import y``): what the step, the checkpoints and the kernels use is among them, and this torch
    has every one."""
    uses = torch_api.used()
    assert {
        "torch.library.custom_op",  # kernels/, through `torch.library`
        "torch.serialization.safe_globals",  # ijepa_fast/io/checkpoint.py
        "torch.nn.functional.scaled_dot_product_attention",  # through `import torch.nn.functional as F`
        "torch.nn.attention.sdpa_kernel",  # through `from torch.nn.attention import ...`
    } <= set(uses)
    assert "ijepa_fast/models/attention.py" in uses["torch.nn.functional.scaled_dot_product_attention"]
    assert torch_api.missing(uses) == {}


def test_a_torch_without_an_attribute_the_package_uses_fails_the_preflight_naming_it(monkeypatch, capsys):
    """As torch 2.11 on a GPU machine would if the code used an API added after it."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    assert torch_api.resolves("torch.serialization.safe_globals") is False
    assert preflight.main([]) == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("torch_api")]
    assert f"MISSING in torch {torch.__version__}: torch.serialization.safe_globals (" in line
    assert "ijepa_fast/io/checkpoint.py" in line and line.endswith("<-- FAILS")


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


def test_gpu_env_refuses_a_carried_file_that_is_not_a_wheel(tmp_path, capsys):
    """A source archive in the folder would never be installed: the check stops, naming it."""
    (tmp_path / "deepspeed-0.19.8.tar.gz").write_bytes(b"")
    assert gpu_env.main(["--env", str(tmp_path / "env"), "--wheels", str(tmp_path)]) == 1
    assert "deepspeed-0.19.8.tar.gz, which no wheel install takes" in capsys.readouterr().err
    assert not (tmp_path / "env").exists()


def test_gpu_env_names_a_carried_file_that_did_not_install(tmp_path):
    """After pip: each file must show in the Python at its version, with its requirements met."""
    assert gpu_env.not_installed([tmp_path / "hjson-9.9.9-py3-none-any.whl"]) == [
        f"{tmp_path / 'hjson-9.9.9-py3-none-any.whl'} was not installed: hjson "
        f"{importlib.metadata.version('hjson')} is what this Python has"
    ]
    absent = tmp_path / "ijepa_absent-1.0-py3-none-any.whl"
    assert gpu_env.not_installed([absent]) == [f"{absent} was not installed: this Python has no ijepa-absent"]


def test_gpu_env_stops_naming_a_wheel_whose_requirement_the_machine_lacks(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = fake_wheel(wheels, "ijepa_probe-1.0-py3-none-any.whl", ("ijepa-nowhere>=1",))
    with pytest.raises(gpu_env.EnvError, match=rf"{wheel} needs ijepa-nowhere>=1, which is not installed"):
        gpu_env.build(sys.executable, tmp_path / "env", [wheel])


# ---------------------------------------------------------------------------------------------- the CPU form
STAGES = ("first", "deepspeed", "ablation", "kernels", "attention", "data")
# The parts of each stage, in order, after the environment and the preflight.
STAGE_PARTS = {
    "first": ["pytest_kernels", "step_vith14", "scaling"],
    "deepspeed": ["pytest_deepspeed", "deepspeed_zero2", "fsdp2", "deepspeed_zero3"],
    "ablation": ["ablation", "pytest_step"],
    "kernels": ["masked_gather", "ema"],
    "attention": ["attention"],
    "data": ["pytest_dali", "data"],
}


def part_statuses(summary: str, stage: str | None = None) -> dict[str, str]:
    """{part: status} from the summary's parts table (one stage's rows, or every row as
    'stage/part'), in the order of its rows."""
    table = summary.split("| stage | part | status | seconds | result |\n|---|---|---|---|---|\n", 1)[1]
    lines = [row for row in table.split("\n\n", 1)[0].splitlines() if row.startswith("|")]
    rows = [[c.strip() for c in row.strip("|").split("|")] for row in lines]
    if stage is None:
        return {f"{r[0]}/{r[1]}": r[2] for r in rows}
    return {r[1]: r[2] for r in rows if r[0] == stage}


def gpu_check(stage: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "profiling/gpu_check.sh", stage], cwd=REPO, env=env, capture_output=True, text=True)


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
def test_the_first_stage_runs_end_to_end_in_a_bare_virtualenv(tmp_path):
    """A virtualenv with only torch (CPU), triton, numpy and pillow, as a GPU machine has besides
    CUDA: gpu_check.sh installs the package itself, offline, runs the first stage's CPU parts and
    ends with the summary table; the outputs come back packed."""
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
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
        "OUT": str(tmp_path / "out"),
    }
    (tmp_path / "out").mkdir()
    run = gpu_check("first", env)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-2000:]
    assert out.rfind("==================== gpu-check summary") > out.rfind("\n=== "), "the summary is not last"
    assert len(out + run.stderr) <= 12_000, "more than one device call returns"
    rows = part_statuses((tmp_path / "out" / "summary.md").read_text(), "first")
    assert rows == {"environment": "ok", "preflight": "ok", "pytest_kernels": "skipped (no CUDA)"} | {
        "step_vith14": "ok",
        "scaling": "ok",
    }
    with tarfile.open(tmp_path / "out" / "gpu_check_first.tar.gz") as tar:
        names = {Path(m.name).name for m in tar.getmembers()}
    assert {"status.tsv", "about.tsv", "step_vith14.json", "step_vith14.log", "scaling.json"} <= names


@pytest.mark.slow
def test_every_stage_runs_its_cpu_form_and_the_summary_merges_them(tmp_path):
    """Each stage by name, in the recommended order, into one results folder: each prints its parts
    last (skipped on a CPU only where CUDA, pytest's GPU tests or DALI are needed, and the preflight
    where the test skips it), and the summary of the last holds every stage in the order they ran."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")} | {
        "PYTHON": sys.executable,
        "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"),
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
    }
    # GPU tests and the DeepSpeed and FSDP2 steps need CUDA (tests/test_deepspeed.py and
    # tests/test_fsdp2.py run the engines on a CPU)
    may_skip = {"pytest_kernels", "pytest_deepspeed", "pytest_step", "pytest_dali", "deepspeed_zero2"}
    may_skip |= {"fsdp2", "deepspeed_zero3"}
    for stage in STAGES:
        # The preflight is the same program in every stage (tested alone above): it runs in the
        # first and in the last (whose DALI part reads its findings); the others skip it, seconds each.
        skip_preflight = stage not in ("first", "data")
        run = gpu_check(stage, env | ({"GPU_CHECK_SKIP": "preflight"} if skip_preflight else {}))
        out = run.stdout
        assert run.returncode == 0, (stage, out[-3000:], run.stderr[-2000:])
        summary = out[out.rindex("==================== gpu-check summary") :]
        rows = part_statuses(summary, stage)
        assert list(rows) == ["environment", "preflight", *STAGE_PARTS[stage]], (stage, rows)
        assert rows["preflight"] == ("skipped (GPU_CHECK_SKIP)" if skip_preflight else "ok"), (stage, rows)
        assert {part for part, status in rows.items() if status != "ok"} <= may_skip | {"preflight"}, (stage, rows)
        assert len(out + run.stderr) <= 12_000, stage
    merged = part_statuses(summary)
    assert [key.split("/")[0] for key in merged] == [s for s in STAGES for _ in range(2 + len(STAGE_PARTS[s]))]
    assert "model, 16 GPUs: ZeRO-0" in summary  # the first stage's figure, in the last stage's table
    full = (tmp_path / "results" / "data" / "summary.md").read_text()  # with every stage's tables
    assert "first/step_vith14: vit_tiny/8" in full and "ablation/ablation: vit_tiny/8" in full


def test_an_unknown_stage_is_named_with_the_stages_there_are(tmp_path):
    run = gpu_check("ablations", os.environ | {"GPU_CHECK_RESULTS": str(tmp_path)})
    assert run.returncode == 2
    assert run.stdout.strip() == (
        "gpu-check: unknown stage 'ablations': first, deepspeed, ablation, kernels, attention or data"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_gpu_check_still_ends_with_the_summary(tmp_path):
    """SIGTERM while a part runs (as when a device call runs out of time) stops that part and prints
    the summary table last, with what finished and the exit status of the signal."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHON": sys.executable,
        "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"),
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
        "GPU_CHECK_SKIP": "preflight",
        "OUT": str(tmp_path / "out"),
    }
    (tmp_path / "out").mkdir()
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
    assert "| first | environment | ok |" in out and "| first | preflight | skipped (GPU_CHECK_SKIP) |" in out
    assert "step_vith14 |" not in out and "stopped early (exit status 143)" in out
    assert (tmp_path / "out" / "gpu_check_first.tar.gz").exists()


# ---------------------------------------------------------------------------------------------- the GPU form
# A stand-in for a GPU machine's Python: gpu_check.sh's environment and preflight calls answered as
# there (CUDA, Triton working, DALI and DeepSpeed importing), every part printing FLOOD_LINES long
# lines, writing the JSON a GPU run writes, and failing (so gpu_check shows its longest tails); the
# summary runs for real.
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
    print("3.12.3 torch 2.11.0+cu130 (stand-in)" if "sys.version" in args[1] else "", end="")
    sys.exit(0)
if args[:2] == ["-m", "profiling.preflight"]:
    facts = args[args.index("--facts") + 1]
    with open(facts, "w") as fh:
        fh.write("CUDA=1\\nDEVICE='NVIDIA H100 80GB HBM3'\\nTRITON='ok (stand-in)'\\nDALI=1\\n")
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
    names = [c.name for c in ablation_configs(torch.device("cuda"))]
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
        "device": "NVIDIA H100 80GB HBM3",
        "peak_bf16_tflops": peak_bf16_tflops("NVIDIA H100 80GB HBM3"),
        "matmul_bf16_tflops": 777.7,
    }
    return {"meta": meta, "rows": rows, "projection": project(rows, cfg, "NVIDIA H100 80GB HBM3")}


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
    scaling_rows = [
        {"gpus": 16, "stage": stage, "efficiency": eff, "nodes": 2} for stage, eff in ((0, 0.71), (2, 0.69), (3, 0.53))
    ]
    results = {
        "bench_step": gpu_step_result(),
        "bench_masked_gather": kernel_result(
            [f"{op} {d}" for d in dtypes for op in ("gather", "context+pos", "mask_tokens", "targets")]
        ),
        "bench_ema": kernel_result(["fp32", "bf16", "fp32+bf16 copy"]),
        "bench_attention": {"meta": {}, "rows": attention},
        "bench_data": {"rows": [{"loader": "pytorch", "workers": w, "images_per_s": 444.4 * w} for w in (4, 8)]},
        "scaling": {"meta": {}, "rows": scaling_rows},
    }
    for name, result in results.items():
        (folder / f"{name}.json").write_text(json.dumps(result))


def test_the_gpu_form_of_each_stage_runs_its_parts_and_each_reply_fits(tmp_path):
    """Every stage in turn, on a stand-in GPU machine, with every part flooding its log and failing:
    each stage runs its parts in order, each log keeps everything, the merged summary (images/s, MFU,
    GPU-hours beside the paper, the kernels against their roofline) prints last, and each stage's
    whole output stays within the ~12,000 characters one device call returns."""
    fixtures = tmp_path / "fixtures"
    write_gpu_fixtures(fixtures)
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable, fixtures=str(fixtures), lines=FLOOD_LINES))
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHON": str(stub),
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
        "OUT": str(tmp_path / "out"),
    }
    for stage in STAGES:
        (tmp_path / "out").mkdir()
        run = gpu_check(stage, env)
        out = run.stdout + run.stderr
        assert run.returncode == 1, out[-3000:]
        assert len(out) <= 12_000, (stage, len(out))
        summary = out[out.rindex("==================== gpu-check summary") :]
        assert summary.count("\n=== ") == 0 and out.count("==================== gpu-check summary") == 1
        parts = STAGE_PARTS[stage]
        assert list(part_statuses(summary, stage)) == ["environment", "preflight", *parts], summary
        with tarfile.open(tmp_path / "out" / f"gpu_check_{stage}.tar.gz") as tar:
            for part in parts:
                log = tar.extractfile(f"{stage}/{part}.log").read().decode()
                assert log.count(" line ") == FLOOD_LINES, part
        full = (tmp_path / "out" / "summary.md").read_text()  # every stage's tables, not only this one's
        shutil.rmtree(tmp_path / "out")
    assert list(part_statuses(summary)) == [
        f"{s}/{p}" for s in STAGES for p in ["environment", "preflight", *STAGE_PARTS[s]]
    ]
    assert "first/step_vith14: vit_huge/14" in full and "ablation/ablation: vit_huge/14" in full
    assert "| authors | 60.0 | 1.00 | 12.3% |" in full and "| all on, compile off |" in full
    assert "< 1200 A100 GPU-hours" in full and "Kernels against the roofline" in full
    assert "model, 16 GPUs: ZeRO-0 71%, ZeRO-2 69%, ZeRO-3 53%" in summary
    (zero2,) = [row for row in summary.splitlines() if row.startswith("| deepspeed | deepspeed_zero2 |")]
    assert zero2.endswith("; x1.00 the plain engine's default |")  # the stand-in's step, both times

    calls = [json.loads(line) for line in (fixtures / "calls.jsonl").read_text().splitlines()]
    tested = [path for c in calls if c[1] == "pytest" for path in c[c.index("gpu") + 1 :]]
    gpu_mark = re.compile(r"^@pytest\.mark\.gpu$", re.MULTILINE)
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("*.py") if gpu_mark.search(p.read_text()))
    covered = sorted(m for m in marked for t in tested if m == t or m.startswith(t.rstrip("/") + "/"))
    assert covered == marked, "a file of GPU tests runs in no stage, or in two"

    steps = {c[c.index("--tag") + 1]: c[2:] for c in calls if c[1] == "profiling.bench_step"}
    assert set(steps) == {"step_vith14", "ablation", "deepspeed_zero2", "fsdp2", "deepspeed_zero3"}
    for tag, argv in steps.items():
        args = bench.parse_args(argv)
        cfg = spec_from_args(args).config_for({})
        assert (cfg.run.engine == "fsdp2") == (tag == "fsdp2"), (tag, cfg.run.engine)
        assert (cfg.model.name, cfg.model.patch_size, cfg.data.crop_size, cfg.data.batch_size) == (
            "vit_huge",
            14,
            224,
            128,
        )
        configs = select_configs(args, torch.device("cuda"))
        never = [c.name for c in configs if c.speed.get("preset") == "authors" and c.compiles]
        assert never == [], f"{tag} compiles the authors' preset"
    assert [c.name for c in select_configs(bench.parse_args(steps["step_vith14"]), torch.device("cuda"))] == [
        "authors",
        "all on (default)",
    ]


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
