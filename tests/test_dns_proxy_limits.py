"""The DNS proxy (agent/dns/proxy.py) against a client or a workload that asks more than its
share, and what it writes into the allow map across a reload. Driven on 127.0.0.1, with
resolvers the tests run there.

Two stand-ins, each for something only the kernel provides: `RecordingKernel` takes the place
of KernelPrograms (the allow map and the kernel's redirect of port 53 to the proxy) and records
what the proxy asks of it; and the proxy opens its sockets in the test's own network namespace
by running in place where it would enter the workload's (setns needs CAP_SYS_ADMIN, and there is
no other namespace here). Unprivileged, the proxy asks for its socket buffers instead of forcing
them. Everything else is the proxy's own: its sockets, its thread, its selector."""
import os
import queue
import socket
import struct
import threading
import time
from typing import Callable, Iterator

import pytest

from agent.dns import proxy as proxy_module
from agent.dns import wire
from agent.dns.names import NameMatcher
from agent.dns.proxy import DnsProxy, WorkloadDns
from agent.dns.remembered import RememberedAnswers
from agent.events import Event, EventKind
from agent.policy import AllowRule

ALLOWED = "api.provider.test"
DENIED = "not-allowed.elsewhere.test"
ADDRESS = "198.51.100.7"  # what the test's resolvers answer
ONE_ANSWER = 2 + wire.MAX_UDP_PAYLOAD  # the most one answer adds to what is queued for a TCP client


class RecordingKernel:
    """What the proxy asks of KernelPrograms, recorded."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}  # workload index -> the proxy's port
        self.allowed: list[tuple[int, str, int]] = []  # (workload index, address, port) in the order written

    def set_dns_proxy(self, _netns_cookie: int, index: int, port: int | None) -> None:
        if port is not None:
            self.ports[index] = port

    def allow_until(self, index: int, entries, _slack_ns: int = 0) -> None:
        self.allowed += [(index, str(e.network.network_address), e.port) for e in entries]

    def replace_dns_entries(self, index: int, entries) -> None:
        self.allowed = [a for a in self.allowed if a[0] != index]
        self.allow_until(index, entries)


class Resolver:
    """An upstream resolver on 127.0.0.1 that answers every query with `records` A records of
    ADDRESS (mode "answer"), never answers ("silent"), or keeps the queries until release()
    ("hold"). `asked` holds the names asked, in order."""

    def __init__(self, mode: str = "answer", records: int = 1) -> None:
        self.mode = mode
        self.records = records
        self.asked: list[str] = []
        self.held: list[tuple[bytes, tuple]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # a flood is read, not dropped
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-resolver", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def release(self) -> None:
        self.mode = "answer"
        for packet, peer in self.held:
            self.sock.sendto(self._answer(packet), peer)
        self.held = []

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self.sock.recvfrom(wire.MAX_UDP_PAYLOAD)
            except socket.timeout:
                continue
            self.asked.append(wire.parse_query(packet).question.name)
            if self.mode == "answer":
                self.sock.sendto(self._answer(packet), peer)
            elif self.mode == "hold":
                self.held.append((packet, peer))

    def _answer(self, packet: bytes) -> bytes:
        query = wire.parse_query(packet)
        record = b"\xc0\x0c" + struct.pack("!HHIH", wire.TYPE_A, wire.CLASS_IN, 300, 4) + socket.inet_aton(ADDRESS)
        header = wire.HEADER.pack(query.id, 0x8180, 1, self.records, 0, 0)
        return header + packet[wire.HEADER.size:query.question_end] + record * self.records


@pytest.fixture
def start_proxy(tmp_path, monkeypatch) -> Iterator[Callable[[], tuple[DnsProxy, RecordingKernel, queue.SimpleQueue]]]:
    monkeypatch.setattr(proxy_module, "in_netns_of", lambda _pid, work: work())
    if os.geteuid() != 0:
        monkeypatch.setattr(proxy_module, "_SO_RCVBUFFORCE", socket.SO_RCVBUF)
    started: list[DnsProxy] = []

    def start() -> tuple[DnsProxy, RecordingKernel, queue.SimpleQueue]:
        kernel, events = RecordingKernel(), queue.SimpleQueue()
        dns = DnsProxy(kernel, events, RememberedAnswers(tmp_path))
        dns.start()
        started.append(dns)
        return dns, kernel, events

    yield start
    for dns in started:
        dns.stop()


@pytest.fixture
def start_resolver() -> Iterator[Callable[..., Resolver]]:
    started: list[Resolver] = []

    def start(**options) -> Resolver:
        started.append(Resolver(**options))
        return started[-1]

    yield start
    for resolver in started:
        resolver.close()


def workload(name: str, index: int, resolver: Resolver, *, mode: str = "enforce", ports: tuple[int, ...] = (443,),
             exact: tuple[str, ...] = ()) -> WorkloadDns:
    """Names under provider.test allowed on `ports`, and `exact` names (resolved ahead of time)."""
    rules = tuple(AllowRule("fqdn", fqdn, ports, "tcp", 10 + i) for i, fqdn in enumerate(("*.provider.test", *exact)))
    return WorkloadDns(name, index, mode, NameMatcher(rules), [resolver.address], 30, lambda: [])


def serve(dns: DnsProxy, kernel: RecordingKernel, config: WorkloadDns) -> int:
    """The port the workload's proxy listens on, as the agent sets it up."""
    dns.set_workload(config.name, config)
    dns.open_for(config.name, os.getpid())
    return kernel.ports[config.index]


def rcode(reply: bytes) -> int:
    return reply[3] & 0x0F


def ask_udp(port: int, name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(wire.build_query(1, name, wire.TYPE_A), ("127.0.0.1", port))
        return sock.recv(wire.MAX_UDP_PAYLOAD)


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def ask_tcp(port: int, name: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(framed(wire.build_query(1, name, wire.TYPE_A)))
        size = struct.unpack("!H", read_exactly(conn, 2))[0]
        return read_exactly(conn, size)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "the proxy closed the connection before answering"
        data += chunk
    return data


def tcp_clients(dns: DnsProxy) -> list:
    """The proxy's TCP connections, glanced at from the test's thread."""
    return [client for listener in list(dns._listeners.values()) for client in list(listener.clients)]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def flood_without_reading(dns: DnsProxy, port: int, name: str, seconds: float = 5.0) -> int:
    """Send queries for `name` on one TCP connection and never read, until the proxy closes it
    or `seconds` pass. The most the proxy ever held queued for it."""
    flooder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flooder.connect(("127.0.0.1", port))
    flooder.setblocking(False)
    queries = framed(wire.build_query(1, name, wire.TYPE_A)) * 1000
    most_queued = 0
    deadline = time.monotonic() + seconds
    with flooder:
        assert wait_until(lambda: tcp_clients(dns))
        while time.monotonic() < deadline:
            try:
                flooder.send(queries)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break  # reset by the proxy
            clients = tcp_clients(dns)
            if not clients:
                break
            most_queued = max(most_queued, *(len(client.outbuf) for client in clients))
    return most_queued


def test_a_tcp_client_that_never_reads_its_refusals_is_held_to_a_bound_and_closed(
        start_proxy, start_resolver, monkeypatch):
    monkeypatch.setattr(proxy_module, "TCP_IDLE", 1.0)
    dns, kernel, _ = start_proxy()
    port = serve(dns, kernel, workload("wl", 1, start_resolver()))
    others: list[bytes] = []
    meanwhile = threading.Timer(0.5, lambda: others.append(ask_tcp(port, ALLOWED)))
    meanwhile.start()

    most_queued = flood_without_reading(dns, port, DENIED)

    meanwhile.join()
    assert most_queued <= proxy_module.TCP_MAX_QUEUED + ONE_ANSWER
    assert not tcp_clients(dns), "a client that never reads kept its connection while it sent"
    assert [rcode(answer) for answer in others] == [0]


def test_upstream_answers_for_a_tcp_client_that_never_reads_do_not_pile_up(start_proxy, start_resolver):
    dns, kernel, _ = start_proxy()
    port = serve(dns, kernel, workload("wl", 1, start_resolver(records=50)))  # 0.8 KB an answer

    most_queued = flood_without_reading(dns, port, ALLOWED)

    assert most_queued <= proxy_module.TCP_MAX_QUEUED + ONE_ANSWER
    assert not tcp_clients(dns)
    assert rcode(ask_tcp(port, ALLOWED)) == 0


def flood_until_refused(port: int, name: str) -> bool:
    """Ask `name` over and over without waiting; True once the proxy answers SERVFAIL (no
    room for more queries to wait), False if it never did."""
    query = wire.build_query(1, name, wire.TYPE_A)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
        flooder.setblocking(False)
        for _ in range(3 * proxy_module.MAX_PENDING // 100):
            for _ in range(100):
                flooder.sendto(query, ("127.0.0.1", port))
            time.sleep(0.002)  # the proxy reads them, rather than the socket dropping them
            try:
                while True:
                    if rcode(flooder.recv(wire.MAX_UDP_PAYLOAD)) == wire.RCODE_SERVFAIL:
                        return True
            except BlockingIOError:
                pass
    return False


def test_a_workload_flooding_a_silent_resolver_leaves_room_for_another(start_proxy, start_resolver, monkeypatch):
    monkeypatch.setattr(proxy_module, "UPSTREAM_TIMEOUT", 60.0)  # every SERVFAIL is for want of room
    dns, kernel, _ = start_proxy()
    flooding = serve(dns, kernel, workload("a", 1, start_resolver(mode="silent")))
    other = serve(dns, kernel, workload("b", 2, start_resolver()))

    assert flood_until_refused(flooding, ALLOWED)

    assert rcode(ask_udp(other, ALLOWED)) == 0


def test_a_workload_flooding_a_silent_resolver_still_has_its_names_refreshed(start_proxy, start_resolver,
                                                                             monkeypatch):
    monkeypatch.setattr(proxy_module, "UPSTREAM_TIMEOUT", 60.0)
    dns, kernel, _ = start_proxy()
    silent = start_resolver(mode="silent")
    port = serve(dns, kernel, workload("a", 1, silent))
    assert flood_until_refused(port, ALLOWED)

    dns.set_workload("a", workload("a", 1, silent, exact=("fresh.provider.test",)))  # a reload: a new exact name

    assert wait_until(lambda: "fresh.provider.test" in silent.asked), "the new name was never resolved ahead of time"


def test_a_query_larger_than_any_real_one_is_refused_and_not_kept(start_proxy, start_resolver):
    dns, kernel, _ = start_proxy()
    resolver = start_resolver()
    port = serve(dns, kernel, workload("wl", 1, resolver))
    padded = wire.build_query(1, ALLOWED, wire.TYPE_A) + bytes(60000)  # parse_query reads past the tail

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as router:
        router.settimeout(5)
        router.sendto(padded, ("127.0.0.1", port))
        assert rcode(router.recv(wire.MAX_UDP_PAYLOAD)) == wire.RCODE_FORMERR

    assert rcode(ask_udp(port, ALLOWED)) == 0
    assert resolver.asked == [ALLOWED]  # only the real query went out


def next_event(events: queue.SimpleQueue, wanted: Callable[[Event], bool], timeout: float = 5.0) -> Event:
    deadline = time.monotonic() + timeout
    while True:
        event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if wanted(event):
            return event


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_the_summary_of_a_flood_of_denied_names_carries_the_verdict_of_its_events(start_proxy, start_resolver,
                                                                                  monkeypatch, mode):
    monkeypatch.setattr(proxy_module, "ALLOWED_WINDOW", 0.5)
    dns, kernel, events = start_proxy()
    port = serve(dns, kernel, workload("wl", 1, start_resolver(), mode=mode))
    asked = 3 * proxy_module.DENIED_PER_WINDOW

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as router:
        router.settimeout(5)
        for i in range(asked):  # within at most two windows: one holds more than DENIED_PER_WINDOW
            router.sendto(wire.build_query(i, f"n{i}.elsewhere.test", wire.TYPE_A), ("127.0.0.1", port))
        answers = [router.recv(wire.MAX_UDP_PAYLOAD) for _ in range(asked)]

    assert {rcode(answer) for answer in answers} == {wire.RCODE_REFUSED if mode == "enforce" else 0}
    one = next_event(events, lambda e: e.kind == EventKind.DNS_DENIED)
    summary = next_event(events, lambda e: e.kind == EventKind.DNS_DENIED and "suppressed" in e.detail)
    assert summary.verdict == one.verdict == ("deny" if mode == "enforce" else "allow")
    assert summary.detail["mode"] == mode


@pytest.mark.parametrize("new_ports", [(443, 8443), (8443,)], ids=["port-added", "port-replaced"])
def test_after_a_reload_the_allow_map_gets_the_new_ports_also_for_an_answer_in_flight(start_proxy, start_resolver,
                                                                                      new_ports):
    dns, kernel, _ = start_proxy()
    resolver = start_resolver(mode="hold")
    port = serve(dns, kernel, workload("wl", 1, resolver, ports=(443,)))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as router:
        router.settimeout(5)
        router.sendto(wire.build_query(1, ALLOWED, wire.TYPE_A), ("127.0.0.1", port))
        assert wait_until(lambda: resolver.held)
        written_before = len(kernel.allowed)
        dns.set_workload("wl", workload("wl", 1, resolver, ports=new_ports))
        resolver.release()
        assert rcode(router.recv(wire.MAX_UDP_PAYLOAD)) == 0
    in_flight = set(kernel.allowed[written_before:])
    assert rcode(ask_udp(port, ALLOWED)) == 0

    assert in_flight == {(1, ADDRESS, p) for p in new_ports}
    assert {entry[2] for entry in kernel.allowed[written_before:]} == set(new_ports)
