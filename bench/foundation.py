"""Foundation benchmark: what the agent costs and how fast it acts, measured in one run.

    python bench/foundation.py [--connects N] [--kills N] [-o table|json]

1. agent start to enforcing: wall time from spawning `warden agent` to its
   agent_started event, and the agent's own startup_seconds (median of 3 starts)
2. the agent's RSS once started
3. TCP connect rate of a process in ROUTER to a server in NET, under `warden run`
   against the same client outside any workload (interleaved rounds, medians, ratio)
4. time from a violation of an on_violation: kill workload to its last process gone
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

# first: puts tests/ and the repository root on sys.path
from common import agent_in_lab, aligned, argument_parser, parse, percentile, progress, report

import psutil
from agent import cgroups
from agentproc import AgentProcess, unique_name
from agent.lab.network import Lab

PROVIDER_PORT = 443
ATTACKER_PORT = 443
STARTS = 3
CONNECT_ROUNDS = 5
CHILDREN_PER_VIOLATOR = 3
RSS_SETTLE_SECONDS = 1.0
KILL_TIMEOUT_SECONDS = 5.0
TARGET_RATE_RATIO = 0.97
TARGET_KILL_P99_MS = 50.0

ACCEPT_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=4096)
print("ready", flush=True)
while True:
    try:
        server.accept()[0].close()
    except ConnectionError:
        pass  # the client reset it before we got to it
"""

# Reset on close (SO_LINGER 0): no TIME_WAIT, so tens of thousands of connects never
# run out of ephemeral ports. Times only its own loop: interpreter start-up is excluded.
CONNECT_CLIENT = """
import json, socket, struct, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reset_on_close = struct.pack("ii", 1, 0)
def on_cpu_seconds():  # the scheduler's own count, in ns: exact, where process_time() is sampled per tick
    return int(open("/proc/thread-self/schedstat").read().split()[0]) / 1e9
started, cpu_started = time.perf_counter(), on_cpu_seconds()
for _ in range(count):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset_on_close)
        s.connect((host, port))
seconds, cpu_seconds = time.perf_counter() - started, on_cpu_seconds() - cpu_started
cgroup = next(line[3:].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "cgroup": cgroup}))
"""

# Prints CLOCK_MONOTONIC right before the forbidden connect; the agent then kills it.
VIOLATOR = """
import os, socket, sys, time
for _ in range(int(sys.argv[3])):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print(time.monotonic(), flush=True)
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])))
except OSError:
    pass
time.sleep(60)
"""


@dataclass
class Results:
    startup_wall_seconds: list[float]
    startup_own_seconds: list[float]
    rss_mib: float
    connects_per_round: int
    rates_without_agent: list[float]
    rates_with_agent: list[float]
    kill_ms: list[float]
    agent_kill_ms: list[float]

    def summary(self) -> dict[str, Any]:
        return {
            "startup_wall_seconds_median": statistics.median(self.startup_wall_seconds),
            "startup_own_seconds_median": statistics.median(self.startup_own_seconds),
            "rss_mib": self.rss_mib,
            "rate_without_agent_median": statistics.median(self.rates_without_agent),
            "rate_with_agent_median": statistics.median(self.rates_with_agent),
            "rate_ratio": self.rate_ratio(),
            "kill_ms_p50": statistics.median(self.kill_ms),
            "kill_ms_p99": percentile(self.kill_ms, 99),
            "agent_kill_ms_p50": statistics.median(self.agent_kill_ms),
            "agent_kill_ms_p99": percentile(self.agent_kill_ms, 99),
        }

    def rate_ratio(self) -> float:
        return statistics.median(self.rates_with_agent) / statistics.median(self.rates_without_agent)


def bench_policy(connect_workload: str, kill_workload: str) -> str:
    allow = f"""
        allow:
          - cidr: {Lab.PROVIDER4}/32
            ports: [{PROVIDER_PORT}]
            protocol: tcp"""
    return f"""
    version: 1
    workloads:
      - name: {connect_workload}
        on_violation: deny{allow}
      - name: {kill_workload}
        on_violation: kill{allow}
    """


def last_event(agent: AgentProcess, kind: str) -> dict[str, Any]:
    return [e for e in agent.events() if e["kind"] == kind][-1]


def measure_startups(agent: AgentProcess, starts: int) -> tuple[list[float], list[float]]:
    """Each start attaches afresh, as on a host the agent never ran on; the last one keeps running."""
    wall, own = [], []
    for _ in range(starts):
        agent.cleanup()
        spawned = time.time()
        agent.start()
        started = last_event(agent, "agent_started")
        wall.append(started["time"] - spawned)
        own.append(started["detail"]["startup_seconds"])
    return wall, own


def settled_rss_mib(agent: AgentProcess) -> float:
    time.sleep(RSS_SETTLE_SECONDS)
    return psutil.Process(agent.process.pid).memory_info().rss / 2**20


def start_accept_server(lab: Lab) -> None:
    server = lab.run_in_net([sys.executable, "-c", ACCEPT_SERVER, Lab.PROVIDER4, str(PROVIDER_PORT)],
                            stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError(f"accept server did not start (exit {server.wait()})")


def own_cgroup() -> str:
    """This process's cgroup v2 path, which an unguarded client inherits."""
    return next(line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::"))


def client_run(lab: Lab, argv: list[str], expected_cgroup: str) -> dict[str, Any]:
    """One connect client run's seconds (wall and CPU); checks it ran in the cgroup it was meant to."""
    client = lab.run_in_router(argv, stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=120)
    if client.returncode != 0:
        raise RuntimeError(f"connect client failed (exit {client.returncode}): {out}")
    result = json.loads(out)
    if result["cgroup"] != expected_cgroup:
        raise RuntimeError(f"connect client ran in {result['cgroup']}, not in {expected_cgroup}")
    return result


def client_rate(lab: Lab, argv: list[str], connects: int, expected_cgroup: str) -> float:
    """Connects per second of one client run."""
    return connects / client_run(lab, argv, expected_cgroup)["seconds"]


def measure_connect_rates(lab: Lab, agent: AgentProcess, workload: str, connects: int,
                          rounds: int) -> tuple[list[float], list[float]]:
    client = [sys.executable, "-c", CONNECT_CLIENT, Lab.PROVIDER4, str(PROVIDER_PORT), str(connects)]
    runs = {
        "without": lambda: client_rate(lab, client, connects, own_cgroup()),
        "with": lambda: client_rate(lab, agent.run_cmd(workload, client), connects, f"/{cgroups.PARENT}/{workload}"),
    }
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for round_number in range(rounds):
        # Alternate which goes first, so a slow drift of the machine favours neither.
        order = ("without", "with") if round_number % 2 == 0 else ("with", "without")
        for name in order:
            rates[name].append(runs[name]())
        progress(f"  round {round_number + 1}: without {rates['without'][-1]:.0f}/s, with {rates['with'][-1]:.0f}/s")
    return rates["without"], rates["with"]


def monotonic_when_unpopulated(cgroup: Path, timeout: float) -> float:
    """time.monotonic() at which the cgroup is first seen empty.

    cgroup.events wakes poll() (POLLPRI) on every change, and reading it re-arms the
    wake-up, so no change between a read and the next poll() is missed.
    """
    deadline = time.monotonic() + timeout
    events = os.open(cgroup / "cgroup.events", os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(events, select.POLLPRI | select.POLLERR)
        while b"populated 0" not in os.pread(events, 4096, 0):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{cgroup} still populated {timeout}s after the violation")
            poller.poll(remaining * 1000)
        return time.monotonic()
    finally:
        os.close(events)


def read_pre_connect_timestamp(stdout: TextIO, violator: subprocess.Popen) -> float:
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"violator printed no timestamp (exit {violator.wait()})")
    return float(line)


def kill_trial_ms(lab: Lab, agent: AgentProcess, workload: str) -> tuple[float, float]:
    """(violation to workload gone, the agent's own action_kill seconds), both in ms.

    Waits for this trial's action_kill event, so the next trial finds the agent idle.
    """
    argv = [sys.executable, "-c", VIOLATOR, Lab.ATTACKER4, str(ATTACKER_PORT), str(CHILDREN_PER_VIOLATOR)]
    events_before = len(agent.events())
    violator = lab.run_in_router(agent.run_cmd(workload, argv), stdout=subprocess.PIPE, text=True)
    with violator.stdout:
        before_connect = read_pre_connect_timestamp(violator.stdout, violator)
        gone = monotonic_when_unpopulated(agent.cgroup(workload), KILL_TIMEOUT_SECONDS)
    violator.wait(timeout=5)
    kill_event = agent.wait_for(lambda e: e["kind"] == "action_kill" and e["workload"] == workload,
                                timeout=KILL_TIMEOUT_SECONDS, after=events_before)
    return (gone - before_connect) * 1000, kill_event["detail"]["seconds"] * 1000


def run_benchmark(lab: Lab, agent: AgentProcess, connect_workload: str, kill_workload: str,
                  connects: int, kills: int) -> Results:
    progress(f"starting the agent {STARTS} times")
    wall, own = measure_startups(agent, STARTS)
    rss = settled_rss_mib(agent)
    progress(f"connect rate: {CONNECT_ROUNDS} rounds of {connects} connects, without and with the agent")
    start_accept_server(lab)
    without, with_agent = measure_connect_rates(lab, agent, connect_workload, connects, CONNECT_ROUNDS)
    progress(f"kill: {kills} violations")
    kill_ms, agent_kill_ms = zip(*(kill_trial_ms(lab, agent, kill_workload) for _ in range(kills)))
    return Results(wall, own, rss, connects, without, with_agent, list(kill_ms), list(agent_kill_ms))


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def table_rows(results: Results) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, verdict) rows."""
    s = results.summary()
    trials, kills = len(results.kill_ms), len(results.agent_kill_ms)
    return [
        (f"agent spawn -> agent_started (wall, median of {STARTS})", f"{s['startup_wall_seconds_median']:.3f} s", "", ""),
        (f"agent startup_seconds (own, median of {STARTS})", f"{s['startup_own_seconds_median']:.3f} s", "", ""),
        ("agent RSS after start", f"{s['rss_mib']:.1f} MiB", "", ""),
        (f"connect rate without agent (median of {CONNECT_ROUNDS})", f"{s['rate_without_agent_median']:.0f} /s", "", ""),
        (f"connect rate with agent (median of {CONNECT_ROUNDS})", f"{s['rate_with_agent_median']:.0f} /s", "", ""),
        ("connect rate ratio with/without", f"{s['rate_ratio']:.3f}", f">= {TARGET_RATE_RATIO}",
         verdict(ratio_met(s))),
        (f"violation -> workload gone p50 ({trials} trials)", f"{s['kill_ms_p50']:.2f} ms", "", ""),
        (f"violation -> workload gone p99 ({trials} trials)", f"{s['kill_ms_p99']:.2f} ms",
         f"< {TARGET_KILL_P99_MS:g} ms", verdict(kill_met(s))),
        (f"agent action_kill seconds p50 ({kills} kills)", f"{s['agent_kill_ms_p50']:.2f} ms", "", ""),
        (f"agent action_kill seconds p99 ({kills} kills)", f"{s['agent_kill_ms_p99']:.2f} ms", "", ""),
    ]


def ratio_met(summary: dict[str, Any]) -> bool:
    return summary["rate_ratio"] >= TARGET_RATE_RATIO


def kill_met(summary: dict[str, Any]) -> bool:
    return summary["kill_ms_p99"] < TARGET_KILL_P99_MS


def targets_line(summary: dict[str, Any]) -> str:
    return (f"targets: connect rate ratio {summary['rate_ratio']:.3f} >= {TARGET_RATE_RATIO} "
            f"{verdict(ratio_met(summary))}; kill p99 {summary['kill_ms_p99']:.2f} ms < {TARGET_KILL_P99_MS:g} ms "
            f"{verdict(kill_met(summary))}")


def table(results: Results) -> str:
    return "\n".join([*aligned(table_rows(results)), targets_line(results.summary())])


def parse_arguments() -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--connects", type=int, default=5000, help="connects per client run (default 5000)")
    parser.add_argument("--kills", type=int, default=50, help="violations of the kill workload (default 50)")
    arguments = parse(parser)
    if arguments.connects < 1 or arguments.kills < 2:
        parser.error("--connects must be at least 1 and --kills at least 2 (a p99 needs two samples)")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    connect_workload, kill_workload = unique_name("bench-c"), unique_name("bench-k")
    workloads = [connect_workload, kill_workload]
    with agent_in_lab(bench_policy(connect_workload, kill_workload), workloads) as (lab, agent):
        results = run_benchmark(lab, agent, connect_workload, kill_workload, arguments.connects, arguments.kills)
    report(arguments.output, {"samples": asdict(results), "summary": results.summary()}, table(results))


if __name__ == "__main__":
    main()
