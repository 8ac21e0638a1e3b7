"""Events between their JSON form (the spool, the events file) and their protobuf form."""
from __future__ import annotations

import json
from typing import Any

from agent.api.gen.egress_warden.v1 import agent_pb2 as pb
from agent.events import Event, ProcessInfo


def event_from_json(body: str) -> pb.Event:
    """The spool holds each event as the agent's JSON line; `json` carries it unchanged."""
    data: dict[str, Any] = json.loads(body)
    message = pb.Event(
        seq=data["seq"], time=data["time"], agent=data["agent"], kind=data["kind"],
        workload=data.get("workload") or "", verdict=data.get("verdict") or "",
        action=data.get("action") or "", detail_json=json.dumps(data.get("detail") or {}, sort_keys=True),
        json=body)
    if data.get("bytes") is not None:
        message.bytes = data["bytes"]
    if data.get("process"):
        message.process.CopyFrom(process_message(ProcessInfo(**data["process"])))
    if data.get("destination"):
        d = data["destination"]
        message.destination.CopyFrom(pb.Destination(
            ip=d.get("ip") or "", port=d.get("port") or 0, protocol=d.get("protocol") or "", fqdn=d.get("fqdn") or ""))
    return message


def event_message(event: Event) -> pb.Event:
    return event_from_json(event.to_json())


def process_message(p: ProcessInfo) -> pb.ProcessInfo:
    """A process as events and the process list describe it; unknown parts stay empty."""
    return pb.ProcessInfo(pid=p.pid, ppid=p.ppid or 0, uid=p.uid or 0, comm=p.comm or "", exe=p.exe or "",
                          cmdline=p.cmdline or [], start_time=p.start_time or 0.0)
