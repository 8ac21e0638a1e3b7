"""DNS-aware allowlists end to end: a real agent and kernel, a router in the Lab's ROUTER
namespace, and real dnsmasq servers in NET serving the test's zones (agent/lab/dns_server.py)."""
import json
import re
import socket
import struct
import subprocess
import time

import pytest

from hypothesis import given, settings, strategies as st

from agent.dns import wire
from agent.kernel.netns import in_netns_of
from apiclient import pb, unix_stub
from agentproc import outcome, unique_name, workload_policy, write_policy
from agent.lab.dns_server import DnsServer
from agent.lab.network import Lab
from test_lifecycle import read_json, send, start_router

pytestmark = pytest.mark.root

RESOLVER = "198.18.5.53"  # the resolver the policy names as upstream
OTHER_RESOLVER = "198.18.5.54"  # a resolver the router may ask instead: still redirected
ATTACKER_DNS = "198.18.6.53"  # authoritative for the attacker's zone
EPERM = 1
REFUSED = 5


ALL_RULES = ("{fqdn: api.provider.test, ports: [443], protocol: tcp}, {fqdn: '*.azure.test', ports: [443]}, "
             "{fqdn: alias.provider.test, ports: [443]}")


def dns_policy(name: str, *, grace: int = 30, mode: str = "enforce", on_violation: str = "deny",
               rules: str = ALL_RULES, upstream: str = RESOLVER) -> str:
    dns = f"""        dns:
          upstream: [{upstream}]
          grace_seconds: {grace}"""
    return workload_policy(name, rules, on_violation=on_violation, mode=mode, extra=dns)


ZONE = {"api.provider.test": Lab.PROVIDER4, "eastus.azure.test": Lab.PROVIDER4,
        "deep.eastus.azure.test": Lab.OTHER4, "cdn.elsewhere.test": Lab.OTHER4,
        "moving.provider.test": Lab.ATTACKER4, "unlisted.provider.test": Lab.ATTACKER4}


@pytest.fixture
def dns_server(lab, tmp_path):
    return DnsServer(lab, RESOLVER, tmp_path, hosts=ZONE, cnames={"alias.provider.test": "cdn.elsewhere.test"}, ttl=2)


def run(lab, agent, wl, *args):
    return outcome(lab.run_in_router(with_resolv_conf(agent.router_cmd(wl, *args)), stdout=-1, stderr=-1, text=True),
                   timeout=60)


def with_resolv_conf(argv, nameserver=RESOLVER):
    """argv in its own mount namespace whose /etc/resolv.conf names the test's resolver: the
    host's names an outside resolver that no test may ever ask."""
    script = (f"f=$(mktemp) && echo 'nameserver {nameserver}' > $f && mount --bind $f /etc/resolv.conf "
              '&& exec "$@"')
    return ["unshare", "-m", "sh", "-c", script, "sh", *argv]


def query(lab, agent, wl, name, *extra, server=RESOLVER):
    return run(lab, agent, wl, "dns", server, "53", name, *extra)


def test_allowed_name_resolves_and_its_address_is_reachable(lab, start_agent, dns_server):
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(dns_policy(wl), [wl])
    result = run(lab, agent, wl, "resolve-connect", "api.provider.test", "443", "--count", "3")
    assert result["ok"], result
    assert provider.wait_for_bytes(3)  # one byte per connection


def test_glibc_resolver_unmodified_gets_the_answer(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    assert run(lab, agent, wl, "resolve", "api.provider.test") == {
        "ok": True, "addresses": [Lab.PROVIDER4], "pid": pytest.approx(0, abs=1 << 30)}
    assert "api.provider.test" in dns_server.queried_names()


def test_wildcard_matches_exactly_one_label(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    allowed = query(lab, agent, wl, "eastus.azure.test")
    assert allowed["rcodes"] == {"0": 1} and allowed["addresses"] == [Lab.PROVIDER4]
    assert query(lab, agent, wl, "deep.eastus.azure.test")["rcodes"] == {str(REFUSED): 1}
    assert query(lab, agent, wl, "azure.test")["rcodes"] == {str(REFUSED): 1}
    assert "deep.eastus.azure.test" not in dns_server.queried_names()


def test_cname_to_a_name_outside_the_allowlist_is_judged_by_the_asked_name(lab, start_agent, dns_server):
    wl = unique_name("dns")
    target = lab.serve(Lab.OTHER4, 443)
    agent = start_agent(dns_policy(wl), [wl])
    result = query(lab, agent, wl, "alias.provider.test")
    assert result["rcodes"] == {"0": 1} and result["addresses"] == [Lab.OTHER4]
    assert run(lab, agent, wl, "tcp", Lab.OTHER4, "443")["ok"]
    assert target.wait_for_bytes(100)  # the counter lags the connection
    # The target's own name is not allowed when asked directly.
    assert query(lab, agent, wl, "cdn.elsewhere.test")["rcodes"] == {str(REFUSED): 1}


def test_denied_name_is_refused_reported_and_never_forwarded(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    assert query(lab, agent, wl, "unlisted.provider.test")["rcodes"] == {str(REFUSED): 1}
    event = agent.wait_for(lambda e: e["kind"] == "dns_denied")
    assert event["destination"]["fqdn"] == "unlisted.provider.test" and event["verdict"] == "deny"
    assert event["process"]["comm"].startswith("python")
    assert "unlisted.provider.test" not in dns_server.queried_names()
    # Its address was never allowed.
    assert run(lab, agent, wl, "tcp", Lab.ATTACKER4, "443")["errno"] == EPERM


def test_dns_tunnel_is_refused_and_the_attackers_server_hears_nothing(lab, start_agent, dns_server, tmp_path):
    wl = unique_name("dns")
    attacker = DnsServer(lab, ATTACKER_DNS, tmp_path, hosts={"ns.evil.test": Lab.ATTACKER4})
    agent = start_agent(dns_policy(wl), [wl])
    for server in (RESOLVER, ATTACKER_DNS):
        result = query(lab, agent, wl, "{rand}.exfil.evil.test", "--count", "200", server=server)
        assert result["rcodes"] == {str(REFUSED): 200}, result
    assert attacker.queried_names() == []
    assert not [n for n in dns_server.queried_names() if n.endswith("evil.test")]
    denied = agent.wait_for(lambda e: e["kind"] == "dns_denied" and e["destination"]["fqdn"].endswith("evil.test"))
    assert denied["workload"] == wl


def test_query_over_tcp_and_to_any_resolver_is_redirected(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    over_tcp = query(lab, agent, wl, "api.provider.test", "--tcp")
    assert over_tcp["rcodes"] == {"0": 1} and over_tcp["addresses"] == [Lab.PROVIDER4]
    # OTHER_RESOLVER does not exist: only the redirect can answer, and the answer seems to come from it.
    other = query(lab, agent, wl, "api.provider.test", server=OTHER_RESOLVER)
    assert other["rcodes"] == {"0": 1} and other["addresses"] == [Lab.PROVIDER4]
    assert query(lab, agent, wl, "unlisted.provider.test", "--tcp")["rcodes"] == {str(REFUSED): 1}


def test_an_answer_too_large_for_udp_reaches_a_tcp_asker_whole(lab, start_agent, tmp_path):
    big_server = "198.18.5.56"
    many = [f"198.18.7.{n}" for n in range(1, 61)]  # 60 A records: over 512 bytes
    DnsServer(lab, big_server, tmp_path, hosts={"api.provider.test": many})
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl, upstream=big_server), [wl])
    assert len(query(lab, agent, wl, "api.provider.test")["addresses"]) < 60  # over UDP: truncated
    over_tcp = query(lab, agent, wl, "api.provider.test", "--tcp")
    assert over_tcp["rcodes"] == {"0": 1} and sorted(over_tcp["addresses"]) == sorted(many)


@pytest.mark.parametrize("server", ["fd00:e9:5::53", f"::ffff:{OTHER_RESOLVER}"])
def test_ipv6_and_mapped_resolvers_are_redirected(lab, start_agent, dns_server, server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    result = query(lab, agent, wl, "api.provider.test", server=server)
    assert result["rcodes"] == {"0": 1} and result["addresses"] == [Lab.PROVIDER4]


def test_resolved_addresses_survive_a_reload_that_drops_the_same_static_rule(lab, start_agent, dns_server):
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    wildcard = "{fqdn: '*.azure.test', ports: [443], protocol: tcp}"
    static = f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}"
    agent = start_agent(dns_policy(wl, rules=f"{wildcard}, {static}"), [wl])
    assert query(lab, agent, wl, "eastus.azure.test")["addresses"] == [Lab.PROVIDER4]
    agent.reload(dns_policy(wl, rules=wildcard))
    agent.wait_for(lambda e: e["kind"] == "policy_loaded" and e["seq"] > 2)
    assert run(lab, agent, wl, "tcp", Lab.PROVIDER4, "443")["ok"]  # the answer's allowance stays
    assert provider.wait_for_bytes(100)


def test_a_reload_that_drops_a_name_revokes_its_addresses_as_it_does_a_cidr(lab, start_agent, dns_server):
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    named = "{fqdn: api.provider.test, ports: [443], protocol: tcp}"
    kept = "{fqdn: '*.azure.test', ports: [443], protocol: tcp}"
    agent = start_agent(dns_policy(wl, rules=f"{named}, {kept}"), [wl])
    assert query(lab, agent, wl, "api.provider.test")["addresses"] == [Lab.PROVIDER4]
    router = start_router(lab, agent.router_cmd(wl, "hold", Lab.PROVIDER4, "443"))
    assert read_json(router)["connected"]
    send(router, 100)
    assert provider.wait_for_bytes(100)
    agent.reload(dns_policy(wl, rules=kept))
    agent.wait_for(lambda e: e["kind"] == "policy_loaded" and e["seq"] > 2)
    assert run(lab, agent, wl, "tcp", Lab.PROVIDER4, "443")["errno"] == EPERM  # new connections refused
    send(router, 100)  # and the established one carries nothing more
    time.sleep(0.5)
    assert provider.received_bytes() == 100
    router.kill()


def test_monitor_mode_forwards_and_reports_denied_names(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl, mode="monitor", on_violation="kill"), [wl])
    result = query(lab, agent, wl, "unlisted.provider.test")
    assert result["rcodes"] == {"0": 1} and result["addresses"] == [Lab.ATTACKER4]
    event = agent.wait_for(lambda e: e["kind"] == "dns_denied")
    assert event["verdict"] == "allow" and event["detail"]["mode"] == "monitor"
    assert not [e for e in agent.events() if e["kind"] == "action_kill"]


def test_a_denied_name_is_a_violation(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl, on_violation="kill"), [wl])
    # Enough tunnel queries that the router is still asking when the agent acts.
    tunnel = agent.router_cmd(wl, "dns", RESOLVER, "53", "{rand}.evil.test", "--count", "100000")
    router = lab.run_in_router(with_resolv_conf(tunnel), stdout=subprocess.PIPE, text=True)
    kill = agent.wait_for(lambda e: e["kind"] == "action_kill")
    assert kill["detail"]["cause_kind"] == "dns_denied"
    assert router.wait(timeout=10) != 0  # killed before it finished


def test_connections_right_after_each_answer_are_never_refused(lab, start_agent, dns_server):
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(dns_policy(wl), [wl])
    result = run(lab, agent, wl, "resolve-connect", "api.provider.test", "443", "--count", "200")
    assert result == {"ok": True, "refused": {}, "pid": result["pid"]}
    assert provider.wait_for_bytes(200)  # one byte per connection, counted by the provider
    allowed = agent.wait_for(lambda e: e["kind"] == "dns_allowed" and e["destination"]["fqdn"] == "api.provider.test")
    assert allowed["detail"]["count"] > 1  # aggregated, not one event per query


def test_a_changed_address_works_and_the_old_one_expires_without_cutting_connections(lab, start_agent, dns_server):
    wl = unique_name("dns")
    old = lab.serve(Lab.ATTACKER4, 443)
    new = lab.serve(Lab.OTHER4, 443)
    agent = start_agent(dns_policy(wl, grace=1, rules="{fqdn: moving.provider.test, ports: [443]}"), [wl])
    first = query(lab, agent, wl, "moving.provider.test")
    assert first["addresses"] == [Lab.ATTACKER4] and first["ttls"] == [2]
    held = lab.run_in_router(agent.router_cmd(wl, "hold", Lab.ATTACKER4, "443"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)
    assert json.loads(held.stdout.readline())["connected"]

    dns_server.change_hosts({**ZONE, "moving.provider.test": Lab.OTHER4})
    second = query(lab, agent, wl, "moving.provider.test")
    assert second["addresses"] == [Lab.OTHER4]
    assert run(lab, agent, wl, "tcp", Lab.OTHER4, "443")["ok"]
    assert new.wait_for_bytes(100)

    time.sleep(2 + 1 + 1.5)  # TTL + grace, and a sweep
    assert run(lab, agent, wl, "tcp", Lab.ATTACKER4, "443")["errno"] == EPERM  # expired: new ones refused
    held.stdin.write("100\n")
    held.stdin.flush()
    assert json.loads(held.stdout.readline())["ok"]
    assert old.wait_for_bytes(100)  # the established connection goes on


def proxy_port(agent, wl) -> int:
    found = re.findall(rf"DNS proxy of {wl} listens on port (\d+)", agent.log.read_text())
    assert found, agent.log.read_text()
    return int(found[-1])


def garbage():
    valid = wire.build_query(1, "api.provider.test", wire.TYPE_A)
    return st.one_of(
        st.binary(max_size=600),
        st.binary(min_size=1000, max_size=65000),  # oversized
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated
        st.integers(0, 0x3FFF).map(lambda to: valid[:12] + struct.pack("!H", 0xC000 | to) + valid[-4:]),  # pointers
        st.binary(max_size=300).map(lambda tail: valid[:12] + tail),
        st.just(valid[:12] + b"\x01a\xc0\x0c" + valid[-4:]),  # a pointer loop
        st.just(struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + valid[12:]),  # a response, not a query
    )


def test_fuzzed_packets_never_stop_the_live_proxy(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    # A workload process that lives through the test keeps one proxy open in ROUTER; its
    # namespace is entered to reach the proxy directly, as no workload process would.
    anchor = lab.run_in_router(agent.run_cmd(wl, ["sleep", "300"]))
    agent.wait_for(lambda e: e["kind"] == "process_joined" and e["process"]["pid"] == anchor.pid)
    assert query(lab, agent, wl, "api.provider.test")["rcodes"] == {"0": 1}  # the anchor's proxy is open
    port = proxy_port(agent, wl)
    udp = in_netns_of(anchor.pid, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    udp.setblocking(False)
    replies = []

    @settings(max_examples=3000, deadline=None, database=None)
    @given(packet=garbage())
    def send(packet):
        udp.sendto(packet, ("127.0.0.1", port))
        try:
            replies.append(udp.recv(65535))
        except BlockingIOError:
            pass

    with udp:
        send()
    assert replies, agent.log.read_text()
    for reply in replies:  # whatever came back is a well-formed refusal
        assert wire.parse_response(reply).rcode in (wire.RCODE_FORMERR, wire.RCODE_REFUSED, wire.RCODE_SERVFAIL, 0)

    def tcp_junk():
        for chunk in (b"\x00", b"\xff\xff" + b"x" * 100, b"\x00\x05hello", struct.pack("!H", 3000) + b"\0" * 3000):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(chunk)
    try:
        in_netns_of(anchor.pid, tcp_junk)
    except OSError as e:
        raise AssertionError(f"{e}; agent log:\n{agent.log.read_text()}") from e

    assert query(lab, agent, wl, "api.provider.test")["rcodes"] == {"0": 1}
    assert query(lab, agent, wl, "api.provider.test", "--tcp")["rcodes"] == {"0": 1}
    assert "Traceback" not in agent.log.read_text()


def test_ttls_handed_out_are_capped_to_what_the_agent_honours(lab, start_agent, tmp_path):
    long_lived = "198.18.5.55"
    DnsServer(lab, long_lived, tmp_path, hosts=ZONE, ttl=86400)
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl, upstream=long_lived), [wl])
    assert query(lab, agent, wl, "api.provider.test")["ttls"] == [3600]


def test_a_released_workload_resolves_through_the_proxy_again(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    assert query(lab, agent, wl, "api.provider.test")["rcodes"] == {"0": 1}
    with unix_stub(agent) as api:
        api.Quarantine(pb.WorkloadRequest(workload=wl), timeout=10)
        api.Release(pb.WorkloadRequest(workload=wl), timeout=10)
    assert query(lab, agent, wl, "api.provider.test")["rcodes"] == {"0": 1}


def test_a_restarted_agent_answers_again(lab, start_agent, dns_server):
    wl = unique_name("dns")
    agent = start_agent(dns_policy(wl), [wl])
    assert query(lab, agent, wl, "api.provider.test")["rcodes"] == {"0": 1}
    agent.kill9()
    # No agent: the kernel still redirects, nobody answers, nothing reaches a resolver.
    before = len(dns_server.queried_names())
    assert query(lab, agent, wl, "{rand}.evil.test", "--count", "1")["rcodes"] in ({"-1": 1}, {"-111": 1})
    assert len(dns_server.queried_names()) == before
    agent.start()
    assert query(lab, agent, wl, "api.provider.test")["rcodes"] == {"0": 1}


def test_a_restarted_agent_keeps_what_names_allowed_as_far_as_the_policy_still_does(lab, start_agent, tmp_path):
    """A wildcard's addresses cannot be resolved ahead of time: only the answers the agent
    before allowed keep a pooled connection alive across a restart."""
    DnsServer(lab, RESOLVER, tmp_path, hosts=ZONE, ttl=300)
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(dns_policy(wl, rules="{fqdn: '*.azure.test', ports: [443]}"), [wl])
    assert query(lab, agent, wl, "eastus.azure.test")["addresses"] == [Lab.PROVIDER4]
    router = start_router(lab, agent.router_cmd(wl, "hold", Lab.PROVIDER4, "443"))
    assert read_json(router)["connected"]
    send(router, 100)
    assert provider.wait_for_bytes(100)

    agent.kill9()
    agent.start()
    send(router, 100)
    assert provider.wait_for_bytes(200)
    assert run(lab, agent, wl, "tcp", Lab.PROVIDER4, "443")["ok"]

    agent.stop()
    write_policy(agent.policy, dns_policy(wl, rules="{fqdn: '*.other.test', ports: [443]}"))
    agent.start()
    assert run(lab, agent, wl, "tcp", Lab.PROVIDER4, "443")["errno"] == EPERM
    received = provider.received_bytes()
    send(router, 100)  # into the socket buffer; the backstop drops every packet
    assert not provider.wait_for_bytes(received + 100, timeout=1)


def test_exact_names_are_resolved_ahead_of_time(lab, start_agent, dns_server):
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(dns_policy(wl), [wl])
    # A router that never asks the proxy (as one resolving through nscd would not).
    anchor = lab.run_in_router(agent.run_cmd(wl, ["sleep", "300"]))
    agent.wait_for(lambda e: e["kind"] == "process_joined" and e["process"]["pid"] == anchor.pid)
    deadline = time.monotonic() + 10
    while "api.provider.test" not in dns_server.queried_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "api.provider.test" in dns_server.queried_names()
    assert "eastus.azure.test" not in dns_server.queried_names()  # wildcards cannot be
    time.sleep(0.5)  # the answer is written into the allow map as it arrives
    assert run(lab, agent, wl, "tcp", Lab.PROVIDER4, "443")["ok"]
    assert provider.wait_for_bytes(100)


def test_fqdn_budget_counts_bytes_to_the_names_addresses(lab, start_agent, dns_server):
    """Counters are labelled with the name the proxy resolved, so a budget on a name sees
    the bytes sent to its addresses."""
    wl = unique_name("dn")
    budget = """        budgets:
          - fqdn: api.provider.test
            bytes_per_minute: 10kB
            action: alert
        dns:"""
    agent = start_agent(dns_policy(wl).replace("        dns:", budget, 1), [wl])
    lab.serve(Lab.PROVIDER4, 443)
    assert run(lab, agent, wl, "resolve-connect", "api.provider.test", "443", "--count", "100")["ok"]
    exceeded = agent.wait_for(lambda e: e["kind"] == "budget_exceeded" and e["workload"] == wl, timeout=15)
    assert exceeded["detail"]["budget"]["fqdn"] == "api.provider.test" and exceeded["bytes"] > 10_000
    assert "api.provider.test" in exceeded["detail"]["destinations"]
