"""One event query, the same filters whether it is answered by an agent or by a store."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class EventQuery:
    """The filters of WatchEventsRequest, plus the agent a store holds events of.

    Events with seq > since_seq and time >= since_time, of any of `workloads` and any of
    `kinds` (empty: all), of `pid` and `agent` when set; `last` keeps only the newest N."""

    since_seq: int = 0
    since_time: float | None = None
    last: int | None = None
    agent: str | None = None
    workloads: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    pid: int | None = None


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
    for column, value in (("time >=", query.since_time), ("agent =", query.agent), ("pid =", query.pid)):
        if value is not None:
            conditions.append(f"{column} {placeholder}")
            params.append(value)
    for column, values in (("workload", query.workloads), ("kind", query.kinds)):
        if values:
            conditions.append(f"{column} IN ({', '.join([placeholder] * len(values))})")
            params.extend(values)
    return " AND ".join(conditions), params


def select_sql(query: EventQuery, placeholder: str) -> tuple[str, list[object]]:
    """The whole SELECT of the events' bodies, oldest first; with `last`, only the newest N of them."""
    where, params = where_clause(query, placeholder)
    if query.last is None:
        return f"SELECT body FROM events WHERE {where} ORDER BY time, agent, seq", params
    newest = f"SELECT body, time, agent, seq FROM events WHERE {where} ORDER BY time DESC, agent DESC, seq DESC LIMIT {placeholder}"
    return f"SELECT body FROM ({newest}) AS newest ORDER BY time, agent, seq", [*params, query.last]
