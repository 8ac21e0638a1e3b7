"""An event as a store row: the columns queries filter on, plus the whole event as JSON."""
from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

COLUMNS = ("agent", "seq", "time", "kind", "workload", "pid", "body")


class EventRow(NamedTuple):
    agent: str
    seq: int
    time: float
    kind: str
    workload: str | None
    pid: int | None
    body: str


def row_from_event(event: dict[str, Any]) -> EventRow:
    """The row for one event dict (as `Event.to_dict()` gives it); refuses an event without agent or seq."""
    if not event.get("agent") or not isinstance(event.get("seq"), int) or event["seq"] <= 0:
        raise ValueError(f"an event to store needs an agent and a positive seq: {event!r:.200}")
    process = event.get("process") or {}
    return EventRow(event["agent"], event["seq"], float(event.get("time") or 0.0), str(event["kind"]),
                    event.get("workload"), process.get("pid"), event_json(event))


def event_json(event: dict[str, Any]) -> str:
    """An event dict as the agent writes it (Event.to_json): compact, keys sorted."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True)


# Called with the rows an insert stored anew, inside its transaction, before the commit:
# an exception there rolls the insert back.
NewRows = Callable[[list[EventRow]], None]
