"""Package boundaries: no import cycles among the project's modules, no library module importing a
command-line module, the kernels installed under the project's namespace, a non-editable install
that runs from any folder, and the old flat import paths still working, with a deprecation warning."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"ijepa_fast": REPO / "ijepa_fast", "ijepa_fast.kernels": REPO / "kernels"}
# Modules whose job is a command line (their `main` is a console script or `python -m` target).
CLI_MODULES = {
    "ijepa_fast.cli.pretrain",
    "ijepa_fast.cli.launch_plan",
    "ijepa_fast.cli.export",
    "ijepa_fast.cli.demo",
    "ijepa_fast.cli.bench",
    "ijepa_fast.cli.eval",
    "ijepa_fast.cli.shard",
    "ijepa_fast.eval.__main__",
    "ijepa_fast.data.dali.__main__",
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed package layout."""
    out = {}
    for package, root in PACKAGE_DIRS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "ijepa_fast" and parts[:1] == ["kernels"]:
                continue
            out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (lazy imports included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            # `from package import submodule` imports the submodule; other names come from `base` itself
            targets = submodules + ([base] if len(submodules) < len(node.names) else [])
        else:
            continue
        if _type_checking_only(tree, node):
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # parents load first anyway
                found.add(target)
    return found


def _type_checking_only(tree: ast.AST, node: ast.AST) -> bool:
    """True for an import under ``if TYPE_CHECKING:`` (never run)."""
    guards = [
        p
        for p in ast.walk(tree)
        if isinstance(p, ast.If) and isinstance(p.test, ast.Name) and p.test.id == "TYPE_CHECKING"
    ]
    return any(node is child for guard in guards for stmt in guard.body for child in ast.walk(stmt))


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # Importing a module imports its parent packages first; a package's own imports are its edges.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_module_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_a_command_line_module():
    graph = import_graph()
    offenders = {name: sorted(deps & CLI_MODULES) for name, deps in graph.items() if name not in CLI_MODULES}
    assert not {k: v for k, v in offenders.items() if v}


def _run_python(code: str, cwd: Path, **env: str) -> str:
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_kernels_install_under_the_project_namespace(where, tmp_path):
    """``ijepa_fast.kernels`` is the repository's kernels/ folder, from the checkout's root (on sys.path
    first) and from any other folder."""
    cwd = REPO if where == "repository root" else tmp_path
    code = "import pathlib, ijepa_fast.kernels.ema as ema; print(pathlib.Path(ema.__file__).resolve().parent)"
    assert Path(_run_python(code, cwd)) == (REPO / "kernels").resolve()


def test_the_kernels_folder_is_a_namespace_portion_that_shadows_no_installed_package(tmp_path):
    """A regular package named ``kernels`` anywhere on the path wins over the checkout's kernels/
    folder, even with the checkout's root first on sys.path (as ``python -m`` and pytest put it)."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'the installed distribution'\n")
    code = "import kernels; print(kernels.WHO)"
    assert _run_python(code, REPO, PYTHONPATH=str(tmp_path / "site")) == "the installed distribution"


def test_the_installed_kernels_distribution_is_what_import_kernels_gives_from_the_root():
    """Hugging Face's ``kernels`` (a dependency of transformers) is the one ``import kernels`` finds."""
    pytest.importorskip("transformers")
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed")
    origin = _run_python("import kernels; print(kernels.__file__)", REPO)
    assert Path(origin).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
    # and what transformers needs of it imports
    _run_python("import transformers; transformers.IJepaModel", REPO)


def test_profiling_and_tests_do_not_import_each_other():
    """Benchmarks run where pytest is not installed; tests may run a benchmark's CLI, nothing else."""
    for path in (REPO / "profiling").glob("*.py"):
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text, path
        assert "import pytest" not in text, path


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_non_editable_install_runs_the_demo_config_from_another_folder(tmp_path):
    """``pip install .`` (not editable) into a fresh venv that sees this one's packages, then
    ``ijepa-demo --help`` and a 2-step pretraining run on the packaged demo config, elsewhere."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The dependencies come from this environment (torch among them), so nothing is downloaded.
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (
        env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "deps.pth"
    ).write_text(site + "\n")
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "checkout", "-q", "-f", "HEAD"], check=True)
    for rel in _uncommitted():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_file():
            target.unlink()
        if (REPO / rel).is_symlink():
            target.symlink_to(os.readlink(REPO / rel))
        elif (REPO / rel).exists():
            shutil.copy2(REPO / rel, target)
    run = dict(env=_clean_env(), capture_output=True, text=True, timeout=600)
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)], **run)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(src)  # nothing may come from the source tree
    bin_dir = env_dir / "bin"
    help_ = subprocess.run([str(bin_dir / "ijepa-demo"), "--help"], cwd=elsewhere, **run)
    assert help_.returncode == 0 and "ijepa-demo" in help_.stdout, help_.stderr[-3000:]
    code = (
        "import pathlib, ijepa_fast, ijepa_fast.kernels.ema as e; "
        "print(pathlib.Path(e.__file__).parent.parent == pathlib.Path(ijepa_fast.__file__).parent)"
    )
    kernels_ = subprocess.run([str(py), "-c", code], cwd=elsewhere, **run)
    assert kernels_.stdout.strip() == "True", kernels_.stderr[-3000:]
    from tests.test_trainer import write_idx

    data = write_idx(tmp_path / "idx", n=32)
    cmd = [
        str(bin_dir / "ijepa-pretrain"),
        "--config",
        "demo",  # a packaged config, by name
        f"data.root={data}",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.max_steps=2",
        "run.progress=false",
        "run.tensorboard=false",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=packaged",
    ]
    train = subprocess.run(cmd, cwd=elsewhere, **run)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "steps: 2" in train.stdout
    assert (tmp_path / "runs" / "packaged" / "checkpoints" / "latest.pt").exists()


def _uncommitted() -> list[str]:
    """Tracked files changed in the work tree and untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line[3:].split(" -> ")[-1] for line in out.splitlines() if line[3:]]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"
    return env


def test_importing_the_config_loads_no_torch_and_no_implementation():
    """The config is a leaf: its choice lists live beside it, so loading it imports nothing heavy and
    none of the modules that implement the choices."""
    code = (
        "import sys, ijepa_fast.config; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'ijepa_fast'))))"
    )
    loaded = set(_run_python(code, REPO).split())
    assert {"ijepa_fast.config", "ijepa_fast.config.choices"} <= loaded
    allowed = {"ijepa_fast", "ijepa_fast.runtime", "ijepa_fast.runtime.errors"}
    assert {m for m in loaded if not m.startswith("ijepa_fast.config")} <= allowed


def test_each_owner_implements_exactly_the_choices_the_config_names():
    """Every name of a choice list reaches an implementation of its own; a name outside it is refused."""
    import torch

    from ijepa_fast.config import choices
    from ijepa_fast.engines import engine_class, resolve_engine
    from ijepa_fast.models.attention import resolve_backend
    from ijepa_fast.models.vit import VIT_SIZES
    from ijepa_fast.runtime.device import resolve_precision
    from ijepa_fast.runtime.optional import MissingDependencyError
    from ijepa_fast.train.loss import jepa_loss

    assert tuple(VIT_SIZES) == choices.MODEL_NAMES
    x = torch.zeros(2, 3)
    assert len({float(jepa_loss(x, x + 0.5, kind)) for kind in choices.LOSSES}) == len(choices.LOSSES)
    classes = {name: engine_class(name).__name__ for name in choices.ENGINES if name != "auto"}
    assert classes == {"plain": "PlainEngine", "deepspeed": "DeepSpeedEngine", "fsdp2": "FSDP2Engine"}
    assert {resolve_engine("auto", 1), resolve_engine("auto", 2)} == {"plain", "deepspeed"}  # fsdp2: by name
    assert resolve_engine("fsdp2", 2) == "fsdp2"
    for dtype in choices.DTYPES:
        assert resolve_precision(torch.device("cpu"), dtype) is not None
    for backend in choices.ATTENTION_BACKENDS:  # on a CPU: served, or refused saying why (not "not a backend")
        try:
            assert resolve_backend(backend, "cpu", 64, torch.float32) in ("sdpa", "math")
        except (ValueError, MissingDependencyError) as err:
            assert "is not a backend" not in str(err), err
    for refused in (lambda: resolve_engine("fsdp9", 1), lambda: engine_class("fsdp9")):
        with pytest.raises(ValueError):
            refused()
    with pytest.raises(ValueError, match="is not a backend"):
        resolve_backend("fa9", "cpu", 64, torch.float32)


def public_names_defined_in(module: str) -> set[str]:
    """The public classes, functions and constants a module's own file defines at top level (read
    from its source, so names it imports do not count; ``log`` is the module's logger)."""
    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_") and n != "log"}


# The flat modules users' scripts import, and the modules that now define their names.
IO_MODULES = (
    "ijepa_fast.io.encoder",
    "ijepa_fast.io.paths",
    "ijepa_fast.io.load",
    "ijepa_fast.io.authors",
    "ijepa_fast.io.safetensors_timm",
    "ijepa_fast.io.hf",
)
# What the flat trainer module defined (later additions to the trainer need not go through the old path).
OLD_TRAINER_NAMES = ("RUN_FOLDER_SETTINGS", "NonFiniteLossError", "Aborted", "RunResult", "Trainer")


def old_path_names() -> dict[str, dict[str, tuple[str, ...]]]:
    """Old module -> {new home: the names the old module must give, as the same objects}."""
    io_names = {home: tuple(sorted(public_names_defined_in(home))) for home in IO_MODULES}
    return {"ijepa_fast.interop": io_names, "ijepa_fast.trainer": {"ijepa_fast.train.trainer": OLD_TRAINER_NAMES}}


def not_the_same_objects(module, homes: dict[str, tuple[str, ...]]) -> list[str]:
    """The names ``module`` lacks or binds to other objects than their home module."""
    return [
        f"{home}.{name}"
        for home, names in homes.items()
        for name in names
        if getattr(module, name, None) is not getattr(importlib.import_module(home), name)
    ]


@pytest.mark.parametrize("old", ["ijepa_fast.interop", "ijepa_fast.trainer"])
def test_an_old_import_path_warns_and_gives_the_objects_of_their_new_home(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import, as a user's script does
    with pytest.warns(DeprecationWarning, match=f"^{re.escape(old)} moved to ijepa_fast[.]"):
        shim = importlib.import_module(old)
    homes = old_path_names()[old]
    assert all(homes.values())
    assert not_the_same_objects(shim, homes) == []


def test_the_io_interop_namespace_keeps_every_public_name_and_the_checkpoint_errors():
    from ijepa_fast.io import checkpoint, interop

    assert not_the_same_objects(interop, old_path_names()["ijepa_fast.interop"]) == []
    assert interop.UntrustedCheckpointError is checkpoint.UntrustedCheckpointError
    assert interop.NotACheckpointError is checkpoint.NotACheckpointError


def test_a_script_importing_an_old_path_is_shown_the_deprecation(tmp_path):
    """Python shows a DeprecationWarning only when ``__main__`` triggers it: the warning points at the
    script's own import line."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    code = "import ijepa_fast.interop, ijepa_fast.trainer"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    for old in ("ijepa_fast.interop", "ijepa_fast.trainer"):
        assert f"<string>:1: DeprecationWarning: {old} moved to ijepa_fast." in out.stderr
