"""Option types shared by the commands: sizes and durations as people write them."""
from __future__ import annotations

import re

import click

from agent.policy import values

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """Seconds from '90', '90s', '15m', '2h', '7d'; must be > 0."""
    found = _DURATION.match(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: write seconds, or a number with s, m, h or d (15m, 2h, 7d)")
    return float(found.group(1)) * _SECONDS[found.group(2)]


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return values.size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, float):
            return value
        try:
            return duration_seconds(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
