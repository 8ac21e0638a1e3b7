"""The in-path DNS proxy (DESIGN.md, "DNS").

The kernel sends every port-53 query of a DNS workload to this proxy's loopback port in the
querying process's own network namespace (one port per namespace and workload). The proxy
answers names the workload may reach by asking the upstream resolvers, writes the answer's
addresses into the workload's allow map and only then releases the answer; every other name
gets REFUSED and a dns_denied event. One thread serves every namespace with a selector: the
sockets were created inside each namespace (agent.kernel.netns) and stay there."""
from __future__ import annotations

import ipaddress
import logging
import os
import queue
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from agent.dns import wire
from agent.dns.names import NameGrant, NameMatcher
from agent.dns.remembered import RememberedAnswers
from agent.events import Destination, Event, EventKind
from agent.events.process import describe_process
from agent.kernel.loader import PORT_ANY, AllowEntry, KernelPrograms
from agent.kernel.netns import in_netns, in_netns_of, netns_cookie, netns_inode
from agent.kernel.sockets import process_sockets

log = logging.getLogger(__name__)

MAX_TTL = 3600  # answers are honoured (and handed out) for at most an hour before a new lookup
UPSTREAM_TIMEOUT = 2.0  # then the next upstream is asked, if the policy lists one
ALLOWED_WINDOW = 5.0  # dns_allowed: one event per name and workload per window, with a count
DENIED_PER_WINDOW = 20  # dns_denied events per workload (and mode) per window; the rest are counted
MAX_PENDING = 16384  # queries waiting for upstream answers; beyond: SERVFAIL (ids are 16 bits)
# One workload's routers may hold this many of them: a flood leaves the rest to the other
# workloads and to the agent's own refreshes (which need only a free slot).
MAX_PENDING_PER_WORKLOAD = MAX_PENDING // 8
# A query is kept whole while it waits. One question, an OPT record, even a TSIG take a few
# hundred bytes; a larger query gets FORMERR, not up to 64 KB of a pending slot.
MAX_QUERY = 4096
MAX_REMEMBERED_NAMES = 65536  # addresses whose name labels counters and metrics
TCP_IDLE = 10.0
TCP_CLIENTS_PER_LISTENER = 64
# Answers queued for a TCP client beyond what its socket holds. At this many the client's
# queries wait unread until it reads; an upstream answer arriving then closes it.
TCP_MAX_QUEUED = 128 << 10
REFRESH_RETRY = 5.0
OPEN_RETRY = 5.0  # a namespace where the proxy could not open is tried again after this
_BUFFER = 4 << 20
_SO_RCVBUFFORCE = 33
_TCP_MAX_BUFFER = 2 + wire.MAX_UDP_PAYLOAD
_WRITE_SLACK_NS = 500_000_000
_HOUSEKEEPING_SECONDS = 0.1

Address = tuple[str, int]


@dataclass
class WorkloadDns:
    """What the proxy needs of one workload's policy."""

    name: str
    index: int
    mode: str
    matcher: NameMatcher
    upstreams: list[Address]
    grace_seconds: int
    pids: Callable[[], list[int]]  # the workload's processes now


def parse_upstreams(configured: tuple[str, ...], resolv_conf: Path = Path("/etc/resolv.conf")) -> list[Address]:
    """Resolver addresses from dns.upstream; `system` is /etc/resolv.conf's nameservers."""
    found: list[Address] = []
    for item in configured:
        if item == "system":
            found.extend((ns, 53) for ns in system_nameservers(resolv_conf))
        elif item.startswith("["):
            host, _, port = item[1:].partition("]:")
            found.append((host, int(port)))
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
            found.append((host, int(port)))
        else:
            found.append((item, 53))
    return list(dict.fromkeys(found))


def system_nameservers(resolv_conf: Path) -> list[str]:
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
            except ValueError:
                continue
    return servers


@dataclass
class _Listener:
    """The proxy's sockets in one network namespace for one workload."""

    workload: str
    netns: int
    cookie: int
    port: int
    sockets: dict[str, socket.socket]  # udp4 tcp4 udp6 tcp6 up4 up6 (v6 ones when the namespace has ::1)
    netns_fd: int  # to open upstream TCP connections there later
    clients: set = field(default_factory=set)

    def upstream_socket(self, host: str) -> socket.socket | None:
        return self.sockets.get("up6" if ":" in host else "up4")


@dataclass(eq=False)  # kept in a set, by identity
class _TcpClient:
    sock: socket.socket
    listener: _Listener
    peer: Address
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    last_active: float = field(default_factory=time.monotonic)
    closed: bool = False

    @property
    def backlogged(self) -> bool:
        return len(self.outbuf) >= TCP_MAX_QUEUED


@dataclass
class _Pending:
    listener: _Listener | None
    workload: str
    query_id: int
    question: wire.Question
    respond: Callable[[bytes], None] | None  # None: a refresh of the agent's own
    packet: bytes
    question_end: int | None
    deadline: float
    attempt: int  # index of the upstream asked
    over_tcp: bool  # the router asked over TCP: a truncated answer is asked again over TCP


def _open_sockets() -> dict[str, socket.socket]:
    """Run inside the target namespace: loopback listeners on one free port, and sockets to
    ask the upstream resolvers from there (they are reachable from the router's namespace)."""
    for _ in range(32):
        made: dict[str, socket.socket] = {}
        try:
            made["udp4"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            made["udp4"].bind(("127.0.0.1", 0))
            port = made["udp4"].getsockname()[1]
            made["tcp4"] = _tcp_listener(socket.AF_INET, ("127.0.0.1", port))
            try:
                made["udp6"] = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                made["udp6"].bind(("::1", port))
                made["tcp6"] = _tcp_listener(socket.AF_INET6, ("::1", port))
            except OSError as e:
                if e.errno != 99:  # EADDRNOTAVAIL: no IPv6 loopback in this namespace
                    raise
                for name in ("udp6", "tcp6"):
                    made.pop(name).close() if name in made else None
            made["up4"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if "udp6" in made:
                made["up6"] = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError as e:
            for sock in made.values():
                sock.close()
            if e.errno == 98:  # EADDRINUSE: the port is free for IPv4 only; try another
                continue
            raise
        for name, sock in made.items():
            sock.setblocking(False)
            if name.startswith(("udp", "up")):
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _BUFFER)
        return made
    raise OSError("no loopback port free for both IPv4 and IPv6 after 32 tries")


def _tcp_listener(family: int, address: Address) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


class DnsProxy:
    def __init__(self, kernel: KernelPrograms, events: queue.SimpleQueue, answers: RememberedAnswers) -> None:
        self._kernel = kernel
        self._answers = answers
        self._events = events  # the agent publishes them from its own thread
        self._workloads: dict[str, WorkloadDns] = {}
        self._listeners: dict[tuple[int, str], _Listener] = {}  # (netns inode, workload)
        self._lock = threading.Lock()  # guards _listeners against the agent's thread
        self._selector = selectors.DefaultSelector()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a full pipe already means "wake up"
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._pending: dict[tuple[int, int], _Pending] = {}  # (id of the upstream socket, query id)
        self._pending_by_workload: Counter = Counter()
        self._allowed_counts: Counter = Counter()
        # By (workload, mode), this window: the summary of a flood carries its events' verdict.
        self._denied_counts: Counter = Counter()
        self._allowed_addresses: dict[tuple[str, str], list[str]] = {}
        self._next_flush = time.monotonic() + ALLOWED_WINDOW
        self._refresh_at: dict[tuple[str, str, int], float] = {}
        # workload -> (its config, (asked name, address) -> expires_ns last written under that
        # config): a busy name's answers skip the allow map while the entry there outlives them
        # anyway. A reload brings a new config, whose grants are written afresh. The proxy's
        # thread alone touches it, so nothing the agent's thread does is undone here.
        self._written: dict[str, tuple[WorkloadDns, dict[tuple[str, str], int]]] = {}
        # address -> the name it was last resolved from, for labels in counters and metrics;
        # bounded, the oldest answer forgotten first.
        self._name_of: dict[str, str] = {}
        self._next_housekeeping = 0.0
        self._failed_opens: dict[tuple[int, str], float] = {}  # the agent's thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-proxy", daemon=True)

    # --- the agent's side (its own thread) ----------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        self._answers.save_if_changed()
        with self._lock:
            for listener in self._listeners.values():
                for sock in listener.sockets.values():
                    sock.close()
                os.close(listener.netns_fd)
            self._listeners.clear()

    def set_workload(self, name: str, config: WorkloadDns | None) -> None:
        """Serve (or, with None, stop serving) one workload's DNS."""
        if config is not None:
            reloaded = name in self._workloads
            self._workloads = {**self._workloads, name: config}
            self._restore_earlier_answers(config)
            if reloaded:
                self._hold_answers_to(config)
            return
        self._answers.forget_workload(name)
        old = self._workloads.get(name)
        self._workloads = {k: v for k, v in self._workloads.items() if k != name}
        with self._lock:
            stale = [key for key in self._listeners if key[1] == name]
        for key in stale:
            self._close_listener(key, old)

    def open_for(self, workload: str, pid: int) -> None:
        """Make sure the workload's proxy listens in the network namespace of `pid`. Called
        when a process joins; until then the kernel refuses its queries (fail closed)."""
        config = self._workloads.get(workload)
        if config is None:
            return
        try:
            key = (netns_inode(pid), workload)
        except FileNotFoundError:
            return
        if self._failed_opens.get(key, 0) > time.monotonic():
            return  # every refused query asks again: do not retry (and log) each time
        with self._lock:
            if key in self._listeners:
                return
            try:
                sockets = in_netns_of(pid, _open_sockets)
            except OSError as e:
                self._failed_opens[key] = time.monotonic() + OPEN_RETRY
                log.warning("cannot open the DNS proxy in the network namespace of %d (its DNS stays refused; "
                            "retried in %.0f s): %s", pid, OPEN_RETRY, e)
                return
            try:
                netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            except FileNotFoundError:
                for sock in sockets.values():
                    sock.close()
                return
            listener = _Listener(workload, key[0], netns_cookie(sockets["udp4"]), sockets["udp4"].getsockname()[1],
                                 sockets, netns_fd)
            self._listeners[key] = listener
        self._commands.put(("register", listener))
        self._wake()
        # The sockets are bound: queries queue up in them until the loop registers them.
        self._kernel.set_dns_proxy(listener.cookie, config.index, listener.port)
        log.info("DNS proxy of %s listens on port %d in network namespace %d", workload, listener.port, key[0])

    def sweep(self) -> None:
        """Once a second: close listeners whose namespace has no process of the workload
        left, and remove expired answers no established socket uses."""
        for config in list(self._workloads.values()):
            pids = config.pids()
            live = set()
            for pid in pids:
                try:
                    live.add(netns_inode(pid))
                except FileNotFoundError:
                    continue
            with self._lock:
                gone = [key for key in self._listeners if key[1] == config.name and key[0] not in live]
            for key in gone:
                self._close_listener(key, config)
            now_ns = time.monotonic_ns()
            self._kernel.remove_dns_entries(config.index, now_ns, _in_use_by(pids))
            self._answers.forget(config.name, now_ns, lambda: self._kernel.dns_addresses(config.index))
        self._answers.save_if_changed()

    def _close_listener(self, key: tuple[int, str], config: WorkloadDns | None) -> None:
        with self._lock:
            listener = self._listeners.pop(key, None)
        if listener is None:
            return
        if config is not None:
            self._kernel.set_dns_proxy(listener.cookie, config.index, None)
        self._commands.put(("close", listener))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass

    # --- the proxy's thread -------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._selector.select(timeout=0.25):
                try:
                    key.data(key.fileobj, mask)
                except Exception:  # one bad packet or peer must never stop the proxy
                    log.exception("DNS proxy: error while serving %s", key.fileobj)
            now = time.monotonic()
            if now >= self._next_housekeeping:
                self._next_housekeeping = now + _HOUSEKEEPING_SECONDS
                self._expire_pending(now)
                self._close_idle_clients(now)
                self._refresh_names(now)
            if now >= self._next_flush:
                self._flush_allowed(now)

    def _on_wake(self, sock: socket.socket, _mask: int) -> None:
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                command, listener = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "register":
                self._register(listener)
            elif command == "close":
                self._unregister(listener)
            else:
                self._on_tcp_upstream_answer(*listener)

    def _register(self, listener: _Listener) -> None:
        for name, sock in listener.sockets.items():
            handler = {"udp": self._on_udp_query, "tcp": self._on_tcp_accept, "up": self._on_upstream}
            callback = handler[name.rstrip("46")]
            self._selector.register(sock, selectors.EVENT_READ, lambda s, m, cb=callback, li=listener: cb(li, s))

    def _unregister(self, listener: _Listener) -> None:
        for client in list(listener.clients):
            self._close_client(client)
        for sock in listener.sockets.values():
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        os.close(listener.netns_fd)
        for key in [k for k, p in self._pending.items() if p.listener is listener]:
            self._take_pending(key)

    # --- queries ---------------------------------------------------------------------

    def _on_udp_query(self, listener: _Listener, sock: socket.socket) -> None:
        for packet, peer in _datagrams(sock):
            self._on_query(listener, packet, peer[:2], "udp", lambda answer, s=sock, p=peer: _sendto(s, answer, p))

    def _on_query(self, listener: _Listener, packet: bytes, peer: Address, protocol: str,
                  respond: Callable[[bytes], None]) -> None:
        config = self._workloads.get(listener.workload)
        try:
            query = wire.parse_query(packet)
        except wire.DnsFormatError:
            answer = wire.error_reply(packet, wire.RCODE_FORMERR, None)
            if answer:
                respond(answer)
            return
        if len(packet) > MAX_QUERY:
            respond(wire.error_reply(packet, wire.RCODE_FORMERR, query.question_end))
            return
        if config is None:
            respond(wire.error_reply(packet, wire.RCODE_REFUSED, query.question_end))
            return
        grants = config.matcher.grants(query.question.name)
        if not grants:
            self._report_denied(config, listener, query, peer, protocol)
            if config.mode == "enforce":
                respond(wire.error_reply(packet, wire.RCODE_REFUSED, query.question_end))
                return
        if not config.upstreams:
            respond(wire.error_reply(packet, wire.RCODE_SERVFAIL, query.question_end))
            return
        self._forward(listener, config, query.question, packet, respond, query.question_end,
                      over_tcp=protocol == "tcp")

    def _forward(self, listener: _Listener | None, config: WorkloadDns, question: wire.Question, packet: bytes,
                 respond: Callable[[bytes], None] | None,
                 question_end: int | None = None, attempt: int = 0, over_tcp: bool = False) -> None:
        upstream = config.upstreams[attempt % len(config.upstreams)]
        sock = listener.upstream_socket(upstream[0])
        if sock is None or not self._room_to_wait(config.name, refresh=respond is None):
            if respond:
                respond(wire.error_reply(packet, wire.RCODE_SERVFAIL, question_end))
            return
        # Unpredictable ids: with the resolver's address and the question, what tells its
        # answer from a forged one.
        ident = secrets.randbits(16)
        while (id(sock), ident) in self._pending:
            ident = secrets.randbits(16)
        key = (id(sock), ident)
        self._hold_pending(key, _Pending(
            listener, config.name, struct.unpack_from("!H", packet)[0], question, respond, packet,
            question_end, time.monotonic() + UPSTREAM_TIMEOUT, attempt, over_tcp))
        try:
            sock.sendto(wire.with_id(packet, ident), upstream)
        except OSError as e:
            self._take_pending(key)
            log.debug("DNS upstream %s: %s", upstream, e)
            if respond:
                respond(wire.error_reply(packet, wire.RCODE_SERVFAIL, question_end))

    def _room_to_wait(self, workload: str, refresh: bool) -> bool:
        if len(self._pending) >= MAX_PENDING:
            return False
        return refresh or self._pending_by_workload[workload] < MAX_PENDING_PER_WORKLOAD

    def _hold_pending(self, key: tuple[int, int], pending: _Pending) -> None:
        self._pending[key] = pending
        self._pending_by_workload[pending.workload] += 1

    def _take_pending(self, key: tuple[int, int]) -> _Pending:
        pending = self._pending.pop(key)
        self._pending_by_workload[pending.workload] -= 1
        return pending

    def _on_upstream(self, listener: _Listener | None, sock: socket.socket) -> None:
        for packet, source in _datagrams(sock):
            if len(packet) < 2:
                continue
            key = (id(sock), struct.unpack_from("!H", packet)[0])
            pending = self._pending.get(key)
            config = self._workloads.get(pending.workload) if pending else None
            if pending is None or config is None or (source[0], source[1]) not in config.upstreams:
                continue
            try:
                response = wire.parse_response(packet)
            except wire.DnsFormatError:
                continue  # a later, readable answer may still come; else the query times out
            if response.question != pending.question:
                continue  # not the answer to what was asked (a spoofing attempt)
            self._take_pending(key)
            if response.truncated and pending.over_tcp:
                self._ask_over_tcp(pending, (source[0], source[1]))
                continue
            self._release(config, pending, packet, response)

    def _ask_over_tcp(self, pending: _Pending, upstream: Address) -> None:
        """The answer did not fit UDP and the router asked over TCP: ask the same resolver
        over TCP, from a short-lived thread inside the router's namespace (a rare path)."""
        def exchange() -> bytes | None:
            try:
                with socket.create_connection(upstream, timeout=UPSTREAM_TIMEOUT) as conn:
                    conn.sendall(struct.pack("!H", len(pending.packet)) + pending.packet)
                    size = struct.unpack("!H", _read_exactly(conn, 2))[0]
                    return _read_exactly(conn, size)
            except (OSError, struct.error):
                return None

        def in_background() -> None:
            try:
                answer = in_netns(pending.listener.netns_fd, exchange)
            except OSError:
                answer = None  # the namespace is gone
            self._commands.put(("tcp-answer", (pending, answer)))
            self._wake()

        threading.Thread(target=in_background, name="dns-tcp-upstream", daemon=True).start()

    def _on_tcp_upstream_answer(self, pending: _Pending, packet: bytes | None) -> None:
        config = self._workloads.get(pending.workload)
        response = None
        if packet is not None:
            try:
                response = wire.parse_response(packet)
            except wire.DnsFormatError:
                pass
        if config is None or response is None or response.question != pending.question:
            if pending.respond:
                pending.respond(wire.error_reply(pending.packet, wire.RCODE_SERVFAIL, pending.question_end))
            return
        self._release(config, pending, packet, response)

    def _release(self, config: WorkloadDns, pending: _Pending, packet: bytes, response: wire.Response) -> None:
        """Allow the answer's addresses first, then hand the answer (with capped TTLs) out. The
        grants are those of the policy in force now: a reload may have come while it was asked."""
        name = pending.question.name
        grants = config.matcher.grants(name)
        records = wire.addresses_for(response, name)
        if grants and records:
            self._allow(config, name, grants, records)
        if pending.respond is None:
            self._schedule_refresh(config.name, pending.question, records)
            return
        if grants:
            counted = (config.name, name)
            self._allowed_counts[counted] += 1
            if counted not in self._allowed_addresses:
                self._allowed_addresses[counted] = sorted({r.value for r in records})
        answer = wire.cap_ttls(packet, response, MAX_TTL)
        pending.respond(wire.with_id(answer, pending.query_id))

    def _allow(self, config: WorkloadDns, name: str, grants: list[NameGrant], records: list[wire.Record]) -> None:
        """Write the records' addresses into the workload's allow map, for TTL + grace. An
        entry that already lasts until at least _WRITE_SLACK_NS before that is left alone:
        the slack is below the grace floor, so it still outlives the TTL handed out. An address
        new to the workload is on disk before the answer goes out (within SAVE_AT_MOST_EVERY of
        another; a later expiry within a second), so that a connection made from an answer
        outlives an agent's crash."""
        now = time.monotonic_ns()
        written = self._written_under(config)
        entries = []
        new = False
        for record in records:
            self._remember_name(record.value, name)
            expires = now + (min(record.ttl, MAX_TTL) + config.grace_seconds) * 1_000_000_000
            if written.get((name, record.value), 0) >= expires - _WRITE_SLACK_NS:
                continue
            written[(name, record.value)] = expires
            new |= self._answers.note(config.name, name, record.value, expires)
            entries += _allow_entries(record.value, grants, expires)
        if new:
            self._answers.save_soon()
        if entries:
            self._kernel.allow_until(config.index, entries, _WRITE_SLACK_NS)

    def _written_under(self, config: WorkloadDns) -> dict[tuple[str, str], int]:
        held = self._written.get(config.name)
        if held is None or held[0] is not config:
            held = self._written[config.name] = (config, {})
        return held[1]

    def _forget_written(self) -> None:
        """Expired writes, and those of configs no longer in force."""
        now_ns = time.monotonic_ns()
        self._written = {workload: (config, {key: expires for key, expires in written.items() if expires > now_ns})
                         for workload, (config, written) in self._written.items()
                         if self._workloads.get(workload) is config}

    def _restore_earlier_answers(self, config: WorkloadDns) -> None:
        """What the agent before this one allowed by name, as far as the policy in force still
        allows it. Called before this agent's programs are attached, so no packet of an
        established connection meets the maps without it."""
        entries = []
        for name, address, expires in self._answers.take_earlier(config.name):
            grants = config.matcher.grants(name)
            if grants:
                self._remember_name(address, name)
                self._answers.note(config.name, name, address, expires)
                entries += _allow_entries(address, grants, expires)
        if entries:
            self._kernel.allow_until(config.index, entries)

    def _hold_answers_to(self, config: WorkloadDns) -> None:
        """A reload judges again what names allowed, as it does cidr rules: the addresses of a
        name no rule allows any more, and ports no longer granted, leave the allow map (the
        agent's generation bump, next, has the backstop cut their established connections)."""
        entries, revoked = [], []
        for name, address, expires in self._answers.of(config.name):
            grants = config.matcher.grants(name)
            if grants:
                entries += _allow_entries(address, grants, expires)
            else:
                revoked.append(address)
        self._answers.forget_addresses(config.name, revoked)
        self._kernel.replace_dns_entries(config.index, entries)

    def _remember_name(self, address: str, name: str) -> None:
        self._name_of.pop(address, None)  # re-inserted last: the newest answer is kept longest
        self._name_of[address] = name
        if len(self._name_of) > MAX_REMEMBERED_NAMES:
            del self._name_of[next(iter(self._name_of))]

    def name_for(self, address: str) -> str | None:
        """The name `address` was last resolved from by any workload, if the proxy saw it."""
        return self._name_of.get(address)

    def _expire_pending(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if p.deadline <= now]:
            pending = self._take_pending(key)
            config = self._workloads.get(pending.workload)
            if config and pending.listener and pending.attempt + 1 < len(config.upstreams):
                self._forward(pending.listener, config, pending.question, pending.packet, pending.respond,
                              pending.question_end, pending.attempt + 1, pending.over_tcp)
            elif pending.respond:
                pending.respond(wire.error_reply(pending.packet, wire.RCODE_SERVFAIL, pending.question_end))
            else:
                self._refresh_at[(pending.workload, pending.question.name, pending.question.qtype)] = now + REFRESH_RETRY

    # --- TCP -------------------------------------------------------------------------

    def _on_tcp_accept(self, listener: _Listener, sock: socket.socket) -> None:
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if len(listener.clients) >= TCP_CLIENTS_PER_LISTENER:
            conn.close()
            return
        conn.setblocking(False)
        client = _TcpClient(conn, listener, peer[:2])
        listener.clients.add(client)
        self._selector.register(conn, selectors.EVENT_READ, lambda s, m, c=client: self._on_tcp_ready(c, m))

    def _on_tcp_ready(self, client: _TcpClient, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_client(client)
        if mask & selectors.EVENT_READ and not client.closed and not client.backlogged:
            self._receive(client)
        self._answer_received(client)

    def _receive(self, client: _TcpClient) -> None:
        try:
            data = client.sock.recv(_TCP_MAX_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_client(client)
            return
        # Nothing is read from a backlogged client, so one that never reads goes idle and is
        # closed however fast it sends.
        client.last_active = time.monotonic()
        client.inbuf += data

    def _answer_received(self, client: _TcpClient) -> None:
        """The complete queries received, until the client is backlogged: the rest wait."""
        while not client.closed and not client.backlogged and len(client.inbuf) >= 2:
            size = struct.unpack_from("!H", client.inbuf)[0]
            if len(client.inbuf) < 2 + size:
                return
            message = bytes(client.inbuf[2:2 + size])
            del client.inbuf[:2 + size]
            self._on_query(client.listener, message, client.peer, "tcp", lambda a, c=client: self._send_tcp(c, a))

    def _send_tcp(self, client: _TcpClient, answer: bytes | None) -> None:
        if client.closed or answer is None:
            return
        if client.backlogged:
            # Only upstream answers to queries read earlier arrive now, and with enough of them
            # waiting they would pile up without end.
            self._close_client(client)
            return
        client.outbuf += struct.pack("!H", len(answer)) + answer
        self._flush_client(client)

    def _flush_client(self, client: _TcpClient) -> None:
        try:
            sent = client.sock.send(client.outbuf)
            del client.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close_client(client)
            return
        wanted = (0 if client.backlogged else selectors.EVENT_READ) | (selectors.EVENT_WRITE if client.outbuf else 0)
        self._selector.modify(client.sock, wanted, self._selector.get_key(client.sock).data)

    def _close_client(self, client: _TcpClient) -> None:
        if client.closed:
            return
        client.closed = True
        client.listener.clients.discard(client)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def _close_idle_clients(self, now: float) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            for client in [c for c in listener.clients if now - c.last_active > TCP_IDLE]:
                self._close_client(client)

    # --- names resolved ahead of time ------------------------------------------------

    def _refresh_names(self, now: float) -> None:
        """Exact names are resolved ahead of time and kept fresh, so a router that resolves
        through a path the proxy does not see (nscd, a caching daemon) still finds them allowed."""
        with self._lock:
            by_workload = {}
            for listener in self._listeners.values():
                by_workload.setdefault(listener.workload, listener)
        for name, config in list(self._workloads.items()):
            listener = by_workload.get(name)
            if listener is None or not config.upstreams:
                continue  # asked from the router's own namespace, where its resolvers are
            for fqdn in config.matcher.exact_names:
                for qtype in (wire.TYPE_A, wire.TYPE_AAAA):
                    key = (name, fqdn, qtype)
                    if self._refresh_at.get(key, 0) > now:
                        continue
                    self._refresh_at[key] = now + UPSTREAM_TIMEOUT + 1
                    question = wire.Question(fqdn, qtype, wire.CLASS_IN)
                    packet = wire.build_query(0, fqdn, qtype)
                    self._forward(listener, config, question, packet, None, None)

    def _schedule_refresh(self, workload: str, question: wire.Question, records: list[wire.Record]) -> None:
        ttl = min((r.ttl for r in records), default=REFRESH_RETRY)
        self._refresh_at[(workload, question.name, question.qtype)] = time.monotonic() + max(1.0, min(ttl, MAX_TTL))

    # --- events ----------------------------------------------------------------------

    def _report_denied(self, config: WorkloadDns, listener: _Listener, query: wire.Query, peer: Address,
                       protocol: str) -> None:
        self._denied_counts[(config.name, config.mode)] += 1
        if self._denied_counts[(config.name, config.mode)] > DENIED_PER_WINDOW:
            return  # a flood (a tunnel): counted, summed up at the end of the window
        pid = _owner_of(config.pids(), protocol, peer[1])
        enforcing = config.mode == "enforce"
        self._events.put(Event(
            EventKind.DNS_DENIED, workload=config.name, process=describe_process(pid) if pid else None,
            destination=Destination(None, 53, protocol, query.question.name),
            verdict=_denied_verdict(config.mode),
            detail={"qtype": query.question.qtype, "mode": config.mode,
                    "reason": "the name matches no fqdn rule of the workload",
                    "answer": "REFUSED" if enforcing else "forwarded (monitor mode)",
                    "attribution": "socket table" if pid else "unknown: the asking socket was gone"}))

    def _flush_allowed(self, now: float) -> None:
        for (workload, name), count in self._allowed_counts.items():
            self._events.put(Event(
                EventKind.DNS_ALLOWED, workload=workload, destination=Destination(None, 53, "dns", name),
                verdict="allow", detail={"count": count, "window_seconds": ALLOWED_WINDOW,
                                         "addresses": self._allowed_addresses.get((workload, name), [])}))
        for (workload, mode), count in self._denied_counts.items():
            if count > DENIED_PER_WINDOW:
                self._events.put(Event(
                    EventKind.DNS_DENIED, workload=workload, verdict=_denied_verdict(mode),
                    detail={"suppressed": count - DENIED_PER_WINDOW, "window_seconds": ALLOWED_WINDOW, "mode": mode,
                            "reason": f"more than {DENIED_PER_WINDOW} names denied in the window: "
                                      "the rest are counted, not reported one by one"}))
        self._allowed_counts.clear()
        self._allowed_addresses.clear()
        self._denied_counts.clear()
        self._forget_written()
        self._next_flush = now + ALLOWED_WINDOW


def _denied_verdict(mode: str) -> str:
    """A name no rule allows is refused in enforce mode and forwarded in monitor mode."""
    return "deny" if mode == "enforce" else "allow"


def _allow_entries(address: str, grants: list[NameGrant], expires_ns: int) -> list[AllowEntry]:
    network = ipaddress.ip_network(address)
    return [AllowEntry(network, grant.protocol, port, expires_ns, grant.rule_line)
            for grant in grants for port in grant.ports or (PORT_ANY,)]


def _datagrams(sock: socket.socket, most: int = 64) -> Iterator[tuple[bytes, tuple]]:
    """The datagrams a non-blocking socket holds now, at most `most` so other sockets get
    their turn; an ICMP error queued on the socket is skipped."""
    for _ in range(most):
        try:
            yield sock.recvfrom(wire.MAX_UDP_PAYLOAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue


def _sendto(sock: socket.socket, answer: bytes | None, peer: tuple) -> None:
    if answer is None:
        return
    try:
        sock.sendto(answer, peer)
    except OSError:
        pass  # the asker is gone or its buffer is full: it will ask again


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("the resolver closed the connection")
        data += chunk
    return data


def _owner_of(pids: list[int], protocol: str, local_port: int) -> int | None:
    """The workload process whose socket asked from `local_port` (the proxy sees the peer)."""
    for pid in pids:
        try:
            held = process_sockets(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(s.protocol_name == protocol and s.local_port == local_port for s in held):
            return pid
    return None


def _in_use_by(pids: list[int]) -> Callable[[str, int, int], bool]:
    """keep(address, protocol, port): does a connected socket of these processes use it?
    The sockets are read once, and only when an expired entry asks."""
    endpoints: set[tuple[str, int]] | None = None

    def keep(ip: str, _protocol: int, port: int) -> bool:
        nonlocal endpoints
        if endpoints is None:
            endpoints = set()
            for pid in pids:
                try:
                    held = process_sockets(pid)
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                endpoints.update((s.remote_ip_unmapped, s.remote_port) for s in held if s.connected)
        return any(ip == used_ip and port in (PORT_ANY, used_port) for used_ip, used_port in endpoints)

    return keep
