"""Dependencies: the lock CI installs agrees with setup.py's ranges, the environment holds exactly the
lock, and every third-party package the library imports is declared in setup.py."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ijepa_fast.runtime import optional

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements-lock.txt"
# The extras `make venv` installs from the lock (the others are for GPU machines and users).
LOCKED_EXTRAS = ("cpu", "dev", "test")
# Installed by `make venv` from the lock, beside the package and not named by setup.py.
LOCKED_TOOLS = ("pip", "setuptools", "wheel", "timm")
# Import name -> distribution, for packages an environment may not have installed (the optional GPU
# backends); installed ones are looked up in their metadata.
NOT_INSTALLED_HERE = {"flash_attn": "flash-attn", "xformers": "xformers"}
# Imported only when present and installable from no package index: a build from its own repository.
UNPACKAGED = {"flash_attn_interface": "FlashAttention-3, built from the flash-attention repository's hopper/ folder"}
# Submodules of one distribution that need another one installed.
NEEDS = {"torch.utils.tensorboard": "tensorboard"}


def needed_module(import_name: str) -> str:
    """The top-level module whose distribution ``import import_name`` needs."""
    for prefix, module in NEEDS.items():
        if import_name == prefix or import_name.startswith(prefix + "."):
            return module
    return import_name.split(".")[0]


def setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """``install_requires`` and ``extras_require`` as written in setup.py (read, not run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in kw["extras_require"].items()}
    return [Requirement(r) for r in kw["install_requires"]], extras


def read_lock() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{LOCK.name}:{n}: not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_satisfies_every_range_of_setup_py():
    core, extras = setup_requirements()
    pins = read_lock()
    wanted = core + [r for extra in LOCKED_EXTRAS for r in extras[extra]]
    missing = sorted({r.name for r in wanted if canonicalize_name(r.name) not in pins})
    assert not missing, f"setup.py requires {missing} but {LOCK.name} pins no version of them: run `make lock`"
    # A local build label (torch's +cpu) is the same release for a range.
    outside = [
        f"{r} (locked {pins[canonicalize_name(r.name)]})"
        for r in wanted
        if not r.specifier.contains(Version(pins[canonicalize_name(r.name)].public), prereleases=True)
    ]
    assert not outside, f"{LOCK.name} disagrees with setup.py: {outside}; run `make lock` or widen the range"
    for tool in LOCKED_TOOLS:
        assert canonicalize_name(tool) in pins, f"{LOCK.name} pins no {tool}: run `make lock`"


def test_the_lock_check_catches_a_disagreement(monkeypatch, tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(LOCK.read_text().replace("\ntqdm==", "\ntqdm==1.0  # was "))
    monkeypatch.setattr(sys.modules[__name__], "LOCK", lock)
    with pytest.raises(AssertionError, match="tqdm"):
        test_the_lock_satisfies_every_range_of_setup_py()


@pytest.mark.skipif(
    bool(os.environ.get("IJEPA_UNLOCKED")), reason="an environment of the newest releases (make test-latest)"
)
def test_this_environment_holds_exactly_the_lock():
    """What `make venv` installed is the lock, nothing more and nothing else (run in that venv)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not the locked venv of this checkout ({sys.prefix})")
    pins = read_lock()
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version)
        for d in importlib.metadata.distributions()
        if canonicalize_name(d.metadata["Name"]) != "ijepa-fast"
    }
    unlocked = sorted(set(installed) - set(pins))
    other = {name: (str(v), str(pins[name])) for name, v in installed.items() if name in pins and v != pins[name]}
    assert not unlocked and not other, (
        f"installed but not in {LOCK.name}: {unlocked}; installed (version, locked) differing: {other}"
    )


def third_party_imports() -> dict[str, set[str]]:
    """Top-level import name -> the library files importing it (lazy imports included), and the
    optional packages ``ijepa_fast.runtime.optional`` imports by name."""
    found: dict[str, set[str]] = {}
    first_party = {"ijepa_fast", "kernels"}
    for root in (REPO / "ijepa_fast", REPO / "kernels"):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = needed_module(name)
                    if top not in sys.stdlib_module_names and top not in first_party:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    for name in optional.known():
        found.setdefault(needed_module(optional.import_name(name)), set()).add("ijepa_fast/runtime/optional.py")
    return found


def distribution_of(module: str) -> str:
    """The distribution that provides the top-level import ``module``."""
    if module in NOT_INSTALLED_HERE:
        return NOT_INSTALLED_HERE[module]
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r}: install it, or name it in NOT_INSTALLED_HERE"
    return dists[0]


def test_every_third_party_import_of_the_library_is_declared_in_setup_py():
    core, extras = setup_requirements()
    declared = {canonicalize_name(r.name) for r in core} | {
        canonicalize_name(r.name) for reqs in extras.values() for r in reqs
    }
    undeclared = {
        module: sorted(files)
        for module, files in third_party_imports().items()
        if module not in UNPACKAGED and canonicalize_name(distribution_of(module)) not in declared
    }
    assert not undeclared, f"imported but declared nowhere in setup.py (core or an extra): {undeclared}"


def test_what_runs_by_default_needs_no_extra():
    """TensorBoard, the plots and the safetensors export are on by default: core dependencies."""
    core, _ = setup_requirements()
    names = {canonicalize_name(r.name) for r in core}
    assert {"tensorboard", "matplotlib", "safetensors"} <= names


def test_every_optional_install_hint_names_the_extra_that_declares_it():
    """``optional.require`` tells a user what to install: the setup.py extra that declares the package
    (a core dependency, or one no package index has, may be named directly)."""
    core, extras = setup_requirements()
    core_names = {canonicalize_name(r.name) for r in core}
    for name in optional.known():
        module = needed_module(optional.import_name(name))
        if module in UNPACKAGED:
            continue
        dist = canonicalize_name(distribution_of(module))
        if dist in core_names:
            continue
        found = re.search(r"ijepa_fast\[(\w+)\]", optional.install_hint(name))
        assert found and found[1] in extras, f"{name}: {optional.install_hint(name)!r} names no extra of setup.py"
        assert dist in {canonicalize_name(r.name) for r in extras[found[1]]}, (name, found[1])
