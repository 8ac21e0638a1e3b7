"""One agent's subscription: connect over mutual TLS, resume after the last seq the store
holds for it, store what the stream brings batch by batch (WatchEventBatches: the agent
sends what is durable, up to 512 events to a message), and on any failure start again
after an exponential backoff with jitter.

Each agent has its own threads, so a dead, slow or stuck agent holds up nobody else. A
failure of the store ends the session too: the next one resumes from what the store
really holds, so no event is skipped and none is stored twice."""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from agent.api.gen.egress_warden.v1 import agent_pb2 as pb
from agent.api.gen.egress_warden.v1 import agent_pb2_grpc as pb_grpc
from agent.collector.config import AgentTarget, TlsFiles
from agent.collector.rows import EventRow, NewRows
from agent.collector.store import EventStore
from agent.collector.tlsprobe import diagnose

log = logging.getLogger("egress_warden.collector")

_CONNECT_TIMEOUT = 10.0  # the first call of a session (TLS handshake and GetStatus)
_STATUS_EVERY = 5.0      # how often a connected agent's latest seq is asked (lag; a stuck agent shows here)
_STATUS_TIMEOUT = 5.0
_HEALTHY_SESSION = 30.0  # a session that lasted this long resets the backoff
_QUEUED_BATCHES = 8      # batches read ahead of the store: at most 8 x 512 events held


class Backoff:
    """Exponential delays with "equal jitter": half fixed, half random, so collectors that
    lost one agent at the same moment do not all come back at the same moment."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** self.failures)
        self.failures += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class AgentState:
    """What `warden collector status` shows of one agent."""

    name: str
    address: str
    agent_id: str = ""
    connected: bool = False
    stored_seq: int = 0       # the highest seq stored from this agent
    latest_seq: int = 0       # the agent's newest seq, from its status and its stream
    events_stored: int = 0    # events this collector stored (not counting ones another had stored)
    events_duplicate: int = 0
    sessions: int = 0
    store_errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0

    @property
    def lag(self) -> int:
        return max(0, self.latest_seq - self.stored_seq)

    def as_dict(self) -> dict:
        return {**self.__dict__, "lag": self.lag}


class SessionFailure(RuntimeError):
    """A failure already described in words; the session starts again after the backoff."""


class StoreFailure(SessionFailure):
    pass


def row_from_message(message: pb.Event) -> EventRow:
    """The row of a streamed event; `json` is the agent's own JSON line, stored as it is."""
    if not message.json:
        raise SessionFailure(f"event seq {message.seq} from {message.agent!r} carries no JSON body")
    return EventRow(message.agent, message.seq, message.time, message.kind, message.workload or None,
                    message.process.pid if message.HasField("process") else None, message.json)


def describe_rpc_error(error: grpc.RpcError) -> str:
    """One line saying what went wrong, in the terms an operator fixes it in."""
    code = error.code()
    details = (error.details() or "").replace("\n", " ")
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"unreachable: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time (agent stuck, or not speaking TLS gRPC on that port)"
    return f"{code.name}: {details}"


class AgentIds:
    """Which configured agent answers to which agent id. Two addresses answering to one id
    would share one resume point and skip each other's events: the second is refused."""

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, agent_id: str, name: str) -> None:
        with self._lock:
            owner = self._owners.setdefault(agent_id, name)
        if owner != name:
            raise SessionFailure(f"it calls itself {agent_id!r}, as agent {owner} does: events are keyed by "
                                 f"(agent id, seq), so give each agent its own --agent-id")


class _End:
    """Put on the queue by the reader when the stream ends; carries the error, if any."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class AgentSubscriber:
    def __init__(self, target: AgentTarget, store: EventStore, tls: TlsFiles, credentials: grpc.ChannelCredentials,
                 agent_ids: AgentIds, before_commit: NewRows, on_stored: Callable[[int], None], *,
                 batch_max: int = 2000) -> None:
        self.target = target
        self.state = AgentState(target.name, target.address)
        self._store = store
        self._tls = tls
        self._credentials = credentials
        self._agent_ids = agent_ids
        self._before_commit = before_commit
        self._on_stored = on_stored
        self._batch_max = batch_max
        self._stop = threading.Event()
        self._stream: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name=f"collector-{target.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._session()
                error = "the agent ended the stream"
            except grpc.RpcError as e:
                error = describe_rpc_error(e)
            except StoreFailure as e:
                self.state.store_errors += 1
                error = str(e)
            except SessionFailure as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - one agent's surprise must not end its subscription
                log.exception("collector: agent %s: unexpected failure", self.target.name)
                error = f"{type(e).__name__}: {e}"
            self.state.connected = False
            if self._stop.is_set():
                break
            if time.monotonic() - began > _HEALTHY_SESSION:
                backoff.reset()
            delay = backoff.next()
            self._report(error, delay)
            self._stop.wait(delay)

    def _report(self, error: str, delay: float) -> None:
        if error != self.state.last_error or time.time() - self.state.last_error_at > 60:
            log.warning("collector: agent %s (%s): %s; retrying in %.1f s",
                        self.target.name, self.target.address, error, delay)
        self.state.last_error = error
        self.state.last_error_at = time.time()

    def _options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 16 << 20)]
        if self.target.server_name:
            options.append(("grpc.ssl_target_name_override", self.target.server_name))
        return options

    def _session(self) -> None:
        with grpc.secure_channel(self.target.address, self._credentials, self._options()) as channel:
            stub = pb_grpc.AgentStub(channel)
            status = self._connect(stub)
            self._agent_ids.claim(status.agent, self.target.name)
            since = self._resume_point(status.agent)
            self.state.agent_id = status.agent
            self.state.stored_seq = since
            self.state.latest_seq = max(status.spool.newest_seq, since)
            self.state.sessions += 1
            stream = stub.WatchEventBatches(pb.WatchEventsRequest(since_seq=since, follow=True))
            self._stream = stream
            if self._stop.is_set():
                stream.cancel()
            self.state.connected = True
            log.info("collector: agent %s (%s) connected: agent id %s, resuming after seq %d",
                     self.target.name, self.target.address, status.agent, since)
            incoming: queue.Queue = queue.Queue(maxsize=_QUEUED_BATCHES)
            done = threading.Event()
            reader = threading.Thread(target=self._read, args=(stream, incoming, done),
                                      name=f"collector-{self.target.name}-read", daemon=True)
            reader.start()
            try:
                self._store_stream(stub, status.agent, incoming)
            finally:
                done.set()
                stream.cancel()
                reader.join(timeout=10)
                self._stream = None

    def _connect(self, stub: pb_grpc.AgentStub) -> pb.Status:
        """The agent's status; when it cannot be had, an error that says why, TLS included."""
        try:
            return stub.GetStatus(pb.GetStatusRequest(), timeout=_CONNECT_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                reason = diagnose(self.target.address, self._tls, self.target.server_name)
                if reason:
                    raise SessionFailure(reason) from e
            raise

    def _resume_point(self, agent_id: str) -> int:
        try:
            return self._store.resume_point(agent_id)
        except Exception as e:  # noqa: BLE001 - any driver error is a store failure here
            raise StoreFailure(f"store {self._store.description}: cannot read the resume point: {e}") from e

    @staticmethod
    def _read(stream, incoming: queue.Queue, done: threading.Event) -> None:
        def put(item) -> bool:
            while not done.is_set():
                try:
                    incoming.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch in stream:
                if not put(batch):
                    return
            put(_End(None))
        except grpc.RpcError as e:
            put(_End(e))

    def _store_stream(self, stub: pb_grpc.AgentStub, agent_id: str, incoming: queue.Queue) -> None:
        next_status = time.monotonic() + _STATUS_EVERY
        while not self._stop.is_set():
            batch, end = self._next_batch(incoming)
            if batch:
                self._store_batch(agent_id, batch)
            if end is not None:
                if end.error is not None:
                    raise end.error
                return
            if time.monotonic() >= next_status:
                status = stub.GetStatus(pb.GetStatusRequest(), timeout=_STATUS_TIMEOUT)
                self.state.latest_seq = max(self.state.latest_seq, status.spool.newest_seq)
                next_status = time.monotonic() + _STATUS_EVERY

    def _next_batch(self, incoming: queue.Queue) -> tuple[list[pb.Event], _End | None]:
        """The next batch the agent sent, joined by those already queued behind it up to
        batch_max events (one transaction for them all when the store falls behind); never
        waits for more than the first."""
        events: list[pb.Event] = []
        try:
            item = incoming.get(timeout=0.5)
        except queue.Empty:
            return events, None
        while True:
            if isinstance(item, _End):
                return events, item
            events.extend(item.events)
            if len(events) >= self._batch_max:
                return events, None
            try:
                item = incoming.get_nowait()
            except queue.Empty:
                return events, None

    def _store_batch(self, agent_id: str, batch: list[pb.Event]) -> None:
        rows = [row_from_message(m) for m in batch]
        strangers = {r.agent for r in rows} - {agent_id}
        if strangers:
            raise SessionFailure(f"the agent said it is {agent_id!r} but sent events of {', '.join(sorted(strangers))}")
        try:
            new = self._store.insert(rows, self._before_commit)
        except Exception as e:  # noqa: BLE001 - any driver error is a store failure here
            raise StoreFailure(f"store {self._store.description}: insert failed: {e}") from e
        self.state.stored_seq = max(self.state.stored_seq, rows[-1].seq)
        self.state.latest_seq = max(self.state.latest_seq, rows[-1].seq)
        self.state.events_stored += len(new)
        self.state.events_duplicate += len(rows) - len(new)
        self._on_stored(len(new))
