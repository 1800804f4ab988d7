"""A config from YAML files (ours or the authors'), packaged names and ``section.key=value``
overrides; the resolved config back to YAML; ``describe`` for ``--help``."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from ijepa_fast.config import authors as authors_config
from ijepa_fast.config.schema import AUTHORS_SPEED, Config
from ijepa_fast.runtime.errors import ConfigError, nearest_hint


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a pair like [a, b]")
        return tuple(_coerce(key, v, a) for v, a in zip(value, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported field type {annotation}")
    if annotation is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
        return int(as_float)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is invalid: expected a number") from None
    if annotation is str:
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from ``{section: {key: value}}``; unknown keys are errors."""
    cfg = _deep_copy(base) if base is not None else Config()
    sections = {f.name: f for f in fields(Config)}
    for section, values in (data or {}).items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}'{nearest_hint(section, list(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        _apply_section(cfg, section, values)
    return cfg.validate()


def _apply_section(cfg: Config, section: str, values: dict[str, Any]) -> None:
    obj = getattr(cfg, section)
    types_ = _section_types(type(obj))
    if section == "speed" and values.get("preset") == "authors":
        for k, v in AUTHORS_SPEED.items():
            setattr(obj, k, v)
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown config key '{section}.{key}'{nearest_hint(key, list(types_))}")
        setattr(obj, key, _coerce(f"{section}.{key}", value, types_[key]))


def _deep_copy(cfg: Config) -> Config:
    return Config(**{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in fields(Config)})


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (from the command line) and re-validate."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"override {item!r}: the key must name its section, e.g. optim.lr=1e-3")
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return from_dict(nested, base=cfg)


def packaged_configs() -> dict[str, Any]:
    """{name: file} of the configs that ship with the package (``demo``, the authors' four, ...)."""
    from importlib import resources

    folder = resources.files("ijepa_fast.configs")
    return {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}


def find_config(name: str):
    """A config file: ``name`` when that path exists, else the packaged config it names: ``demo``,
    ``demo.yaml`` or ``configs/demo.yaml`` (as the docs write it, from any folder)."""
    path = Path(name)
    if path.exists():
        return path
    packaged = packaged_configs()
    stem = path.name.removesuffix(".yaml")
    if stem in packaged and path.parent in (Path("."), Path("configs")):
        return packaged[stem]
    raise ConfigError(
        f"config file {name} does not exist, and no packaged config has that name "
        f"({', '.join(sorted(packaged))}): check the path"
    )


def _read_yaml(path: str) -> Any:
    """The parsed YAML file; a folder, an unreadable file or a syntax error is a one-line ConfigError."""
    import yaml  # only files need it: a config from overrides alone loads without PyYAML

    try:
        text = find_config(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: give the path of a YAML file in it") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"config file {path} cannot be read ({reason}): check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML{_yaml_where(err)}; fix it there") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None


def _yaml_where(err) -> str:
    """' at line L, column C: problem (while parsing X that starts at line L', column C')', 1-based."""

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = err.problem_mark or err.context_mark
    text = (f" at {at(mark)}" if mark else "") + f": {err.problem or err.context}"
    if err.context and err.problem:
        starts = f" that starts at {at(err.context_mark)}" if err.context_mark else ""
        text += f" ({err.context}{starts})"
    return text


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (ours, or the authors' format, detected by its sections) plus overrides.

    ``path`` is a file, or the name of a packaged config (``find_config``)."""
    cfg = Config()
    if path:
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        cfg = from_dict(authors_config.translate(raw) if authors_config.is_authors_format(raw) else raw)
    return apply_overrides(cfg, overrides or []).validate()


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (our format), loadable with ``load``."""
    import yaml

    data = {
        section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        for section, values in cfg.to_dict().items()
    }
    return yaml.safe_dump(data, sort_keys=False)


def save(cfg: Config, path: str, opener=None) -> None:
    """Write the resolved config to ``path`` (``to_yaml``); ``opener`` as ``open``'s."""
    with open(path, "w", opener=opener) as fh:
        fh.write(to_yaml(cfg))


# ----------------------------------------------------------------------------- documentation

_FIELD_LINE = re.compile(r"^\s+(\w+):[^=#]+=[^#]*?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")


def field_comments(section_cls: type) -> dict[str, str]:
    """{field: its comment}: the comment at the end of the field's line, or the comment lines
    directly above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(section_cls).splitlines():
        if m := _COMMENT_LINE.match(line):
            above.append(m.group(1).strip())
            continue
        if m := _FIELD_LINE.match(line):
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out


def describe() -> str:
    """Every section and key with its default and documentation, for ``--help``."""
    lines = ["config keys (section.key=value; defaults shown):"]
    defaults = Config()
    for section in fields(Config):
        cls = type(getattr(defaults, section.name))
        comments = field_comments(cls)
        lines.append(f"  {section.name}:")
        for f in fields(cls):
            value = getattr(getattr(defaults, section.name), f.name)
            shown = list(value) if isinstance(value, tuple) else value
            lines.append(f"    {section.name}.{f.name}={shown!s}  {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)
