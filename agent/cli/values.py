"""Option types shared by the commands: sizes and durations as people write them, PEM files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import click

from agent.permissions import private_key_problem
from agent.policy import values

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """Seconds from '90', '90s', '15m', '2h', '7d'; must be > 0."""
    found = _DURATION.match(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: write seconds, or a number with s, m, h or d (15m, 2h, 7d)")
    return float(found.group(1)) * _SECONDS[found.group(2)]


class _Parsed(click.ParamType):
    """An option value read by `parse`, whose ValueError becomes click's usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx) -> Any:
        if not isinstance(value, str):
            return value  # a default already converted
        try:
            return self._parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = _Parsed("SIZE", values.size)  # 256MiB, 1GB, 1000000
SIZE_OR_ZERO = _Parsed("SIZE", values.size_or_zero)  # the same, or 0 for "never"
DURATION = _Parsed("DURATION", duration_seconds)  # 90s, 15m, 7d
PEM_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)  # a certificate, checked to exist


class _PrivateKeyFile(click.Path):
    """A PEM private key that exists and that only its owner can read (agent/permissions.py)."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx) -> Any:
        path = super().convert(value, param, ctx)
        problem = private_key_problem(str(path))
        if problem:
            self.fail(problem, param, ctx)
        return path


PRIVATE_KEY_FILE = _PrivateKeyFile()
