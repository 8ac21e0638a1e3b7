"""Kernel enforcement end to end: a real agent, real cgroups and BPF, a router in its own
network namespace, and fake providers and an attacker in another (agent/lab/network.py)."""
import json
import os
import subprocess
import sys

import pytest

from agentproc import ROUTER, outcome, policy_of, workload_entry, workload_policy
from agent.lab.network import Lab

pytestmark = pytest.mark.root

EPERM = 1


def policy(name: str, **options: str) -> str:
    rules = (f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}, "
             f"{{cidr: {Lab.PROVIDER4}/32, ports: [53], protocol: udp}}, "
             f"{{cidr: {Lab.PROVIDER6}/128, ports: [443]}}")
    return workload_policy(name, rules, **options)


def attempt(lab, agent, workload, *args):
    return outcome(lab.run_in_router(agent.router_cmd(workload, *args), stdout=-1, stderr=-1, text=True))


def denial(agent, workload, ip, port):
    return agent.wait_for(lambda e: e["kind"] == "egress_denied" and e["workload"] == workload
                          and e["destination"] and e["destination"]["ip"] == ip and e["destination"]["port"] == port)


def test_allowed_tcp_and_udp_reach_the_provider(lab, start_agent, names):
    wl = names[0]
    tcp_server = lab.serve(Lab.PROVIDER4, 443)
    udp_server = lab.serve(Lab.PROVIDER4, 53, proto="udp")
    agent = start_agent(policy(wl), [wl])
    assert attempt(lab, agent, wl, "tcp", Lab.PROVIDER4, "443", "--bytes", "1000")["ok"]
    assert attempt(lab, agent, wl, "udp-connect", Lab.PROVIDER4, "53", "--bytes", "200")["ok"]
    assert attempt(lab, agent, wl, "udp-sendto", Lab.PROVIDER4, "53", "--bytes", "300")["ok"]
    assert tcp_server.wait_for_bytes(1000)
    assert udp_server.wait_for_bytes(500)
    assert not [e for e in agent.events() if e["kind"] == "egress_denied"]


@pytest.mark.parametrize("action,host,port", [
    ("tcp", Lab.ATTACKER4, 443),                # address not allowed
    ("tcp", Lab.PROVIDER4, 8443),               # allowed address, port not allowed
    ("udp-connect", Lab.ATTACKER4, 53),
    ("udp-sendto", Lab.ATTACKER4, 53),
    ("tcp", Lab.ATTACKER6, 443),                # IPv6
    ("tcp6-mapped", Lab.ATTACKER4, 443),        # IPv4-mapped IPv6 on an AF_INET6 socket
    ("fork-tcp", Lab.ATTACKER4, 443),
    ("exec-tcp", Lab.ATTACKER4, 443),
])
def test_denied_destinations_see_no_byte(lab, start_agent, names, action, host, port):
    wl = names[0]
    proto = "udp" if action.startswith("udp") else "tcp"
    attacker = lab.serve(host, port, proto=proto)
    agent = start_agent(policy(wl), [wl])
    result = attempt(lab, agent, wl, action, host, str(port))
    assert not result["ok"] and result["errno"] == EPERM, result
    event = denial(agent, wl, host, port)
    assert event["verdict"] == "deny"
    assert event["detail"]["cgroup_id"] == os.stat(agent.cgroup(wl)).st_ino
    assert event["process"]["pid"] in (result["pid"], result.get("child"))
    assert attacker.received_bytes() == 0 and attacker.connections() == 0


# Connects where the policy refuses; its arguments are secrets a router might be given.
REFUSED_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 443), timeout=3)
except OSError:
    pass
"""


def test_secrets_on_a_command_line_never_reach_the_events(lab, start_agent, names):
    """Events travel to collectors far beyond the host: a key given on the router's command
    line must not travel with them (agent/events/redact.py)."""
    wl = names[0]
    agent = start_agent(policy(wl, on_violation="quarantine"), [wl])
    secrets = ["hunter2-api-key", "pg-password", "sk-ant-api03-abcdefghijklmnopqrst"]
    argv = [sys.executable, "-c", REFUSED_CONNECT, Lab.ATTACKER4, "--api-key", secrets[0],
            "--db", f"postgres://llm:{secrets[1]}@db/litellm", secrets[2]]
    router = lab.run_in_router(agent.run_cmd(wl, argv))
    event = denial(agent, wl, Lab.ATTACKER4, 443)
    assert event["process"]["cmdline"][-5:] == ["--api-key", "<redacted>", "--db", "postgres://llm:<redacted>@db/litellm",
                                                "<redacted>"]
    quarantine = agent.wait_for(lambda e: e["kind"] == "action_quarantine")
    assert quarantine["detail"]["evidence"][0]["cmdline"] == event["process"]["cmdline"]
    router.kill()
    written = agent.events_file.read_text()
    assert not [s for s in secrets if s in written]


class Attempts:
    """One router process, pinned to one CPU, making attempts when told: the hooks keep the
    destinations they last allowed per CPU, so these attempts meet what the earlier ones left."""

    def __init__(self, lab, agent, workload):
        self.process = lab.run_in_router(["taskset", "-c", "0", *agent.router_cmd(workload, "attempts")],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, proto: str, host: str, port: int) -> dict:
        self.process.stdin.write(f"{proto} {host} {port}\n")
        line = self.process.stdout.readline()
        assert line, f"the router exited with {self.process.wait()}"
        return json.loads(line)


def test_a_destination_just_allowed_opens_no_other(lab, start_agent, names):
    wl = names[0]
    servers = {key: lab.serve(host, port, proto=proto) for key, (proto, host, port) in {
        "provider": ("tcp", Lab.PROVIDER4, 443), "other port": ("tcp", Lab.PROVIDER4, 444),
        "attacker": ("tcp", Lab.ATTACKER4, 443), "udp": ("udp", Lab.PROVIDER4, 443)}.items()}
    agent = start_agent(policy(wl), [wl])
    attempt_now = Attempts(lab, agent, wl)
    assert attempt_now("tcp", Lab.PROVIDER4, 443)["ok"] and attempt_now("tcp", Lab.PROVIDER4, 443)["ok"]
    for proto, host, port in (("tcp", Lab.PROVIDER4, 444), ("tcp", Lab.ATTACKER4, 443), ("udp", Lab.PROVIDER4, 443)):
        result = attempt_now(proto, host, port)
        assert not result["ok"] and result["errno"] == EPERM, (proto, host, port, result)
    assert attempt_now("tcp", Lab.PROVIDER4, 443)["ok"]
    assert [servers[key].received_bytes() for key in ("other port", "attacker", "udp")] == [0, 0, 0]
    assert servers["provider"].wait_for_bytes(3)


def test_a_destination_just_allowed_is_refused_once_a_reload_removes_it(lab, start_agent, names):
    wl = names[0]
    lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(policy(wl), [wl])
    attempt_now = Attempts(lab, agent, wl)
    assert attempt_now("tcp", Lab.PROVIDER4, 443)["ok"] and attempt_now("tcp", Lab.PROVIDER4, 443)["ok"]
    agent.reload(workload_policy(wl, f"{{cidr: {Lab.OTHER4}/32, ports: [443]}}"))
    agent.wait_for(lambda e: e["kind"] == "policy_loaded" and e["seq"] > 2)
    result = attempt_now("tcp", Lab.PROVIDER4, 443)
    assert not result["ok"] and result["errno"] == EPERM, result


def test_mapped_ipv6_to_an_allowed_ipv4_is_allowed(lab, start_agent, names):
    wl = names[0]
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(policy(wl), [wl])
    assert attempt(lab, agent, wl, "tcp6-mapped", Lab.PROVIDER4, "443", "--bytes", "10")["ok"]
    assert provider.wait_for_bytes(10)


def test_raw_socket_is_refused_by_the_kernel_hook(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    # Keep CAP_NET_RAW, so that it is the sock_create program that refuses, not the capability check.
    run = agent.run_cmd(wl, [sys.executable, ROUTER, "raw"], "--keep-capabilities")
    result = outcome(lab.run_in_router(run, stdout=-1, stderr=-1, text=True))
    assert not result["ok"] and result["errno"] == EPERM
    event = agent.wait_for(lambda e: e["kind"] == "egress_denied" and e["detail"]["hook"] == "sock_create")
    assert event["process"]["pid"] == result["pid"]


def test_warden_run_drops_the_capabilities_that_bypass_the_agent(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    show = agent.run_cmd(wl, ["sh", "-c", "grep -E '^Cap(Bnd|Inh|Prm)' /proc/self/status"])
    out = lab.run_in_router(show, stdout=-1, text=True).communicate(timeout=10)[0]
    caps = {line.split(":")[0]: int(line.split()[1], 16) for line in out.splitlines()}
    for cap in (12, 13, 16, 19, 21, 39):  # NET_ADMIN NET_RAW SYS_MODULE SYS_PTRACE SYS_ADMIN BPF
        assert not caps["CapBnd"] & (1 << cap) and not caps["CapPrm"] & (1 << cap), (cap, caps)
    assert caps["CapPrm"] & (1 << 0)  # CAP_CHOWN: root keeps what does not bypass the agent


def test_monitor_mode_lets_traffic_through_and_reports_it(lab, start_agent, names):
    wl = names[0]
    attacker = lab.serve(Lab.ATTACKER4, 443)
    agent = start_agent(policy(wl, mode="monitor", on_violation="kill"), [wl])
    result = attempt(lab, agent, wl, "tcp", Lab.ATTACKER4, "443", "--bytes", "500")
    assert result["ok"]
    assert attacker.wait_for_bytes(500)
    event = agent.wait_for(lambda e: e["kind"] == "egress_observed" and e["destination"]["ip"] == Lab.ATTACKER4)
    assert event["process"]["pid"] == result["pid"] and event["verdict"] == "allow"
    assert not [e for e in agent.events() if e["kind"] == "action_kill"]


def test_two_workloads_do_not_share_allowances(lab, start_agent, names):
    a, b = names
    provider = lab.serve(Lab.PROVIDER4, 443)
    other = lab.serve(Lab.OTHER4, 443)
    agent = start_agent(policy_of(workload_entry(a, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443]}}"),
                                  workload_entry(b, f"{{cidr: {Lab.OTHER4}/32, ports: [443]}}")), [a, b])
    assert attempt(lab, agent, a, "tcp", Lab.PROVIDER4, "443")["ok"]
    assert attempt(lab, agent, b, "tcp", Lab.OTHER4, "443")["ok"]
    assert attempt(lab, agent, a, "tcp", Lab.OTHER4, "443")["errno"] == EPERM
    assert attempt(lab, agent, b, "tcp", Lab.PROVIDER4, "443")["errno"] == EPERM
    assert provider.connections() == 1 and other.connections() == 1
    denial(agent, a, Lab.OTHER4, 443)
    denial(agent, b, Lab.PROVIDER4, 443)
