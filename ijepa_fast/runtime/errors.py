"""Errors for bad input that the command lines turn into one line, importable on their own.

Config loaders (``config``, ``authors_config``) and the engines raise these; nothing here imports
the rest of the package, so any module may import it without creating a cycle.
"""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config key is unknown or a value is invalid; the message names the key."""


def nearest_hint(name: str, options: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest option, else the list of valid keys."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"
