"""A stand-in LLM router for kernel tests: makes one kind of outbound attempt and prints
the outcome as one JSON line ({"ok": true} or {"ok": false, "errno": N, "error": "..."}).

    router.py tcp HOST PORT [--bytes N]         connect, send N bytes, close
    router.py tcp6-mapped HOST4 PORT [--bytes N] AF_INET6 socket to ::ffff:HOST4
    router.py udp-connect HOST PORT [--bytes N] connected UDP socket
    router.py udp-sendto HOST PORT [--bytes N]  unconnected sendto
    router.py raw                               open a raw IPv4 socket
    router.py fork-tcp HOST PORT                a forked child does `tcp`
    router.py exec-tcp HOST PORT                an exec'd child (a new python) does `tcp`
    router.py hold HOST PORT [--udp]            connect (a UDP socket with --udp), print {"connected": true},
                                                then for each line on stdin send that many bytes and print
                                                the outcome
    router.py probe HOST PORT --seconds S       try to connect every --interval seconds (default 5 ms)
                                                for S seconds (or --count N attempts); count successes.
                                                --spread N: to ports PORT..PORT+N-1 in turn (distinct
                                                destinations)
    router.py escape CGROUP_PROCS               write its own pid into another cgroup, then sleep
    router.py attempts                          for each line "tcp|udp HOST PORT" on stdin, one attempt
                                                (a connect and one byte), all in this one process; prints
                                                each outcome
    router.py resolve NAME [--count N]          getaddrinfo (glibc's resolver) N times; the last addresses
    router.py resolve-connect NAME PORT --count N   N times: getaddrinfo, connect to the answer, send 1 byte
    router.py dns SERVER PORT NAME [--tcp] [--qtype T] [--count N]   N raw queries (random
                                                labels in place of "{rand}" in NAME); rcodes and addresses

--wait: read one line from stdin before acting (lets a test act first).
--tag: ignored; a marker that policies can match on the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections import Counter


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def failure(e: OSError) -> dict:
    return {"ok": False, "errno": e.errno, "error": e.strerror}


def payload(n: int) -> bytes:
    return b"x" * n


def tcp(host: str, port: int, n: int, family: int = socket.AF_INET) -> dict:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect((host, port))
            s.sendall(payload(n))
        return {"ok": True}
    except OSError as e:
        return failure(e)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp(host: str, port: int, n: int, connect: bool) -> dict:
    try:
        with socket.socket(family_of(host), socket.SOCK_DGRAM) as s:
            if connect:
                s.connect((host, port))
                s.send(payload(n))
            else:
                s.sendto(payload(n), (host, port))
        return {"ok": True}
    except OSError as e:
        return failure(e)


def raw() -> dict:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        return {"ok": True}
    except OSError as e:
        return failure(e)


def fork_tcp(host: str, port: int, n: int) -> dict:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, json.dumps(tcp(host, port, n)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    outcome = json.loads(os.read(read_end, 4096))
    return {**outcome, "child": child}


def exec_tcp(host: str, port: int, n: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "tcp", host, str(port), "--bytes", str(n)],
                          capture_output=True, text=True, check=True)
    outcome = json.loads(done.stdout)
    child = outcome.pop("pid")
    return {**outcome, "child": child}


def hold(host: str, port: int, udp: bool) -> None:
    s = socket.socket(family_of(host), socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        s.connect((host, port))
    except OSError as e:
        report(connected=False, **failure(e))
        return
    report(connected=True, local_port=s.getsockname()[1], pid=os.getpid(), fd=s.fileno())
    for line in sys.stdin:
        try:
            s.sendall(payload(int(line)))
            report(ok=True)
        except OSError as e:
            report(**failure(e))


def probe(host: str, port: int, seconds: float, interval: float, spread: int = 1, count: int | None = None) -> dict:
    connected = refused = attempt = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (count is None or attempt < count):
        outcome = tcp(host, port + attempt % spread, 1, family_of(host))
        attempt += 1
        connected += outcome["ok"]
        refused += not outcome["ok"]
        time.sleep(interval)
    return {"ok": True, "connected": connected, "refused": refused}


def escape(procs_file: str) -> None:
    try:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        report(escaped=True, pid=os.getpid())
    except OSError as e:
        report(escaped=False, pid=os.getpid(), **failure(e))
    time.sleep(30)


def escape_fork(procs_file: str, host: str, port: int) -> None:
    """Leave the workload's cgroup and fork; the child tries `host` two seconds later. Both report."""
    with open(procs_file, "w") as f:
        f.write(str(os.getpid()))
    child = os.fork()
    if child == 0:
        time.sleep(2.0)
        report(child=os.getpid(), **tcp(host, port, 1, family_of(host)))
        os._exit(0)
    report(escaped=True, child=child)
    os.waitpid(child, 0)


def attempts() -> None:
    for line in sys.stdin:
        kind, host, port = line.split()
        report(**(tcp(host, int(port), 1, family_of(host)) if kind == "tcp" else udp(host, int(port), 1, connect=True)))


def resolve(name: str, count: int) -> dict:
    addresses: list[str] = []
    for _ in range(count):
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)})
        except socket.gaierror as e:
            return {"ok": False, "error": str(e)}
    return {"ok": True, "addresses": addresses}


def resolve_connect(name: str, port: int, count: int) -> dict:
    refused: Counter = Counter()
    for _ in range(count):
        try:
            address = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
            with socket.create_connection(address, timeout=3) as s:
                s.sendall(b"x")
        except OSError as e:
            refused[str(e)] += 1
    return {"ok": not refused, "refused": dict(refused)}


def dns_query(server: str, port: int, name: str, qtype: int, tcp: bool) -> tuple[int, list[str], list[int]]:
    """(rcode, addresses, ttls) of one query; rcode -1 for no answer, -errno for a refused socket."""
    from agent.dns import wire  # only here: other actions run under interpreters without the agent

    query = wire.build_query(secrets.randbits(16), name, qtype)
    try:
        with socket.socket(family_of(server), socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            if tcp:
                s.connect((server, port))
                s.sendall(struct.pack("!H", len(query)) + query)
                size = struct.unpack("!H", s.recv(2))[0]
                packet = b""
                while len(packet) < size:
                    packet += s.recv(size - len(packet))
            else:
                s.sendto(query, (server, port))
                packet, source = s.recvfrom(65535)
                assert source[0] == server, f"answer from {source}, asked {server}"
    except socket.timeout:
        return -1, [], []
    except OSError as e:
        return -e.errno, [], []
    response = wire.parse_response(packet)
    records = wire.addresses_for(response, name)
    return response.rcode, [r.value for r in records], [r.ttl for r in records]


def dns(server: str, port: int, name: str, qtype: int, tcp: bool, count: int) -> dict:
    rcodes: Counter = Counter()
    addresses: list[str] = []
    ttls: list[int] = []
    for _ in range(count):
        rcode, addresses, ttls = dns_query(server, port, name.replace("{rand}", secrets.token_hex(16)), qtype, tcp)
        rcodes[rcode] += 1
    return {"ok": True, "rcodes": {str(k): v for k, v in rcodes.items()}, "addresses": addresses, "ttls": ttls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action")
    parser.add_argument("host", nargs="?")
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--spread", type=int, default=1)
    parser.add_argument("--count", type=int, help="probe: stop after this many attempts; resolve, dns: "
                        "how many (default 1)")
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--tag")
    parser.add_argument("--qtype", type=int, default=1, help="1 = A, 28 = AAAA")
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("name", nargs="?")
    a = parser.parse_args()
    if a.wait:
        sys.stdin.readline()
    if a.action == "hold":
        hold(a.host, a.port, a.udp)
        return
    if a.action == "escape":
        escape(a.host)
        return
    if a.action == "escape-fork":
        escape_fork(a.name, a.host, a.port)
        return
    if a.action == "attempts":
        attempts()
        return
    outcome = {
        "tcp": lambda: tcp(a.host, a.port, a.bytes, family_of(a.host)),
        "tcp6-mapped": lambda: tcp(f"::ffff:{a.host}", a.port, a.bytes, socket.AF_INET6),
        "udp-connect": lambda: udp(a.host, a.port, a.bytes, connect=True),
        "udp-sendto": lambda: udp(a.host, a.port, a.bytes, connect=False),
        "raw": raw,
        "fork-tcp": lambda: fork_tcp(a.host, a.port, a.bytes),
        "exec-tcp": lambda: exec_tcp(a.host, a.port, a.bytes),
        "probe": lambda: probe(a.host, a.port, a.seconds, a.interval, a.spread, a.count),
        "resolve": lambda: resolve(a.host, a.count or 1),
        "resolve-connect": lambda: resolve_connect(a.host, a.port, a.count or 1),
        "dns": lambda: dns(a.host, a.port, a.name, a.qtype, a.tcp, a.count or 1),
    }[a.action]()
    report(pid=os.getpid(), **outcome)


if __name__ == "__main__":
    main()
