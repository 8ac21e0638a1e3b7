"""The test network itself: topology, counting servers, isolation and cleanup."""

import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.lab.network import Lab, lab_namespaces

PAYLOAD_SIZE = 12345

TCP_SEND = """
import socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port), timeout=3) as sock:
    sock.sendall(b"x" * size)
"""

TCP_REQUEST = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as sock:
    sock.sendall(b"hello")
    sock.shutdown(socket.SHUT_WR)
    print(sock.makefile().read(), end="")
"""

UDP_SEND = """
import socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for start in range(0, size, 1024):
        sock.sendto(b"x" * min(1024, size - start), (host, port))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    yield lab
    lab.close()


def run_in_router(lab: Lab, script: str, *args: object) -> str:
    process = lab.run_in_router([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    stdout, _ = process.communicate(timeout=5)
    assert process.returncode == 0
    return stdout


def output_of(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("ip", [Lab.PROVIDER4, Lab.PROVIDER6], ids=["ipv4", "ipv6"])
def test_tcp_bytes_from_router_are_counted_exactly(lab: Lab, ip: str) -> None:
    server = lab.serve(ip, 443)

    run_in_router(lab, TCP_SEND, ip, 443, PAYLOAD_SIZE)

    assert server.wait_for_bytes(PAYLOAD_SIZE, timeout=3)
    assert server.received_bytes() == PAYLOAD_SIZE
    assert server.connections() == 1


def test_udp_bytes_and_datagrams_from_router_are_counted_exactly(lab: Lab) -> None:
    server = lab.serve(Lab.OTHER4, 53, proto="udp")

    run_in_router(lab, UDP_SEND, Lab.OTHER4, 53, PAYLOAD_SIZE)

    assert server.wait_for_bytes(PAYLOAD_SIZE, timeout=3)
    assert server.received_bytes() == PAYLOAD_SIZE
    assert server.connections() == 13  # 12 full 1024-byte datagrams and one of 57


def test_server_counts_every_connection(lab: Lab) -> None:
    server = lab.serve(Lab.PROVIDER4, 443)

    for _ in range(3):
        run_in_router(lab, TCP_SEND, Lab.PROVIDER4, 443, 100)

    assert server.wait_for_bytes(300, timeout=3)
    assert server.connections() == 3


def test_replying_server_answers_ok_and_silent_server_does_not(lab: Lab) -> None:
    lab.serve(Lab.PROVIDER6, 443, reply=True)
    lab.serve(Lab.PROVIDER6, 80)

    assert run_in_router(lab, TCP_REQUEST, Lab.PROVIDER6, 443) == "ok\n"
    assert run_in_router(lab, TCP_REQUEST, Lab.PROVIDER6, 80) == ""


def test_no_namespace_has_a_default_route(lab: Lab) -> None:
    for command in (lab.router_cmd, lab.net_cmd):
        for family in ("-4", "-6"):
            assert output_of(command(["ip", family, "route", "show", "default"])) == ""


def test_router_cannot_route_outside_the_lab(lab: Lab) -> None:
    # A route lookup only: no packet leaves, whatever the answer.
    for outside in ("192.0.2.1", "2001:db8::1"):
        lookup = subprocess.run(lab.router_cmd(["ip", "route", "get", outside]), capture_output=True, text=True)
        assert lookup.returncode != 0
        assert "unreachable" in lookup.stderr


def test_attacker_is_reachable_from_router_but_exists_only_inside_the_lab(lab: Lab) -> None:
    server = lab.serve(Lab.ATTACKER4, 4444)

    run_in_router(lab, TCP_SEND, Lab.ATTACKER4, 4444, 10)

    assert server.wait_for_bytes(10, timeout=3)
    host_addresses = output_of(["ip", "-o", "address", "show"])
    assert Lab.ATTACKER4 not in host_addresses
    assert Lab.ATTACKER6 not in host_addresses
    host_links = output_of(["ip", "-o", "link", "show"])
    assert lab.veth_router not in host_links and lab.veth_net not in host_links


def test_close_removes_namespaces_and_kills_every_process() -> None:
    lab = Lab()
    server = lab.serve(Lab.PROVIDER4, 443)
    sleeper = lab.run_in_router(["sleep", "60"])
    assert {lab.router_netns, lab.net_netns} <= lab_namespaces()

    lab.close()

    assert not {lab.router_netns, lab.net_netns} & lab_namespaces()
    assert server.process.poll() is not None
    assert sleeper.poll() is not None


def test_lab_whose_body_raises_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="test body failed"):
        with Lab() as lab:
            server = lab.serve(Lab.PROVIDER6, 443)
            raise RuntimeError("test body failed")

    assert not {lab.router_netns, lab.net_netns} & lab_namespaces()
    assert server.process.poll() is not None


def test_parallel_labs_are_isolated() -> None:
    with Lab() as first, Lab() as second:
        first_server = first.serve(Lab.PROVIDER4, 443)
        second_server = second.serve(Lab.PROVIDER4, 443)

        run_in_router(first, TCP_SEND, Lab.PROVIDER4, 443, 111)
        run_in_router(second, TCP_SEND, Lab.PROVIDER4, 443, 222)

        assert first_server.wait_for_bytes(111, timeout=3)
        assert second_server.wait_for_bytes(222, timeout=3)
        assert (first_server.received_bytes(), second_server.received_bytes()) == (111, 222)
