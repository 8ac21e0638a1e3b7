"""The agent's gRPC API: the whole of it on a Unix socket, the read-only part on TCP with
mutual TLS (DESIGN.md, "gRPC"; proto/egress_warden/v1/agent.proto).

WatchEvents and WatchEventBatches stream from the spool by seq, one event or one page of
events to a message. A subscriber's stream is a cursor into SQLite, not a queue in the
agent, so a slow or stalled subscriber costs a thread and a read connection, never memory
that grows, and never slows enforcement or other subscribers."""
from __future__ import annotations

import dataclasses
import functools
import grp
import json
import os
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc

import agent as agent_package
from agent.api.convert import event_from_json, event_message, process_message
from agent.api.gen.egress_warden.v1 import agent_pb2 as pb
from agent.api.gen.egress_warden.v1 import agent_pb2_grpc as pb_grpc
from agent.cgroups.posture import workload_posture
from agent.daemon import Agent, RunningWorkload
from agent.events import Event, EventBus, EventKind
from agent.events.process import describe_process
from agent.events.spool import Filters, Spool, SpoolReader
from agent.kernel.sockets import InetSocket, process_sockets
from agent.policy import PolicyError, parse_policy
from agent.traffic import DestinationTraffic, ProcessTraffic

MAX_REQUEST_BYTES = 1 << 20  # a policy text is the largest request; 1 MiB is plenty
MAX_RESPONSE_BYTES = 16 << 20
MAX_STREAMS = 48  # event streams (WatchEvents, WatchEventBatches) at once, per server; each holds one thread
_WORKERS = MAX_STREAMS + 16  # so unary calls still find a thread when every stream is open
# An EventBatch stops growing past this many bytes of event JSON: each event travels about
# twice (its fields and its JSON line), so a batch stays well under gRPC's default 4 MiB
# receive limit, which a client that set no limit of its own has.
_PAGE_BODY_BYTES = 1 << 20
_FOLLOW_WAKE_SECONDS = 1.0  # a follower re-checks that its client is still there this often
_DURABLE_WAIT_SECONDS = 5.0  # a control call's reply waits at most this long for its event to be spooled
_TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2", 6: "time_wait",
               7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing"}
_KINDS = {k.value for k in EventKind}


def _control(method: Callable) -> Callable:
    """A call that changes enforcement: served on the Unix socket only."""

    @functools.wraps(method)
    def guarded(self: "AgentService", request, context: grpc.ServicerContext):
        if not self.control:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method.__name__} changes enforcement: it is served on the agent's Unix socket only")
        return method(self, request, context)

    return guarded


def _workload_call(method: Callable) -> Callable:
    """A call naming a workload: an unknown name is NOT_FOUND, not a crash."""

    @functools.wraps(method)
    def checked(self: "AgentService", request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]) if e.args else "no such workload")

    return checked


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, agent: Agent, bus: EventBus, spool: Spool, *, started_at: float, control: bool) -> None:
        self.agent = agent
        self.bus = bus
        self.spool = spool
        self.started_at = started_at
        self.control = control
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)

    # --- read-only -----------------------------------------------------------------------

    def GetStatus(self, request, context) -> pb.Status:
        kernel = self.agent.kernel_figures()
        return pb.Status(
            agent=self.bus.agent_id, version=agent_package.__version__, started_at=self.started_at,
            uptime_seconds=time.time() - self.started_at, kernel_features=kernel["features"],
            policy_path=str(self.agent.policy_path), workloads=self._workloads(),
            event_counts=dict(self.bus.counts), kernel_records_lost=kernel["records_lost"],
            spool=pb.SpoolStatus(**dataclasses.asdict(self.spool.figures())))

    def ListWorkloads(self, request, context) -> pb.ListWorkloadsResponse:
        return pb.ListWorkloadsResponse(workloads=self._workloads())

    def _workloads(self) -> list[pb.Workload]:
        return [_workload_message(running, pids) for running, pids in self.agent.workload_members()]

    @_workload_call
    def ListProcesses(self, request, context) -> pb.ListProcessesResponse:
        members = self.agent.workload_members()
        counted = {(p.workload, p.pid): p for p in self.agent.traffic_by_process()}
        if request.workload:
            members = [(w, pids) for w, pids in members if w.spec.name == request.workload]
            if not members:
                raise KeyError(f"no workload named {request.workload!r} in the policy in force")
        return pb.ListProcessesResponse(processes=[
            _process_message(running.spec.name, pid, counted.get((running.spec.name, pid)))
            for running, pids in members for pid in pids])

    def GetPolicy(self, request, context) -> pb.PolicyInForce:
        policy = self.agent.policy
        return pb.PolicyInForce(path=policy.path, notices=list(policy.notices),
                                policy_json=json.dumps(dataclasses.asdict(policy), sort_keys=True))

    def CheckPolicy(self, request, context) -> pb.CheckPolicyResponse:
        try:
            policy = parse_policy(request.text, request.name or "<request>")
        except PolicyError as e:
            return pb.CheckPolicyResponse(ok=False, problems=[
                pb.PolicyProblem(file=p.path, line=p.line or 0, key=p.key, reason=p.reason) for p in e.problems])
        return pb.CheckPolicyResponse(ok=True, notices=list(policy.notices),
                                      workloads=[w.name for w in policy.workloads])

    def WatchEvents(self, request, context) -> Iterator[pb.Event]:
        for page in self._pages(request, context):
            yield from page

    def WatchEventBatches(self, request, context) -> Iterator[pb.EventBatch]:
        for page in self._pages(request, context):
            yield pb.EventBatch(events=page)

    def _pages(self, request, context) -> Iterator[list[pb.Event]]:
        """The events a WatchEventsRequest asks for, in pages of what is durable when read
        (never waiting to fill one); one of at most MAX_STREAMS streams of this server."""
        unknown = sorted(set(request.kinds) - _KINDS)
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown event kind(s) {', '.join(unknown)}; kinds: {', '.join(sorted(_KINDS))}")
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the agent already serves {MAX_STREAMS} event streams here; try again later")
        try:
            yield from self._read_pages(request, context)
        finally:
            self._streams.release()

    def _read_pages(self, request, context) -> Iterator[list[pb.Event]]:
        """Every page reports first what the spool's bound dropped before this stream read it,
        at its start (a resume from before the oldest event held) or while it runs (a slow
        subscriber the bound overtook)."""
        filters = Filters(tuple(request.workloads), tuple(request.kinds), request.pid)
        handed_out = max(self.spool.committed, self.bus.first_seq - 1)  # seqs below first_seq: earlier runs'
        if request.since_seq > handed_out:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"asked for events after seq {request.since_seq}, but this agent ({self.bus.agent_id}) has "
                          f"handed out none beyond {handed_out}. A collector "
                          "that stored more of this agent id saw another history: this agent's state directory was "
                          "reset (a re-imaged host?) and its seqs began again, so its new events would take seqs "
                          "already stored; start it with another --agent-id")
        with self.spool.reader() as reader:
            after = self._start_after(request, reader, filters)
            while context.is_active():
                upto = self.spool.committed
                page = reader.page_after(after, filters, upto)
                if page.lost:
                    yield [self._lost_event(page.lost, after + 1, page.last_lost)]
                    after = page.last_lost
                yield from _split_by_size(page.rows)
                if page.rows:
                    after = page.rows[-1][0]
                    if len(page.rows) == reader.page:
                        continue
                after = max(after, upto)  # everything up to `upto` has been read, matching or not
                if not request.follow:
                    return
                self.spool.wait_beyond(after, _FOLLOW_WAKE_SECONDS)
                if self.spool.closed:
                    return

    @staticmethod
    def _start_after(request, reader: SpoolReader, filters: Filters) -> int:
        """The seq the stream starts after."""
        if request.since_seq or not (request.since_time or request.last):
            return request.since_seq
        if request.since_time:
            return reader.seq_before_time(request.since_time)
        return reader.seq_before_last(request.last, filters)

    def _lost_event(self, count: int, first: int, last: int) -> pb.Event:
        event = Event(EventKind.EVENTS_LOST, detail={
            "count": count, "first_seq": first, "last_seq": last,
            "where": "spool bound (size or age): dropped before this subscriber read them"})
        event.seq, event.time, event.agent = last, time.time(), self.bus.agent_id
        return event_message(event)

    # --- control -------------------------------------------------------------------------

    @_control
    def ReloadPolicy(self, request, context) -> pb.ReloadPolicyResponse:
        event = self.agent.reload()
        return pb.ReloadPolicyResponse(ok=event.kind == EventKind.POLICY_LOADED,
                                       problems=event.detail.get("problems", []), event=self._durable(event))

    @_control
    @_workload_call
    def Quarantine(self, request, context) -> pb.ActionResponse:
        return pb.ActionResponse(event=self._durable(self.agent.quarantine(request.workload)))

    @_control
    @_workload_call
    def Release(self, request, context) -> pb.ActionResponse:
        return pb.ActionResponse(event=self._durable(self.agent.release(request.workload)))

    @_control
    @_workload_call
    def Kill(self, request, context) -> pb.ActionResponse:
        return pb.ActionResponse(event=self._durable(self.agent.kill(request.workload)))

    def _durable(self, event: Event) -> pb.Event:
        """The event, once it is in the spool: what a control call reports, `warden events` shows next."""
        self.spool.wait_beyond(event.seq - 1, _DURABLE_WAIT_SECONDS)
        return event_message(event)


def _split_by_size(rows: list[tuple[int, str]]) -> Iterator[list[pb.Event]]:
    """The spool rows as pages of events, each page under _PAGE_BODY_BYTES of JSON (but at
    least one event)."""
    page: list[pb.Event] = []
    size = 0
    for _, body in rows:
        if page and size + len(body) > _PAGE_BODY_BYTES:
            yield page
            page, size = [], 0
        page.append(event_from_json(body))
        size += len(body)
    if page:
        yield page


def _workload_message(running: RunningWorkload, pids: list[int]) -> pb.Workload:
    spec = running.spec
    return pb.Workload(
        name=spec.name, mode=spec.mode, on_violation=spec.on_violation,
        state="quarantined" if running.quarantined else "guarded", quarantined_since=running.quarantined_since or 0,
        cgroups=[str(c) for c in running.cgroup_dirs], processes=len(pids),
        allow=[f"{r.kind} {r.value} {r.protocol}/{','.join(map(str, r.ports)) or 'any'}" for r in spec.allow],
        posture=[pb.PostureWarning(pid=w.pid, code=w.code, detail=w.detail)
                 for w in workload_posture(running.cgroup_dirs)])


def _process_message(workload: str, pid: int, traffic: ProcessTraffic | None) -> pb.Process:
    """A process with the destinations its socket table names and those the kernel counted
    bytes to (whose sockets may be closed by now), with the counts as of the last tick."""
    info = describe_process(pid)
    try:
        held = process_sockets(pid)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        held = []
    sent = {(d.address, d.port, d.protocol): d for d in traffic.destinations if not d.listen} if traffic else {}
    destinations = []
    for sock in held:
        if sock.connected:
            counted = sent.pop((sock.remote_ip_unmapped, sock.remote_port, sock.protocol_name), None)
            destinations.append(_destination_message(sock, counted))
    destinations += [pb.ProcessDestination(ip=d.address, port=d.port, protocol=d.protocol, state="closed",
                                           fqdn=d.fqdn or "", bytes_sent=d.bytes, packets_sent=d.packets)
                     for d in sent.values()]
    return pb.Process(
        workload=workload, process=process_message(info),
        bytes_sent=traffic.bytes if traffic else 0,
        packets_sent=sum(d.packets for d in traffic.destinations) if traffic else 0,
        destinations=destinations)


def _destination_message(sock: InetSocket, counted: DestinationTraffic | None) -> pb.ProcessDestination:
    state = _TCP_STATES.get(sock.state, str(sock.state)) if sock.protocol_name == "tcp" else "connected"
    return pb.ProcessDestination(ip=sock.remote_ip_unmapped, port=sock.remote_port, protocol=sock.protocol_name,
                                 local_port=sock.local_port, state=state, fqdn=counted.fqdn or "" if counted else "",
                                 bytes_sent=counted.bytes if counted else 0,
                                 packets_sent=counted.packets if counted else 0)


# --- serving ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


def _server() -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="api"),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                 ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
                 # Find subscribers that vanished without closing their stream.
                 ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)],
        maximum_concurrent_rpcs=_WORKERS)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


class ApiServers:
    """The Unix-socket server and, when asked for, the mTLS TCP server."""

    def __init__(self, agent: Agent, bus: EventBus, spool: Spool, *, started_at: float) -> None:
        self._service = functools.partial(AgentService, agent, bus, spool, started_at=started_at)
        self._servers: list[grpc.Server] = []
        self.socket: Path | None = None
        self.tcp_port: int | None = None

    def serve_unix(self, path: Path, group: str) -> None:
        """Bind `path` with mode 0660, owner root and `group`. The umask makes the socket
        0660 from the moment it exists: no instant where others could connect. Its directory
        must be one only root can change (the agent's command checks it), or a link put in the
        socket's place would have the chown and chmod below land on another file."""
        gid = grp.getgrnam(group).gr_gid
        if path.is_socket():
            if _answers(path):
                raise OSError(f"{path}: another agent is serving this socket; give this one --socket")
            path.unlink()  # left by an agent that died
        server = _server()
        pb_grpc.add_AgentServicer_to_server(self._service(control=True), server)
        previous = os.umask(0o117)
        try:
            server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(previous)
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, 0o660)
        server.start()
        self._servers.append(server)
        self.socket = path

    def serve_tcp(self, address: str, tls: TlsFiles) -> None:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=tls.client_ca.read_bytes(),
            require_client_auth=True)
        server = _server()
        pb_grpc.add_AgentServicer_to_server(self._service(control=False), server)
        self.tcp_port = server.add_secure_port(address, credentials)
        if not self.tcp_port:
            raise OSError(f"cannot listen on {address}")
        server.start()
        self._servers.append(server)

    def stop(self) -> None:
        for server in self._servers:
            server.stop(grace=1.0).wait()
        if self.socket is not None and self.socket.is_socket():
            self.socket.unlink()
