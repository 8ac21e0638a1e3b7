"""Foundation benchmark: what the agent costs and how fast it acts, measured in one run.

    python bench/foundation.py [--sets N] [--blocks N] [--block-size N] [--control] [--kills N] [-o table|json]

1. agent start to enforcing: wall time from spawning `warden agent` to its
   agent_started event, and the agent's own startup_seconds (median of 3 starts)
2. the agent's RSS once started, and the CPU it spends while idle
3. TCP connect rate of a process in ROUTER to a server in NET under `warden run`, against
   the same client in a cgroup as deep with nothing attached (baseline_cgroup), and in the
   root cgroup: sets of clients take turns in short blocks, pinned to one CPU and the server
   to the other (see measure_connect_rates), and the agent's CPU meanwhile
4. time from a violation of an on_violation: kill workload to its last process gone
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO, TypeVar

# first: puts tests/ and the repository root on sys.path
from common import agent_in_lab, aligned, argument_parser, parse, percentile, progress, report

import psutil
from agent import cgroups
from agentproc import AgentProcess, unique_name
from agent.kernel.loader import detach_all
from agent.lab.network import Lab

T = TypeVar("T")

PROVIDER_PORT = 443
ATTACKER_PORT = 443
STARTS = 3
CHILDREN_PER_VIOLATOR = 3
RSS_SETTLE_SECONDS = 1.0
IDLE_CPU_SECONDS = 5.0
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

# For each line N on stdin: N connects, each closed with a reset (SO_LINGER 0: no TIME_WAIT,
# so hundreds of thousands of connects never run out of ephemeral ports), then one JSON line
# with their wall and CPU seconds. thread_time() is the scheduler's exact count; reading
# /proc/thread-self/schedstat instead gives the count as of the last tick (4 ms steps here).
CONNECT_CLIENT = """
import json, socket, struct, sys, time
host, port = sys.argv[1], int(sys.argv[2])
reset_on_close = struct.pack("ii", 1, 0)
cgroup = next(line[3:].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
print(json.dumps({"cgroup": cgroup}), flush=True)
for line in sys.stdin:
    started, cpu_started = time.perf_counter(), time.thread_time()
    for _ in range(int(line)):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset_on_close)
            s.connect((host, port))
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.thread_time() - cpu_started}),
          flush=True)
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


# The connect clients: "without" in a cgroup of its own at the workload cgroup's depth with
# nothing attached (baseline_cgroup), "with" under `warden run`, "root" in the root cgroup.
SIDES = ("without", "with", "root")


@dataclass
class ConnectComparison:
    """Wall and CPU seconds of each block of connects, by side (SIDES); block i of each side
    ran right before or after block i of the others, and each `blocks_per_set` blocks came
    from a fresh set of client processes, one a side."""

    block_size: int
    blocks_per_set: int
    blocks: dict[str, list[dict[str, float]]]

    def ratio(self, measure: str, side: str = "with", first: int = 0, last: int | None = None,
              base: str = "without") -> float:
        """Connects per `measure` ("seconds" or "cpu_seconds") of `side` over `base`, blocks
        first..last together."""
        return (sum(b[measure] for b in self.blocks[base][first:last]) /
                sum(b[measure] for b in self.blocks[side][first:last]))

    def rate(self, side: str) -> float:
        return self.block_size * len(self.blocks[side]) / sum(b["seconds"] for b in self.blocks[side])

    def ratio_against_root_cgroup(self) -> float:
        return self.ratio("seconds", base="root")

    def block_ratios(self) -> list[float]:
        return [w["seconds"] / a["seconds"] for w, a in zip(self.blocks["without"], self.blocks["with"])]

    def client_set_ratios(self) -> list[float]:
        n = self.blocks_per_set
        return [self.ratio("seconds", "with", start, start + n) for start in range(0, len(self.blocks["with"]), n)]

    def summary(self) -> dict[str, float]:
        blocks, sets = self.block_ratios(), self.client_set_ratios()
        return {
            "rate_without_agent": self.rate("without"),
            "rate_with_agent": self.rate("with"),
            "rate_in_root_cgroup": self.rate("root"),
            "rate_ratio": self.ratio("seconds"),
            "rate_ratio_cpu": self.ratio("cpu_seconds"),
            "rate_ratio_blocks_p10": percentile(blocks, 10),
            "rate_ratio_blocks_median": statistics.median(blocks),
            "rate_ratio_blocks_p90": percentile(blocks, 90),
            "rate_ratio_client_sets_min": min(sets),
            "rate_ratio_client_sets_max": max(sets),
            "rate_ratio_against_root_cgroup": self.ratio_against_root_cgroup(),
            "root_cgroup_against_without": self.ratio("seconds", "root"),
        }


@dataclass
class Results:
    startup_wall_seconds: list[float]
    startup_own_seconds: list[float]
    rss_mib: float
    idle_cpu_ms_per_second: float
    connecting_cpu_ms_per_second: float  # while the connect clients run: folding and accounting their sockets
    connects: ConnectComparison
    control: ConnectComparison | None  # "with" outside the workload too (--control)
    kill_ms: list[float]
    agent_kill_ms: list[float]

    def summary(self) -> dict[str, Any]:
        return {
            "startup_wall_seconds_median": statistics.median(self.startup_wall_seconds),
            "startup_own_seconds_median": statistics.median(self.startup_own_seconds),
            "rss_mib": self.rss_mib,
            "idle_cpu_ms_per_second": self.idle_cpu_ms_per_second,
            "connecting_cpu_ms_per_second": self.connecting_cpu_ms_per_second,
            **self.connects.summary(),
            **({"control_rate_ratio": self.control.ratio("seconds")} if self.control else {}),
            "kill_ms_p50": statistics.median(self.kill_ms),
            "kill_ms_p99": percentile(self.kill_ms, 99),
            "agent_kill_ms_p50": statistics.median(self.agent_kill_ms),
            "agent_kill_ms_p99": percentile(self.agent_kill_ms, 99),
        }


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


def agent_cpu_seconds(agent: AgentProcess) -> float:
    """The agent's user and system CPU so far, all its threads (its programs' run time is
    charged to the processes they run for, not to the agent)."""
    times = psutil.Process(agent.process.pid).cpu_times()
    return times.user + times.system


def agent_cpu_during(agent: AgentProcess, work: Callable[[], T]) -> tuple[T, float]:
    """What work() returns, and the agent's CPU meanwhile in ms per second of wall time."""
    cpu_before, started = agent_cpu_seconds(agent), time.monotonic()
    result = work()
    return result, (agent_cpu_seconds(agent) - cpu_before) * 1000 / (time.monotonic() - started)


def idle_cpu_ms_per_second(agent: AgentProcess, seconds: float = IDLE_CPU_SECONDS) -> float:
    """CPU the agent spends guarding workloads that do nothing (its once-a-second accounting)."""
    return agent_cpu_during(agent, lambda: time.sleep(seconds))[1]


def client_and_server_cpus() -> tuple[int | None, int | None]:
    """Two CPUs, one for the connect clients and one for the server, so that they never queue
    behind each other; none on a machine with one."""
    available = sorted(os.sched_getaffinity(0))
    return (available[0], available[1]) if len(available) >= 2 else (None, None)


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def start_accept_server(lab: Lab, cpu: int | None = None) -> None:
    server = lab.run_in_net(pinned(cpu, [sys.executable, "-c", ACCEPT_SERVER, Lab.PROVIDER4, str(PROVIDER_PORT)]),
                            stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError(f"accept server did not start (exit {server.wait()})")


@contextmanager
def cgroup_dir(parent: Path, name: str) -> Iterator[Path]:
    """A new cgroup, removed after (with whatever was attached to it)."""
    path = parent / name
    path.mkdir()
    try:
        yield path
    finally:
        detach_all(path)
        path.rmdir()


@contextmanager
def baseline_cgroup() -> Iterator[Path]:
    """A cgroup for the clients without the agent, as deep as a workload's
    (/egress-warden/NAME) and with nothing attached. A router is never in the root cgroup of a
    host: systemd starts it in system.slice/NAME.service, and match.systemd_unit adopts that
    very cgroup. Here, where the bench runs in the root cgroup, a client below the root makes
    0-0.6 % fewer connects than one in it (measured, cause not pinned down), a cost of being in
    a cgroup, not of the agent. The "root" side keeps that figure in view."""
    with cgroup_dir(cgroups.cgroup2_root(), f"ew-bench-baseline-{secrets.token_hex(3)}") as parent, \
            cgroup_dir(parent, "router") as cgroup:
        yield cgroup


def in_cgroup(cgroup: Path, argv: list[str]) -> list[str]:
    """argv, moving itself into `cgroup` before it execs."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]


def cgroup_name(cgroup: Path) -> str:
    """As /proc/PID/cgroup names it."""
    return "/" + str(cgroup.relative_to(cgroups.cgroup2_root())).removeprefix(".")


def turn_order(sides: tuple[str, ...], turn: int) -> tuple[str, ...]:
    """Each side first in its turn, and every other turn reversed: over 2 x len(sides) turns
    (all orders of three sides), none is favoured by whom it follows."""
    k = turn % len(sides)
    order = sides[k:] + sides[:k]
    return order if turn % 2 == 0 else order[::-1]


class ConnectClient:
    """A CONNECT_CLIENT process in ROUTER, checked to run in the cgroup it was meant to."""

    def __init__(self, lab: Lab, argv: list[str], expected_cgroup: str) -> None:
        self.process = lab.run_in_router(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        cgroup = self._reply()["cgroup"]
        if cgroup != expected_cgroup:
            raise RuntimeError(f"connect client runs in {cgroup}, not in {expected_cgroup}")

    def connect(self, count: int) -> dict[str, float]:
        """Wall and CPU seconds of `count` connects."""
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"connect client exited with {self.process.wait()}")
        return json.loads(line)


def measure_connect_rates(lab: Lab, agent: AgentProcess, workload: str, baseline: Path, sets: int, blocks: int,
                          block_size: int, control: bool = False) -> ConnectComparison:
    """A client for each of SIDES connects in turns of `block_size` (turn_order). This
    machine's speed drifts by tens of percent within seconds (other virtual machines share its
    host), and blocks of a few milliseconds each see the same drift on every side, where runs
    of seconds each did not. Two identical clients still differ by up to 2 % here (measured: it
    goes with the process, its memory layout most likely), so after `blocks` turns a fresh set
    of clients takes over, `sets` sets in all. `baseline`: the "without" client's cgroup
    (baseline_cgroup). `control`: the "with" client runs there too, so its ratio shows what the
    measurement itself is worth. The server (start_accept_server) must be running."""
    client_cpu, _ = client_and_server_cpus()
    argv = [sys.executable, "-c", CONNECT_CLIENT, Lab.PROVIDER4, str(PROVIDER_PORT)]
    root = cgroups.cgroup2_root()
    in_place = lambda cgroup: ConnectClient(  # noqa: E731
        lab, pinned(client_cpu, in_cgroup(cgroup, argv)), cgroup_name(cgroup))
    starts = {"without": lambda: in_place(baseline),
              "with": (lambda: in_place(baseline)) if control else lambda: ConnectClient(
                  lab, pinned(client_cpu, agent.run_cmd(workload, argv)), f"/{cgroups.PARENT}/{workload}"),
              "root": lambda: in_place(root)}
    samples: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for client_set in range(sets):
        clients = {}
        try:
            for side in turn_order(SIDES, client_set):
                clients[side] = starts[side]()
                clients[side].connect(block_size)  # warm-up: first connects, caches
            for block in range(blocks):
                for side in turn_order(SIDES, block):
                    samples[side].append(clients[side].connect(block_size))
        finally:
            for client in clients.values():
                client.close()
        so_far = ConnectComparison(block_size, blocks, samples)
        progress(f"  client set {client_set + 1}/{sets}: with/without {so_far.client_set_ratios()[-1]:.3f}, "
                 f"all so far {so_far.ratio('seconds'):.3f} (against the root cgroup "
                 f"{so_far.ratio_against_root_cgroup():.3f})")
    return ConnectComparison(block_size, blocks, samples)


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


def run_benchmark(lab: Lab, agent: AgentProcess, connect_workload: str, kill_workload: str, baseline: Path,
                  arguments: argparse.Namespace) -> Results:
    progress(f"starting the agent {STARTS} times")
    wall, own = measure_startups(agent, STARTS)
    rss = settled_rss_mib(agent)
    idle_cpu = idle_cpu_ms_per_second(agent)
    progress(f"connect rate: {arguments.sets} client sets x {arguments.blocks} blocks of {arguments.block_size} "
             "connects each side, in turns")
    start_accept_server(lab, client_and_server_cpus()[1])
    connects, connecting_cpu = agent_cpu_during(agent, lambda: measure_connect_rates(
        lab, agent, connect_workload, baseline, arguments.sets, arguments.blocks, arguments.block_size))
    control = None
    if arguments.control:
        progress("control: the same with the \"with\" client outside the workload too")
        control = measure_connect_rates(lab, agent, connect_workload, baseline, arguments.sets, arguments.blocks,
                                        arguments.block_size, control=True)
    progress(f"kill: {arguments.kills} violations")
    kill_ms, agent_kill_ms = zip(*(kill_trial_ms(lab, agent, kill_workload) for _ in range(arguments.kills)))
    return Results(wall, own, rss, idle_cpu, connecting_cpu, connects, control, list(kill_ms), list(agent_kill_ms))


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def table_rows(results: Results) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, verdict) rows."""
    s = results.summary()
    trials, kills = len(results.kill_ms), len(results.agent_kill_ms)
    c = results.connects
    blocks = f"{len(c.blocks['with']) // c.blocks_per_set} sets x {c.blocks_per_set} x {c.block_size} connects a side"
    return [
        (f"agent spawn -> agent_started (wall, median of {STARTS})", f"{s['startup_wall_seconds_median']:.3f} s", "", ""),
        (f"agent startup_seconds (own, median of {STARTS})", f"{s['startup_own_seconds_median']:.3f} s", "", ""),
        ("agent RSS after start", f"{s['rss_mib']:.1f} MiB", "", ""),
        (f"agent CPU while its workloads idle ({IDLE_CPU_SECONDS:g} s)", f"{s['idle_cpu_ms_per_second']:.1f} ms/s", "", ""),
        ("agent CPU while the connect clients run", f"{s['connecting_cpu_ms_per_second']:.1f} ms/s", "", ""),
        (f"connect rate without agent ({blocks})", f"{s['rate_without_agent']:.0f} /s", "", ""),
        ("connect rate with agent", f"{s['rate_with_agent']:.0f} /s", "", ""),
        ("connect rate in the root cgroup", f"{s['rate_in_root_cgroup']:.0f} /s", "", ""),
        ("connect rate ratio with/without (all blocks)", f"{s['rate_ratio']:.3f}", f">= {TARGET_RATE_RATIO}",
         verdict(ratio_met(s))),
        ("  the same by the client's CPU time", f"{s['rate_ratio_cpu']:.3f}", "", ""),
        ("  blocks: p10 / median / p90", f"{s['rate_ratio_blocks_p10']:.3f} / {s['rate_ratio_blocks_median']:.3f} / "
         f"{s['rate_ratio_blocks_p90']:.3f}", "", ""),
        ("  client sets: lowest / highest", f"{s['rate_ratio_client_sets_min']:.3f} / "
         f"{s['rate_ratio_client_sets_max']:.3f}", "", ""),
        ("  with agent against the root cgroup", f"{s['rate_ratio_against_root_cgroup']:.3f}", "", ""),
        ("  root cgroup against without", f"{s['root_cgroup_against_without']:.3f}", "", ""),
        *([("  control: \"with\" outside the workload too", f"{s['control_rate_ratio']:.3f}", "", "")]
          if results.control else []),
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
    add_connect_arguments(parser)
    parser.add_argument("--control", action="store_true",
                        help="also measure with the \"with\" client outside the workload: what the method itself is worth")
    parser.add_argument("--kills", type=int, default=50, help="violations of the kill workload (default 50)")
    arguments = parse(parser)
    if arguments.kills < 2:
        parser.error("--kills must be at least 2 (a p99 needs two samples)")
    return arguments


def add_connect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sets", type=positive, default=8,
                        help="fresh sets of connect clients (one without the agent, one with it, one in the root "
                             "cgroup), one set after the other (default 8)")
    parser.add_argument("--blocks", type=positive, default=100,
                        help="blocks of connects each client of a set makes, taking turns (default 100)")
    parser.add_argument("--block-size", type=positive, default=200, help="connects per block (default 200)")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def main() -> None:
    arguments = parse_arguments()
    connect_workload, kill_workload = unique_name("bench-c"), unique_name("bench-k")
    workloads = [connect_workload, kill_workload]
    with agent_in_lab(bench_policy(connect_workload, kill_workload), workloads) as (lab, agent), \
            baseline_cgroup() as baseline:
        results = run_benchmark(lab, agent, connect_workload, kill_workload, baseline, arguments)
    report(arguments.output, {"samples": asdict(results), "summary": results.summary()}, table(results))


if __name__ == "__main__":
    main()
