"""A throwaway two-namespace network for kernel tests, benchmarks and `warden demo`
(see DESIGN.md, "Testing rules").

ROUTER is where the code under test runs; NET plays the internet and holds
fake providers and a fake attacker. One veth pair joins them and neither has a
default route, so test traffic cannot leave the lab.

    with Lab() as lab:
        server = lab.serve(Lab.PROVIDER4, 443)
        lab.run_in_router([...client...]).wait()
        assert server.wait_for_bytes(100, timeout=2)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SINK_SERVER = Path(__file__).parent / "sink_server.py"
NETNS_DIR = Path("/run/netns")

# Run inside ROUTER. A refused connection proves a round trip: the SYN reached
# NET and its RST came back, without ping and without any server running.
_REACHABILITY_PROBE = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
def reachable(host):
    try:
        socket.create_connection((host, 9), timeout=0.05).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True
for host in sys.argv[2:]:
    while not reachable(host):
        if time.monotonic() > deadline:
            sys.exit(f"{host} is not reachable from ROUTER")
        time.sleep(0.01)
"""


@dataclass
class Server:
    """A sink_server.py process in NET; its counters are read from its state file."""

    ip: str
    port: int
    proto: str
    process: subprocess.Popen
    state_path: Path

    def received_bytes(self) -> int:
        return self._state()["bytes"]

    def connections(self) -> int:
        """Accepted connections (TCP) or received datagrams (UDP)."""
        return self._state()["connections"]

    def wait_for_bytes(self, count: int, timeout: float = 5.0) -> bool:
        """True once at least `count` bytes have arrived, False if `timeout` runs out first."""
        deadline = time.monotonic() + timeout
        while self.received_bytes() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        _kill_and_reap(self.process)

    def _state(self) -> dict[str, int]:
        return json.loads(self.state_path.read_text())


class Lab:
    """Two fresh network namespaces, ROUTER and NET, joined by a veth pair.

    Set up on construction; torn down by close(), on leaving a `with` block, or
    at interpreter exit, whichever comes first.
    """

    NAME_PREFIX = "ewt"

    ROUTER4 = "198.18.0.1"
    NET4 = "198.18.0.2"
    ROUTER6 = "fd00:e9::1"
    NET6 = "fd00:e9::2"
    PROVIDER4 = "198.18.1.10"
    ATTACKER4 = "198.18.2.66"
    OTHER4 = "198.18.3.20"
    PROVIDER6 = "fd00:e9:1::10"
    ATTACKER6 = "fd00:e9:2::66"
    LAB_NET4 = "198.18.0.0/15"
    # /32, not /48: fd00:e9::/48 is fd00:e9:0::/48 and would miss fd00:e9:1:: and fd00:e9:2::.
    LAB_NET6 = "fd00:e9::/32"

    ENDPOINTS4 = (PROVIDER4, ATTACKER4, OTHER4)
    ENDPOINTS6 = (PROVIDER6, ATTACKER6)

    READY_TIMEOUT = 5.0

    def __init__(self, name_prefix: str = NAME_PREFIX) -> None:
        self.name = f"{name_prefix}{secrets.token_hex(3)}"
        self.router_netns = f"{self.name}-router"
        self.net_netns = f"{self.name}-net"
        self.router_netns_path = str(NETNS_DIR / self.router_netns)
        self.net_netns_path = str(NETNS_DIR / self.net_netns)
        self.veth_router = f"{self.name}-r"
        self.veth_net = f"{self.name}-n"
        self._processes: list[subprocess.Popen] = []
        self._server_numbers = itertools.count()
        self._closed = False
        self._state_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def router_cmd(self, argv: Sequence[str]) -> list[str]:
        return _nsenter_cmd(self.router_netns_path, argv)

    def net_cmd(self, argv: Sequence[str]) -> list[str]:
        return _nsenter_cmd(self.net_netns_path, argv)

    def run_in_router(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside ROUTER; close() kills it if it is still running."""
        return self._start(self.router_cmd(argv), popen_kwargs)

    def run_in_net(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside NET; close() kills it if it is still running."""
        return self._start(self.net_cmd(argv), popen_kwargs)

    def serve(self, ip: str, port: int, proto: Literal["tcp", "udp"] = "tcp", reply: bool = False) -> Server:
        """Start a counting sink on ip:port in NET; returns once it is bound and listening.

        With reply=True a TCP sink answers each connection's first chunk with b"ok\\n".
        """
        number = next(self._server_numbers)
        state_path = self._state_dir / f"server{number}.json"
        log_path = self._state_dir / f"server{number}.log"
        argv = [sys.executable, str(SINK_SERVER), "--proto", proto, "--host", ip, "--port", str(port)]
        argv += ["--state", str(state_path)] + (["--reply"] if reply else [])
        with log_path.open("wb") as log:
            process = self.run_in_net(argv, stdout=log, stderr=subprocess.STDOUT)
        _wait_until_ready(process, state_path, log_path, self.READY_TIMEOUT)
        return Server(ip, port, proto, process, state_path)

    def close(self) -> None:
        """Kill every process of the lab and delete both namespaces. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._kill_processes()
        shutil.rmtree(self._state_dir, ignore_errors=True)
        self._delete_namespaces()

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.router_netns])
        _run(["ip", "netns", "add", self.net_netns])
        self._create_veth_pair()
        self._configure_router_interfaces()
        self._configure_net_interfaces()
        # Gateway routes only once both ends are up, so the gateways are on-link.
        _ip_batch(self.router_netns, [
            f"route add {self.LAB_NET4} via {self.NET4}",
            f"route add {self.LAB_NET6} via {self.NET6}",
        ])
        self._wait_until_reachable()

    def _create_veth_pair(self) -> None:
        # In two fresh namespaces both ends would get ifindex 2, and a veth whose
        # ifindex equals its peer's counts as a non-urgent link event: the kernel
        # then delays carrier-up (and IPv6 neighbour discovery) by up to a second.
        _run(["ip", "link", "add", self.veth_router, "index", "10", "netns", self.router_netns,
              "type", "veth", "peer", "name", self.veth_net, "index", "20", "netns", self.net_netns])

    def _configure_router_interfaces(self) -> None:
        _ip_batch(self.router_netns, [
            "link set lo up",
            f"addr add {self.ROUTER4}/24 dev {self.veth_router}",
            f"addr add {self.ROUTER6}/64 dev {self.veth_router} nodad",
            f"link set {self.veth_router} up",
        ])

    def _configure_net_interfaces(self) -> None:
        endpoints = [f"addr add {ip}/32 dev lo" for ip in self.ENDPOINTS4]
        endpoints += [f"addr add {ip}/128 dev lo" for ip in self.ENDPOINTS6]
        _ip_batch(self.net_netns, [
            "link set lo up",
            *endpoints,
            f"addr add {self.NET4}/24 dev {self.veth_net}",
            f"addr add {self.NET6}/64 dev {self.veth_net} nodad",
            f"link set {self.veth_net} up",
        ])

    def _wait_until_reachable(self) -> None:
        targets = [self.NET4, self.NET6, *self.ENDPOINTS4, *self.ENDPOINTS6]
        argv = [sys.executable, "-c", _REACHABILITY_PROBE, str(self.READY_TIMEOUT), *targets]
        _run(self.router_cmd(argv))

    def _start(self, argv: list[str], popen_kwargs: dict[str, Any]) -> subprocess.Popen:
        process = subprocess.Popen(argv, **popen_kwargs)
        self._processes.append(process)
        return process

    def _kill_processes(self) -> None:
        for process in self._processes:
            _kill(process)
        # Children of what we started die too: anything in a lab namespace is the lab's.
        for netns_path in (self.router_netns_path, self.net_netns_path):
            _kill_everything_in(netns_path)
        for process in self._processes:
            _reap(process)

    def _delete_namespaces(self) -> None:
        failures = []
        for netns in (self.router_netns, self.net_netns):
            if (NETNS_DIR / netns).exists():
                try:
                    _run(["ip", "netns", "delete", netns])
                except RuntimeError as error:
                    failures.append(str(error))
        if failures:
            raise RuntimeError("lab namespaces left behind: " + "; ".join(failures))


def lab_namespaces() -> set[str]:
    """Names of all existing Lab namespaces: leftovers, or labs running in parallel."""
    listing = _run(["ip", "netns", "list"])
    names = (line.split()[0] for line in listing.splitlines() if line.strip())
    return {name for name in names if name.startswith(Lab.NAME_PREFIX)}


def _nsenter_cmd(netns_path: str, argv: Sequence[str]) -> list[str]:
    # Not `ip netns exec`: it remounts /sys, hiding the cgroup v2 mount.
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def _run(argv: list[str], stdin_text: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin_text, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _ip_batch(netns: str, commands: list[str]) -> None:
    _run(["ip", "-n", netns, "-batch", "-"], stdin_text="\n".join(commands) + "\n")


def _wait_until_ready(process: subprocess.Popen, state_path: Path, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not state_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_and_reap(process)
            raise RuntimeError(f"sink server did not start: {log_path.read_text().strip()}")
        time.sleep(0.005)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def _reap(process: subprocess.Popen) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _kill_and_reap(process: subprocess.Popen) -> None:
    _kill(process)
    _reap(process)


def _kill_everything_in(netns_path: str, timeout: float = 5.0) -> None:
    try:
        netns = _namespace_id(netns_path)
    except FileNotFoundError:
        return
    deadline = time.monotonic() + timeout
    # Loop because a process may fork between our scan and its death.
    while (pids := _pids_in_namespace(netns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _namespace_id(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _pids_in_namespace(netns: tuple[int, int]) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if _namespace_id(f"/proc/{entry.name}/ns/net") == netns:
                pids.append(int(entry.name))
    return pids
