"""Test helpers for the agent's gRPC API: channels to a test agent, a flood of real kernel
denials, and the agent's events read back through WatchEvents or WatchEventBatches."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from typing import Iterator

import grpc

from agent.api.gen.egress_warden.v1 import agent_pb2 as pb
from agent.api.gen.egress_warden.v1 import agent_pb2_grpc as pb_grpc
from agentproc import AgentProcess
from agent.lab.network import Lab

__all__ = ["pb", "pb_grpc", "unix_stub", "tls_stub", "free_port", "flood", "settle", "read_all", "read_batches"]


@contextlib.contextmanager
def unix_stub(agent: AgentProcess) -> Iterator[pb_grpc.AgentStub]:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        yield pb_grpc.AgentStub(channel)


@contextlib.contextmanager
def tls_stub(port: int, ca, client=None) -> Iterator[pb_grpc.AgentStub]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        yield pb_grpc.AgentStub(channel)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flood(lab: Lab, agent: AgentProcess, workload: str, seconds: float, count: int | None = None) -> subprocess.Popen:
    """A router in `workload` making denied connects to the lab's attacker as fast as it can
    (for `seconds`, or until `count` attempts): every attempt is a real kernel denial and,
    each to its own port (so no two are folded into one event), one egress_denied event."""
    limit = ["--count", str(count)] if count is not None else []
    return lab.run_in_router(agent.router_cmd(workload, "probe", Lab.ATTACKER4, "20000", "--seconds", str(seconds),
                                              "--interval", "0", "--spread", "40000", *limit),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def settle(agent: AgentProcess, quiet: float = 0.5, timeout: float = 30.0) -> list[dict]:
    """Wait until the agent has published nothing new for `quiet` seconds and every event
    it published (its events file) is durable in the spool; return those events."""
    deadline = time.monotonic() + timeout
    with unix_stub(agent) as stub:
        while True:
            published = agent.events()
            time.sleep(quiet)
            newest = stub.GetStatus(pb.GetStatusRequest(), timeout=10).spool.newest_seq
            if len(agent.events()) == len(published) and newest >= published[-1]["seq"]:
                return published
            assert time.monotonic() < deadline, f"spool at seq {newest}, agent published up to {published[-1]['seq']}"


def read_all(stub: pb_grpc.AgentStub, batched: bool = False, **request) -> list[pb.Event]:
    """The events a WatchEventsRequest gives, through WatchEvents or (batched) WatchEventBatches."""
    if batched:
        return [event for batch in read_batches(stub, **request) for event in batch.events]
    return list(stub.WatchEvents(pb.WatchEventsRequest(**request), timeout=60))


def read_batches(stub: pb_grpc.AgentStub, **request) -> list[pb.EventBatch]:
    return list(stub.WatchEventBatches(pb.WatchEventsRequest(**request), timeout=60))
