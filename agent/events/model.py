"""The event model of DESIGN.md ("Events"): what every consumer (log, actions, spool, API) sees."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class EventKind(str, enum.Enum):
    EGRESS_DENIED = "egress_denied"
    EGRESS_OBSERVED = "egress_observed"
    SOCKET_DESTROYED = "socket_destroyed"
    PROCESS_JOINED = "process_joined"
    PROCESS_EXEC = "process_exec"
    PROCESS_EXITED = "process_exited"
    CGROUP_ESCAPE = "cgroup_escape"
    ACTION_KILL = "action_kill"
    ACTION_QUARANTINE = "action_quarantine"
    ACTION_RELEASE = "action_release"
    POLICY_LOADED = "policy_loaded"
    POLICY_REJECTED = "policy_rejected"
    EVENTS_LOST = "events_lost"
    AGENT_STARTED = "agent_started"
    AGENT_STOPPED = "agent_stopped"


@dataclass
class ProcessInfo:
    pid: int
    ppid: int | None = None
    uid: int | None = None
    comm: str | None = None
    exe: str | None = None
    cmdline: list[str] | None = None
    start_time: float | None = None


@dataclass
class Destination:
    ip: str | None
    port: int | None
    protocol: str
    fqdn: str | None = None


@dataclass
class Event:
    """`seq`, `time` and `agent` are set by the EventBus when the event is published."""

    kind: EventKind
    workload: str | None = None
    process: ProcessInfo | None = None
    destination: Destination | None = None
    verdict: str | None = None
    action: str | None = None
    bytes: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    time: float = 0.0
    agent: str = ""

    def to_dict(self) -> dict[str, Any]:
        # Shallow copies: asdict deep-copies, a large share of the agent's cost per event.
        out = dict(vars(self))
        out["kind"] = self.kind.value
        out["process"] = dict(vars(self.process)) if self.process else None
        out["destination"] = dict(vars(self.destination)) if self.destination else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)
