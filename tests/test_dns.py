"""DNS-aware allowlists end to end: a real agent and kernel, a router in the Lab's ROUTER
namespace, and real dnsmasq servers in NET serving the test's zones (tests/dnsserver.py)."""
import json
import subprocess

import pytest

from agentproc import outcome, unique_name
from dnsserver import DnsServer
from netlab import Lab

pytestmark = pytest.mark.root

RESOLVER = "198.18.5.53"  # the resolver the policy names as upstream
OTHER_RESOLVER = "198.18.5.54"  # a resolver the router may ask instead: still redirected
ATTACKER_DNS = "198.18.6.53"  # authoritative for the attacker's zone
EPERM = 1
REFUSED = 5


def dns_policy(name: str, *, grace: int = 30, mode: str = "enforce", on_violation: str = "deny") -> str:
    return f"""
    version: 1
    workloads:
      - name: {name}
        mode: {mode}
        on_violation: {on_violation}
        allow:
          - fqdn: api.provider.test
            ports: [443]
            protocol: tcp
          - fqdn: "*.azure.test"
            ports: [443]
          - fqdn: alias.provider.test
            ports: [443]
          - fqdn: moving.provider.test
            ports: [443]
        dns:
          upstream: [{RESOLVER}]
          grace_seconds: {grace}
    """


ZONE = {"api.provider.test": Lab.PROVIDER4, "eastus.azure.test": Lab.PROVIDER4,
        "deep.eastus.azure.test": Lab.OTHER4, "cdn.elsewhere.test": Lab.OTHER4,
        "moving.provider.test": Lab.PROVIDER4, "unlisted.provider.test": Lab.OTHER4}


@pytest.fixture
def dns_server(lab, tmp_path):
    return DnsServer(lab, RESOLVER, tmp_path, hosts=ZONE, cnames={"alias.provider.test": "cdn.elsewhere.test"}, ttl=2)


def run(lab, agent, wl, *args):
    return outcome(lab.run_in_router(agent.router_cmd(wl, *args), stdout=-1, stderr=-1, text=True), timeout=60)


def query(lab, agent, wl, name, *extra, server=RESOLVER):
    return run(lab, agent, wl, "dns", server, "53", name, *extra)


def test_allowed_name_resolves_and_its_address_is_reachable(lab, start_agent, dns_server):
    wl = unique_name("dns")
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(dns_policy(wl), [wl])
    result = run(lab, agent, wl, "resolve-connect", "api.provider.test", "443", "--count", "3")
    assert result["ok"], result
    assert provider.connections() == 3
