"""``make gpu-check``'s own pieces: the list of packages that travel to a bare GPU machine and
the folder check."""

from __future__ import annotations

import importlib.metadata

import pytest
from packaging.requirements import Requirement

from profiling import gpu_wheels
from profiling.gpu_wheels import normalize

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
