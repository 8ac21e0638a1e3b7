"""`warden collector` end to end: real agents (kernel denials as events, mutual TLS on
loopback ports), a real collector process, SQLite and a real PostgreSQL server."""
import json
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agentproc import REPO, WARDEN, workload_policy
from apiclient import flood, free_port, read_all, settle, unix_stub
from certs import Authority
from collectorproc import CollectorProcess
from agent.lab.network import Lab
from pgserver import PostgresServer

from agent.collector.query import EventQuery
from agent.collector.store import open_store

pytestmark = pytest.mark.root

EVENTS_PER_AGENT = 20_000


def policy(name: str) -> str:
    return workload_policy(name, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}")


@pytest.fixture
def pki(tmp_path):
    server_ca = Authority(tmp_path, "server-ca")
    client_ca = Authority(tmp_path, "client-ca")
    collector = client_ca.issue("collector")
    return {"server_ca": server_ca, "client_ca": client_ca, "rogue_ca": Authority(tmp_path, "rogue-ca"),
            "tls": {"ca": server_ca.cert, "cert": collector.cert, "key": collector.key}}


@pytest.fixture
def start_tls_agent(start_agent, pki):
    """start_tls_agent(agent_id, workload) -> (agent, port): an agent serving mutual TLS on a loopback port."""

    def start(agent_id: str, workload: str):
        port = free_port()
        server = pki["server_ca"].issue(f"{agent_id}-server", server=True)
        agent = start_agent(policy(workload), [workload], agent_args=[
            "--agent-id", agent_id, "--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert),
            "--tls-key", str(server.key), "--tls-client-ca", str(pki["client_ca"].cert)])
        return agent, port

    return start


@pytest.fixture
def collectors():
    started: list[CollectorProcess] = []

    def start(*args, **kwargs) -> CollectorProcess:
        collector = CollectorProcess(*args, **kwargs)
        started.append(collector)
        return collector.start()

    yield start
    for collector in started:
        collector.cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "collector.db")
    return request.getfixturevalue("postgres_url")


def spooled(agent) -> list[int]:
    """Every seq the agent's spool holds: what a collector can and must store."""
    settle(agent)
    with unix_stub(agent) as api:
        return [e.seq for e in read_all(api, since_seq=0)]


def stored(store_url: str, agent_id: str) -> list[int]:
    store = open_store(store_url, create=False)
    try:
        return [e["seq"] for e in store.query(EventQuery(agent=agent_id))]
    finally:
        store.close()


def caught_up(truth: dict[str, list[int]]):
    """A status predicate: every agent's newest spooled seq is stored."""
    def check(status) -> bool:
        by_id = {a["agent_id"]: a["stored_seq"] for a in status["agents"]}
        return all(by_id.get(agent_id, 0) >= seqs[-1] for agent_id, seqs in truth.items())
    return check


def json_lines(path: Path) -> list[tuple[str, int]]:
    keys = []
    for file in sorted(path.parent.glob(path.name + "*")):
        keys += [(e["agent"], e["seq"]) for e in map(json.loads, file.read_text().splitlines())]
    return keys


def warden_events(*args: str) -> str:
    result = subprocess.run([*WARDEN, "events", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_event_stored_once_through_collector_and_agent_restarts(lab, start_tls_agent, names, pki, tmp_path,
                                                                       collectors, store_url):
    """20,000 denials per agent; the collector is SIGKILLed and restarted three times and one
    agent is SIGKILLed and restarted once while they flow. Afterwards the store holds every
    event each agent's spool holds, exactly once, and the JSON lines lose none of them."""
    (agent_a, port_a), (agent_b, port_b) = start_tls_agent("agent-a", names[0]), start_tls_agent("agent-b", names[1])
    jsonl = tmp_path / "siem" / "events.jsonl"
    collector = collectors(tmp_path / "collector", store_url, {"a": port_a, "b": port_b}, pki["tls"], jsonl=jsonl)
    floods = [flood(lab, agent_a, names[0], seconds=240, count=EVENTS_PER_AGENT),
              flood(lab, agent_b, names[1], seconds=240, count=EVENTS_PER_AGENT)]
    for restart in range(3):
        time.sleep(random.uniform(1.0, 2.5))
        collector.kill9()
        if restart == 1:
            agent_b.kill9()  # in the middle of its flood: its last events may not be durable yet
            agent_b.start()
        collector.start()
    for router in floods:
        assert json.loads(router.communicate(timeout=240)[0].splitlines()[-1])["refused"] == EVENTS_PER_AGENT

    truth = {"agent-a": spooled(agent_a), "agent-b": spooled(agent_b)}
    collector.wait_until(caught_up(truth), timeout=180, what="catch-up with both agents")
    for agent_id, seqs in truth.items():
        assert stored(store_url, agent_id) == seqs, agent_id
    published_a = agent_a.events()
    denied = sum(e["kind"] == "egress_denied" for e in published_a)
    kernel_lost = sum(e["detail"]["count"] for e in published_a
                      if e["kind"] == "events_lost" and e["detail"].get("where") == "kernel ring buffer full")
    assert denied <= EVENTS_PER_AGENT <= denied + kernel_lost  # a busy machine may overrun the ring buffer
    assert [e["seq"] for e in published_a] == truth["agent-a"]  # the agent that was not killed: all of it
    gaps = [e["detail"] for e in agent_b.events() if e["kind"] == "events_lost" and e["detail"].get("at_most")]
    missing_b = [e["seq"] for e in agent_b.events() if e["seq"] not in set(truth["agent-b"])]
    assert all(any(g["first_seq"] <= s <= g["last_seq"] for g in gaps) for s in missing_b), (missing_b, gaps)

    assert collector.stop() == 0
    resumed = [int(line.rsplit(" ", 1)[1]) for line in collector.log.read_text().splitlines() if "resuming after seq" in line]
    assert len(resumed) >= 8 and sum(seq > 0 for seq in resumed) >= 6, resumed  # restarts came mid-stream
    lines = json_lines(jsonl)
    assert set(lines) == {(agent_id, seq) for agent_id, seqs in truth.items() for seq in seqs}
    assert len(list(jsonl.parent.iterdir())) > 2  # it rotated

    # `warden events --db` answers the agent's own `warden events` with the same filters, line for line.
    filters = ["--since", "0", "--kind", "egress_denied", "-o", "json"]
    from_agent = warden_events("--socket", str(agent_a.socket), *filters)
    from_store = warden_events("--db", store_url, "--agent", "agent-a", *filters)
    assert from_store == from_agent and from_store.count("\n") == EVENTS_PER_AGENT
    last = warden_events("--db", store_url, "--agent", "agent-b", "--last", "3", "-o", "json").splitlines()
    assert [json.loads(line)["seq"] for line in last] == truth["agent-b"][-3:]


def test_two_collectors_on_one_postgresql_database_store_each_event_once(lab, start_tls_agent, names, pki, tmp_path,
                                                                          collectors, postgres_url):
    (agent_a, port_a), (agent_b, port_b) = start_tls_agent("agent-a", names[0]), start_tls_agent("agent-b", names[1])
    agents = {"a": port_a, "b": port_b}
    first = collectors(tmp_path / "first", postgres_url, agents, pki["tls"], jsonl=tmp_path / "first.jsonl")
    second = collectors(tmp_path / "second", postgres_url, agents, pki["tls"], jsonl=tmp_path / "second.jsonl")
    for router in (flood(lab, agent_a, names[0], seconds=120, count=5000),
                   flood(lab, agent_b, names[1], seconds=120, count=5000)):
        router.communicate(timeout=120)
    truth = {"agent-a": spooled(agent_a), "agent-b": spooled(agent_b)}
    for collector in (first, second):
        collector.wait_until(caught_up(truth), timeout=120, what="catch-up with both agents")
    for agent_id, seqs in truth.items():
        assert stored(postgres_url, agent_id) == seqs
    assert first.stop() == 0 and second.stop() == 0
    # Each collector writes the events it stored itself: together, every event exactly once.
    lines = json_lines(tmp_path / "first.jsonl") + json_lines(tmp_path / "second.jsonl")
    assert sorted(lines) == sorted((agent_id, seq) for agent_id, seqs in truth.items() for seq in seqs)


def test_a_client_certificate_the_agent_does_not_trust_is_refused_and_said_so(start_tls_agent, names, pki, tmp_path,
                                                                              collectors):
    agent, port = start_tls_agent("agent-a", names[0])
    rogue = pki["rogue_ca"].issue("rogue-collector")
    collector = collectors(tmp_path / "collector", str(tmp_path / "c.db"), {"a": port},
                           {"ca": pki["server_ca"].cert, "cert": rogue.cert, "key": rogue.key})
    status = collector.wait_until(lambda s: s["agents"][0]["last_error"], timeout=30, what="error")
    assert not status["agents"][0]["connected"] and status["events_stored"] == 0
    assert "does not trust this collector's client certificate" in status["agents"][0]["last_error"]
    said = [line for line in collector.log.read_text().splitlines() if f"agent a (127.0.0.1:{port})" in line]
    assert said and "TLS refused by the agent: it does not trust this collector's client certificate" in said[0]
    with unix_stub(agent) as api:  # the agent served it nothing and is fine
        assert len(read_all(api, since_seq=0)) == len(agent.events())


def test_a_stuck_or_dead_agent_holds_up_no_other(lab, start_tls_agent, names, pki, tmp_path, collectors):
    agent, port = start_tls_agent("agent-a", names[0])
    with socket.socket() as stuck:  # accepts TCP connections (the kernel does) and never says a word
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(16)
        collector = collectors(tmp_path / "collector", str(tmp_path / "c.db"),
                               {"stuck": stuck.getsockname()[1], "dead": free_port(), "live": port}, pki["tls"])
        flood(lab, agent, names[0], seconds=60, count=2000).communicate(timeout=60)
        truth = {"agent-a": spooled(agent)}
        collector.wait_until(caught_up(truth), timeout=60, what="catch-up with the live agent")
        status = collector.wait_until(lambda s: all(a["last_error"] for a in s["agents"][:2]), timeout=60,
                                      what="errors for the stuck and the dead agent")
        stuck_state, dead_state, live_state = status["agents"]
        assert "no answer in time" in stuck_state["last_error"]
        assert "unreachable" in dead_state["last_error"]
        assert live_state["connected"] and live_state["lag"] == 0 and live_state["last_error"] == ""
        metrics = collector.metrics()
        assert 'warden_collector_agent_connected{agent="live"} 1' in metrics
        assert 'warden_collector_agent_connected{agent="stuck"} 0' in metrics
        assert f'warden_collector_events_stored_total{{agent="live"}} {len(truth["agent-a"])}' in metrics
        table = subprocess.run([*WARDEN, "collector", "status", "--listen", f"127.0.0.1:{collector.port}"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout
    live_row = [line.split() for line in table.splitlines() if line.startswith("live ")]
    assert live_row and live_row[0][3:6] == ["yes", str(truth["agent-a"][-1]), "0"], table


def test_a_store_outage_is_reported_and_nothing_is_lost(lab, start_tls_agent, names, pki, tmp_path, collectors):
    """PostgreSQL goes down while events flow and comes back: the collector counts store
    errors, says so, and resumes from what the database really holds."""
    agent, port = start_tls_agent("agent-a", names[0])
    with PostgresServer() as postgres:
        url = postgres.new_database()
        collector = collectors(tmp_path / "collector", url, {"a": port}, pki["tls"])
        router = flood(lab, agent, names[0], seconds=120, count=6000)
        collector.wait_until(lambda s: s["events_stored"] > 0, timeout=60, what="a first stored event")
        postgres.pause()
        down = collector.wait_until(lambda s: s["store_errors"] > 0, timeout=60, what="a store error")
        assert down["agents"][0]["last_error"].startswith(f"store {url}: ")  # no password in it to hide here
        postgres.resume()
        router.communicate(timeout=120)
        truth = {"agent-a": spooled(agent)}
        collector.wait_until(caught_up(truth), timeout=120, what="catch-up after the outage")
        assert stored(url, "agent-a") == truth["agent-a"]
        assert "warden_collector_store_errors_total" in collector.metrics()
        assert collector.stop() == 0


def test_two_addresses_answering_to_one_agent_id_are_not_mixed(start_tls_agent, names, pki, tmp_path, collectors):
    """Events are keyed by (agent id, seq): a second address claiming an id already collected is refused."""
    agent, port = start_tls_agent("agent-a", names[0])
    collector = collectors(tmp_path / "collector", str(tmp_path / "c.db"), {"one": port, "two": port}, pki["tls"])
    status = collector.wait_until(lambda s: any(a["last_error"] for a in s["agents"]) and
                                  any(a["connected"] for a in s["agents"]), timeout=30, what="one refused, one connected")
    refused = [a for a in status["agents"] if a["last_error"]]
    assert len(refused) == 1 and "it calls itself 'agent-a', as agent" in refused[0]["last_error"]
    assert "give each agent its own --agent-id" in refused[0]["last_error"]


def test_a_storm_of_signals_still_stops_the_collector_cleanly(pki, tmp_path, collectors):
    # A signal can arrive while the handler of the one before still runs: a handler that took
    # a lock then waited forever on the lock its own thread held.
    collector = collectors(tmp_path / "collector", str(tmp_path / "c.db"), {"a": free_port()}, pki["tls"])
    sent = 0
    end = time.monotonic() + 30
    while collector.process.poll() is None and time.monotonic() < end:
        collector.process.send_signal(signal.SIGINT)
        sent += 1
    # Once Python finalises, a SIGINT finds the default action again: the storm may end it so.
    assert collector.process.poll() in (0, -signal.SIGINT), f"not stopped after {sent} SIGINTs"
    assert "collector: stopped; 0 event(s) stored" in collector.log.read_text()
