"""One event query, the same filters whether it is answered by an agent or by a store."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class EventQuery:
    """Events with seq > since_seq and time >= since_time, matching every filter that is set."""

    since_seq: int = 0
    since_time: float | None = None
    agent: str | None = None
    workload: str | None = None
    kind: str | None = None
    pid: int | None = None
    limit: int | None = None


def parse_since(text: str, now: float | None = None) -> tuple[int, float | None]:
    """`--since` as (since_seq, since_time): a bare number is a seq, `90s`/`5m`/`2h`/`1d` a duration back from now."""
    if text.isdigit():
        return int(text), None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"--since {text!r}: give a seq number (1234) or a duration (90s, 5m, 2h, 1d)")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return 0, (time.time() if now is None else now) - seconds


def where_clause(query: EventQuery, placeholder: str) -> tuple[str, list[object]]:
    """The SQL WHERE clause and its parameters for `query`; `placeholder` is the driver's (`?` or `%s`)."""
    conditions = ["seq > " + placeholder]
    params: list[object] = [query.since_seq]
    for column, value in (("time >=", query.since_time), ("agent =", query.agent),
                          ("workload =", query.workload), ("kind =", query.kind), ("pid =", query.pid)):
        if value is not None:
            conditions.append(f"{column} {placeholder}")
            params.append(value)
    return " AND ".join(conditions), params
