"""Every torch attribute the package's code names, read off its source, and which of them the torch
installed here lacks.

The GPU machines run their own torch (2.11) while CI runs the lock's (newer): an API added after
2.11 would pass every CPU test and fail only there, mid-run. The preflight calls ``missing`` first
and names each absent attribute with the files that use it, before anything heavy runs.

Found: ``torch.a.b`` chains through the names each file binds to torch modules (``import torch``,
``import torch.nn.functional as F``, ``from torch import nn``, ``from torch.x import y``). Not
found: keyword arguments or methods of tensors that are new (their names do not say they are
torch's).

    python -m profiling.torch_api      # prints what is missing; exit status 1 when anything is
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("ijepa_fast", "kernels", "profiling")


def _torch_names(tree: ast.AST) -> dict[str, str]:
    """{local name: the torch module or attribute it stands for} from a module's imports."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or alias.name.startswith("torch."):
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """(root name, attributes) of ``a.b.c``; None when the root is not a plain name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def used(root: Path = REPO, sources: tuple[str, ...] = SOURCES) -> dict[str, set[str]]:
    """{dotted torch attribute: the files (relative to ``root``) that name it}."""
    found: dict[str, set[str]] = {}
    for folder in sources:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            names = _torch_names(tree)
            where = str(path.relative_to(root))
            for target in names.values():
                found.setdefault(target, set()).add(where)
            for node in ast.walk(tree):
                chain = _chain(node) if isinstance(node, ast.Attribute) else None
                if chain and chain[0] in names:
                    found.setdefault(".".join([names[chain[0]], *chain[1]]), set()).add(where)
    return found


def resolves(dotted: str) -> bool | None:
    """Whether this torch has ``dotted``: True, False, or None when a module it needs that is not
    torch's own is not installed (an optional package, not a torch API)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] != "torch":
                return None
            continue
        except ImportError:
            return None
        break
    else:
        return False
    for attr in parts[cut:]:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            return False
    return True


def missing(uses: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """The attributes of ``uses`` (default: ``used()``) this torch lacks, with their files."""
    uses = used() if uses is None else uses
    return {name: files for name, files in sorted(uses.items()) if resolves(name) is False}


def main() -> int:
    import torch

    absent = missing()
    for name, files in absent.items():
        print(f"torch {torch.__version__} lacks {name} (used in {', '.join(sorted(files))})")
    if not absent:
        print(f"torch {torch.__version__} has every torch attribute the package names")
    return 1 if absent else 0


if __name__ == "__main__":
    sys.exit(main())
