"""API benchmark: events from the kernel to a WatchEvents subscriber, and how soon they arrive.

    python bench/api.py [--flooders N] [--seconds S] [--rate R] [--ports N] [--samples N]
                        [--stream events|batches|both] [-o table|json]

1. throughput: N routers in one workload make denied connects as fast as they can for S
   seconds (to one port, or to --ports ports in turn, which defeats folding); every
   refusal is a kernel record. A WatchEvents subscriber (gRPC over the agent's Unix socket, following, filtered to the workload's egress_denied events)
   counts them. Reported: denials per second from the first connect to the last event at
   the subscriber, and how many of the kernel's refusals the subscriber did not get
   (the target is none: refusals counted by the routers themselves, not by the agent).
2. latency: a router makes one denied connect every 10 ms, each to its own port, and
   prints the time just before it; the subscriber notes when that port's event arrives.

Both are measured for each stream asked for, one after the other on the same agent: the
subscriber on WatchEvents (one event per gRPC message) and on WatchEventBatches (a page of
durable events per message).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# first: puts tests/ and the repository root on sys.path
from common import agent_in_lab, aligned, argument_parser, parse, percentile, progress, report

import grpc
from agentproc import AgentProcess, unique_name, workload_policy
from apiclient import pb, unix_stub
from agent.lab.network import Lab

TARGET_RATE = 30_000
TARGET_P99_MS = 10.0
LATENCY_BASE_PORT = 20_000
SPREAD_BASE_PORT = 30_000
DRAIN_SECONDS = 60.0

FLOODER = """
import json, socket, sys, time
host, base, seconds, rate, ports = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print("ready", flush=True)
sys.stdin.readline()
refused = other = 0
started = time.time()
begun = time.monotonic()
deadline = begun + seconds
while time.monotonic() < deadline:
    if rate:  # paced: never ahead of rate attempts per second
        time.sleep(max(0.0, begun + (refused + other) / rate - time.monotonic()))
    for _ in range(200):
        s = socket.socket()
        try:
            s.connect((host, base + (refused + other) % ports))
            other += 1
        except PermissionError:
            refused += 1
        except OSError:
            other += 1
        s.close()
print(json.dumps({"refused": refused, "other": other, "started": started}), flush=True)
"""

PACER = """
import socket, sys, time
host, base, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for i in range(count):
    s = socket.socket()
    print(base + i, time.time(), flush=True)
    try:
        s.connect((host, base + i))
    except OSError:
        pass
    s.close()
    time.sleep(interval)
"""


class Subscriber(threading.Thread):
    """Follows the workload's egress_denied events; counts denials (an aggregated event
    counts detail.count) and notes when each destination port's first event arrived."""

    def __init__(self, agent: AgentProcess, workload: str, batched: bool) -> None:
        super().__init__(daemon=True)
        self.batched = batched
        with unix_stub(agent) as api:
            self.since = api.GetStatus(pb.GetStatusRequest(), timeout=10).spool.newest_seq
        self.agent, self.workload = agent, workload
        self.denials = 0
        self.events = 0
        self.arrivals: dict[int, float] = {}
        self.last_arrival = 0.0
        self._stream = None
        self.ready = threading.Event()

    def run(self) -> None:
        with unix_stub(self.agent) as api:
            request = pb.WatchEventsRequest(since_seq=self.since, follow=True, workloads=[self.workload],
                                            kinds=["egress_denied"])
            self._stream = api.WatchEventBatches(request) if self.batched else api.WatchEvents(request)
            self.ready.set()
            try:
                for message in self._stream:
                    now = time.time()
                    for event in message.events if self.batched else (message,):
                        self.events += 1
                        self.denials += json.loads(event.detail_json).get("count", 1)
                        self.arrivals.setdefault(event.destination.port, now)
                    self.last_arrival = now
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    raise

    def stop(self) -> None:
        self._stream.cancel()
        self.join(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def records_lost(agent: AgentProcess) -> int:
    """Ring-buffer overruns since the agent started."""
    with unix_stub(agent) as api:
        return api.GetStatus(pb.GetStatusRequest(), timeout=10).kernel_records_lost


def measure_throughput(lab: Lab, agent: AgentProcess, workload: str, flooders: int, seconds: float,
                       rate: float, ports: int, batched: bool) -> dict[str, Any]:
    cpu_before = cpu_seconds(agent.process.pid)
    lost_before = records_lost(agent)
    subscriber = Subscriber(agent, workload, batched)
    subscriber.start()
    subscriber.ready.wait(10)
    base = 443 if ports == 1 else SPREAD_BASE_PORT
    procs = [lab.run_in_router(agent.run_cmd(workload, [sys.executable, "-c", FLOODER, Lab.ATTACKER4, str(base),
                                                        str(seconds), str(rate / flooders), str(ports)]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(flooders)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outcomes = [json.loads(proc.communicate(timeout=seconds + 60)[0]) for proc in procs]
    refused = sum(o["refused"] for o in outcomes)
    deadline = time.monotonic() + DRAIN_SECONDS
    while subscriber.denials < refused and time.monotonic() < deadline:
        time.sleep(0.05)
    subscriber.stop()
    agent_cpu = cpu_seconds(agent.process.pid) - cpu_before
    lost = records_lost(agent) - lost_before
    first = min(o["started"] for o in outcomes)
    return {"stream": "WatchEventBatches" if batched else "WatchEvents", "flooders": flooders, "ports": ports,
            "seconds": seconds, "paced_rate": rate, "kernel_refusals": refused,
            "subscriber_denials": subscriber.denials, "subscriber_events": subscriber.events,
            "missing": refused - subscriber.denials, "kernel_records_lost": lost,
            "events_per_second": subscriber.denials / (subscriber.last_arrival - first),
            "refusals_per_second": refused / seconds,
            "agent_cpu_us_per_refusal": agent_cpu / subscriber.denials * 1e6,
            "agent_capacity_per_core": subscriber.denials / agent_cpu if agent_cpu else float("inf")}


def measure_latency(lab: Lab, agent: AgentProcess, workload: str, samples: int, batched: bool) -> list[float]:
    subscriber = Subscriber(agent, workload, batched)
    subscriber.start()
    subscriber.ready.wait(10)
    pacer = lab.run_in_router(agent.run_cmd(workload, [sys.executable, "-c", PACER, Lab.ATTACKER4,
                                                       str(LATENCY_BASE_PORT), str(samples), "0.01"]),
                              stdout=subprocess.PIPE, text=True)
    sent = dict(tuple(map(float, line.split())) for line in pacer.communicate(timeout=samples + 60)[0].splitlines())
    deadline = time.monotonic() + 10
    while len(subscriber.arrivals) < samples and time.monotonic() < deadline:
        time.sleep(0.05)
    subscriber.stop()
    return [(subscriber.arrivals[int(port)] - at) * 1000 for port, at in sent.items() if int(port) in subscriber.arrivals]


def summary(throughput: dict[str, Any], latency_ms: list[float], samples: int) -> dict[str, Any]:
    return {**throughput, "latency_samples": len(latency_ms), "latency_missing": samples - len(latency_ms),
            "latency_ms_p50": statistics.median(latency_ms), "latency_ms_p99": percentile(latency_ms, 99),
            "latency_ms_max": max(latency_ms)}


def table(s: dict[str, Any]) -> str:
    rate_met = s["events_per_second"] >= TARGET_RATE and s["missing"] == 0 and s["kernel_records_lost"] == 0
    rows = [
        (f"subscriber on {s['stream']}", "", "", ""),
        (f"kernel refusals ({s['flooders']} routers, {s['seconds']:g} s, paced at {s['paced_rate']:.0f}/s, "
         f"{s['ports']} port(s))",
         f"{s['kernel_refusals']} "
         f"({s['refusals_per_second']:.0f}/s)", "", ""),
        ("denials at the subscriber", f"{s['subscriber_denials']} in {s['subscriber_events']} events", "", ""),
        ("missing at the subscriber / kernel ring-buffer losses", f"{s['missing']} / {s['kernel_records_lost']}",
         "0 / 0", "PASS" if s["missing"] == 0 and s["kernel_records_lost"] == 0 else "MISS"),
        ("kernel -> subscriber, first connect to last event", f"{s['events_per_second']:.0f} denials/s",
         f">= {TARGET_RATE}", "PASS" if rate_met else "MISS"),
        ("agent CPU per refusal it carried (all threads: decode, fold, spool, gRPC)", f"{s['agent_cpu_us_per_refusal']:.1f} us",
         "", ""),
        ("  so one core of agent carries", f"{s['agent_capacity_per_core']:.0f} refusals/s", "", ""),
        (f"denied connect -> event at subscriber p50 ({s['latency_samples']} samples)",
         f"{s['latency_ms_p50']:.2f} ms", "", ""),
        ("denied connect -> event at subscriber p99", f"{s['latency_ms_p99']:.2f} ms", f"< {TARGET_P99_MS:g} ms",
         "PASS" if s["latency_ms_p99"] < TARGET_P99_MS and not s["latency_missing"] else "MISS"),
        ("  max", f"{s['latency_ms_max']:.2f} ms", "", ""),
    ]
    return "\n".join(aligned(rows))


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--flooders", type=int, default=2, help="routers making denied connects (default 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long they flood (default 5)")
    parser.add_argument("--rate", type=float, default=40_000,
                        help="refusals per second all routers together aim at; 0: as fast as they can (default 40000)")
    parser.add_argument("--samples", type=int, default=300, help="latency samples (default 300)")
    parser.add_argument("--ports", type=int, default=1,
                        help="destination ports the routers go through in turn; 1 (default): all to 443, so identical "
                             "refusals fold into few events; 30000: nearly every refusal is an event of its own")
    parser.add_argument("--stream", choices=("events", "batches", "both"), default="both",
                        help="the subscriber's call: WatchEvents, WatchEventBatches, or each in turn (default both)")
    arguments = parse(parser)
    workload = unique_name("bench-api")
    results = []
    with agent_in_lab(workload_policy(workload, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443]}}"), [workload]) as (lab, agent):
        agent.start()
        for batched in {"events": [False], "batches": [True], "both": [False, True]}[arguments.stream]:
            call = "WatchEventBatches" if batched else "WatchEvents"
            progress(f"{call}: throughput: {arguments.flooders} routers for {arguments.seconds:g} s")
            throughput = measure_throughput(lab, agent, workload, arguments.flooders, arguments.seconds,
                                            arguments.rate, arguments.ports, batched)
            progress(f"{call}: latency: {arguments.samples} denied connects, one every 10 ms")
            latency = measure_latency(lab, agent, workload, arguments.samples, batched)
            results.append(summary(throughput, latency, arguments.samples))
    report(arguments.output, results, "\n\n".join(table(r) for r in results))


if __name__ == "__main__":
    main()
