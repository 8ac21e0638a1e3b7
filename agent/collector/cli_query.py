"""`warden events --db`: the same request `warden events` sends an agent, answered by a collector's store."""
from __future__ import annotations

from typing import Callable

import click

from agent.api.convert import event_from_json
from agent.api.gen.egress_warden.v1 import agent_pb2 as pb
from agent.collector.query import EventQuery
from agent.collector.rows import event_json
from agent.collector.store import open_store


def query_from_request(request: pb.WatchEventsRequest, agent: str | None) -> EventQuery:
    return EventQuery(since_seq=request.since_seq, since_time=request.since_time or None, last=request.last or None,
                      agent=agent, workloads=tuple(request.workloads), kinds=tuple(request.kinds),
                      pid=request.pid or None)


def print_from_store(url: str | None, agent: str | None, request: pb.WatchEventsRequest,
                     show: Callable[[pb.Event], None]) -> None:
    if not url:
        raise click.UsageError("--agent filters a collector's store: give --db STORE too")
    if request.follow:
        raise click.UsageError("--follow reads an agent; a store is queried as it is (repeat with --since SEQ)")
    try:
        store = open_store(url, create=False)
    except Exception as e:  # noqa: BLE001 - any driver error: the message names the store and why
        raise click.ClickException(f"cannot open the store: {e}") from None
    try:
        for event in store.query(query_from_request(request, agent)):
            show(event_from_json(event_json(event)))
    finally:
        store.close()
