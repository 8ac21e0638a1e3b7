"""Collector benchmark: sustained events per second from one agent to stored rows.

    python bench/collector.py [--events N] [--rounds R] [-o table|json]

1. One agent serving mutual TLS on a loopback port gets N real kernel denials (a router
   in a agent/lab/network.py namespace connecting to a destination its policy refuses), all
   made durable in its spool before anything is timed.
2. For SQLite (a temporary file) and PostgreSQL (a throwaway server from Debian's
   binaries, default durability: fsync and synchronous_commit on), a real
   `warden collector` starts on an empty store and drains that backlog; the rate is
   events stored / time from its first stored event to its last (from its /status).
3. For finding the bottleneck, in the same run: the agent's own stream rates (bare
   WatchEvents and WatchEventBatches clients that store nothing; the collector uses the
   batches), each store's insert rate on its own
   (batches of 2000 rows, no gRPC), and what Python gRPC itself streams here: an
   in-process server on loopback yielding one prebuilt Event per message, and the same
   Events 100 to a message.

The target: >= 20,000 events/s into PostgreSQL.
"""
from __future__ import annotations

import json
from concurrent import futures
import statistics
import tempfile
import time
from pathlib import Path

# first: puts tests/ and the repository root on sys.path
from common import aligned, argument_parser, parse, progress, report

import grpc
from agent.collector.rows import EventRow
from agent.collector.store import open_store
from agentproc import AgentProcess, unique_name, workload_policy
from apiclient import flood, free_port, pb, settle, tls_stub
from certs import Authority
from collectorproc import CollectorProcess
from agent.lab.network import Lab
from pgserver import PostgresServer

TARGET_POSTGRES = 20_000
INSERT_BATCH = 2000


def start_agent(home: Path, workload: str, certs: dict) -> tuple[AgentProcess, int]:
    port = free_port()
    home.mkdir()
    agent = AgentProcess(home, workload_policy(workload, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443]}}"), [workload])
    agent.agent_args = ["--agent-id", "bench-agent", "--listen", f"127.0.0.1:{port}",
                        "--tls-cert", str(certs["server"].cert), "--tls-key", str(certs["server"].key),
                        "--tls-client-ca", str(certs["client_ca"].cert)]
    agent.start()
    return agent, port


def raw_stream_rate(port: int, certs: dict, batched: bool) -> float:
    with tls_stub(port, certs["server_ca"].cert, certs["client"]) as api:
        request = pb.WatchEventsRequest(since_seq=0)
        began = time.perf_counter()
        if batched:
            count = sum(len(batch.events) for batch in api.WatchEventBatches(request, timeout=600))
        else:
            count = sum(1 for _ in api.WatchEvents(request, timeout=600))
        return count / (time.perf_counter() - began)


def collector_rate(home: Path, store_url: str, port: int, tls: dict, newest_seq: int) -> float:
    collector = CollectorProcess(home, store_url, {"bench": port}, tls)
    try:
        collector.start()
        first = collector.wait_until(lambda s: s["events_stored"] > 0, timeout=120, what="a first stored event")
        began, stored_at_start = time.perf_counter(), first["events_stored"]
        last = collector.wait_until(lambda s: s["agents"][0]["stored_seq"] >= newest_seq, timeout=600,
                                    what="the whole backlog stored")
        return (last["events_stored"] - stored_at_start) / (time.perf_counter() - began)
    finally:
        collector.stop()
        collector.cleanup()


def grpc_ceiling(events: int, per_message: int) -> float:
    """Events/s Python gRPC streams on loopback with no work per event, `per_message` Events per message."""
    event = pb.Event(seq=1, time=time.time(), agent="bench", kind="egress_denied", workload="bench",
                     process=pb.ProcessInfo(pid=4242, comm="python3", cmdline=["python3", "router.py"]),
                     destination=pb.Destination(ip=Lab.ATTACKER4, port=443, protocol="tcp"), json="{}" * 200)
    message = event.SerializeToString() * per_message

    def stream(request, context):
        for _ in range(events // per_message):
            yield message

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Stream", {"Events": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/bench.Stream/Events")
            began = time.perf_counter()
            received = sum(per_message for _ in call(b""))
            return received / (time.perf_counter() - began)
    finally:
        server.stop(0)


def store_insert_rate(store_url: str, events: int) -> float:
    body = json.dumps({"agent": "bench-insert", "kind": "egress_denied", "detail": {}, "process": {"pid": 4242}})
    rows = [EventRow("bench-insert", seq, time.time(), "egress_denied", "bench", 4242, body)
            for seq in range(1, events + 1)]
    store = open_store(store_url)
    try:
        began = time.perf_counter()
        for start in range(0, events, INSERT_BATCH):
            store.insert(rows[start:start + INSERT_BATCH])
        return events / (time.perf_counter() - began)
    finally:
        store.close()


def run(events: int, rounds: int, tmp: Path, lab: Lab, postgres: PostgresServer) -> dict:
    server_ca, client_ca = Authority(tmp, "server-ca"), Authority(tmp, "client-ca")
    certs = {"server_ca": server_ca, "client_ca": client_ca, "server": server_ca.issue("agent", server=True),
             "client": client_ca.issue("collector")}
    tls = {"ca": server_ca.cert, "cert": certs["client"].cert, "key": certs["client"].key}
    workload = unique_name("bench-col")
    agent, port = start_agent(tmp / "agent", workload, certs)
    try:
        progress(f"making {events} kernel denials in the agent's spool ...")
        flood(lab, agent, workload, seconds=600, count=events).communicate(timeout=660)
        settle(agent)
        with tls_stub(port, server_ca.cert, certs["client"]) as api:
            newest = api.GetStatus(pb.GetStatusRequest(), timeout=10).spool.newest_seq
        samples: dict[str, list[float]] = {"agent_stream": [], "agent_batch_stream": [], "sqlite": [], "postgres": [],
                                           "sqlite_insert_only": [], "postgres_insert_only": [],
                                           "grpc_1_per_message": [], "grpc_100_per_message": []}
        for round_number in range(rounds):
            progress(f"round {round_number + 1}/{rounds}: the agent's bare streams, and gRPC's own ...")
            samples["agent_stream"].append(raw_stream_rate(port, certs, batched=False))
            samples["agent_batch_stream"].append(raw_stream_rate(port, certs, batched=True))
            samples["grpc_1_per_message"].append(grpc_ceiling(events, 1))
            samples["grpc_100_per_message"].append(grpc_ceiling(events, 100))
            for name in ("sqlite", "postgres"):
                url = str(tmp / f"{name}-{round_number}.db") if name == "sqlite" else postgres.new_database()
                progress(f"round {round_number + 1}/{rounds}: agent -> collector -> {name} ...")
                samples[name].append(collector_rate(tmp / f"collector-{name}-{round_number}", url, port, tls, newest))
                insert_url = str(tmp / f"{name}-insert-{round_number}.db") if name == "sqlite" else postgres.new_database()
                samples[f"{name}_insert_only"].append(store_insert_rate(insert_url, events))
    finally:
        agent.cleanup()
    return {"events": newest, "rounds": rounds, "samples": samples,
            "median": {key: statistics.median(values) for key, values in samples.items()}}


# (label, key in the result's samples), in the order of the table
MEASURES = [
    ("agent -> collector -> SQLite (rows stored)", "sqlite"),
    ("agent -> collector -> PostgreSQL (rows stored)", "postgres"),
    ("the agent's bare WatchEventBatches stream (ceiling)", "agent_batch_stream"),
    ("the agent's bare WatchEvents stream, 1 event per message", "agent_stream"),
    ("SQLite inserts alone (batches of 2000)", "sqlite_insert_only"),
    ("PostgreSQL inserts alone (batches of 2000)", "postgres_insert_only"),
    ("Python gRPC, bare, 1 Event per message", "grpc_1_per_message"),
    ("Python gRPC, bare, 100 Events per message", "grpc_100_per_message"),
]


def table(result: dict) -> str:
    median = result["median"]
    rows = [("what", "events/s (median)", "samples"),
            *((label, f"{median[key]:,.0f}", ", ".join(f"{value:,.0f}" for value in result["samples"][key]))
              for label, key in MEASURES)]
    met = "met" if median["postgres"] >= TARGET_POSTGRES else "missed"
    return "\n".join([f"{result['events']} events from one agent, {result['rounds']} round(s)", *aligned(rows),
                      f"target: >= {TARGET_POSTGRES:,} events/s into PostgreSQL from one agent: {met}"])


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="denials in the agent's spool (default 20000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each measurement (default 2)")
    arguments = parse(parser)
    if arguments.events < 1000 or arguments.rounds < 1:
        parser.error("--events must be at least 1000 and --rounds at least 1")
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="ew-bench-") as tmp, PostgresServer() as postgres:
        result = run(arguments.events, arguments.rounds, Path(tmp), lab, postgres)
    report(arguments.output, result, table(result))


if __name__ == "__main__":
    main()
