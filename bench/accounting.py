"""The agent's once-a-second traffic accounting as the kernel's counter map fills up.

    python bench/accounting.py [--counters N,N,...] [--ticks N] [--kills N] [-o table|json]

The pinned LRU map `traffic` keeps a counter per (workload, process, destination) and
forgets nothing until it is full (65,536): processes come and go, provider addresses rotate,
so a long-running host fills it. Every second the agent folds the socket slots, reads the
map and turns what changed into totals, rates, budget windows and spike baselines
(KernelPrograms.traffic_changes, then TrafficWatch.tick), on a thread beside the main loop
that handles the ring buffer's verdicts. This loads the agent's programs (no agent, no
traffic: the map is written from here, 20 addresses per process), and for each size times
- the first read, when every counter is new to the agent (its start);
- a steady tick, with 1 % of the counters grown since the tick before (median of --ticks);
- a quiet tick, with nothing grown.
The workload is examples/policy.yaml's (one fqdn budget, the spike detector).

Then, as the accounting must not hold back the agent's actions, a `warden agent` in a Lab
and --kills violations of an on_violation: kill workload (bench/foundation.py's trial:
violation to the workload's last process gone), first with its counter map as it comes, then
filled to its capacity, the first trials while the agent takes in the new counters.
Target: p99 under 50 ms both ways.
"""
from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable

# first: puts tests/ and the repository root on sys.path
from common import REPO, agent_in_lab, aligned, argument_parser, parse, percentile, progress, report

from agentproc import unique_name
from foundation import TARGET_KILL_P99_MS, bench_policy, kill_trial_ms, positive
from agent.kernel import bpfsys
from agent.kernel.loader import PINNED_MAPS, TRAFFIC_KEY, TRAFFIC_VALUE, KernelPrograms, remove_pins
from agent.policy import load_policy
from agent.traffic import TrafficWatch

ADDRESSES_PER_PROCESS = 20


def counter_sizes(text: str) -> list[int]:
    limit = PINNED_MAPS["traffic"].max_entries
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: want counts separated by commas, such as 1000,10000") from None
    if not sizes or any(not 1 <= n <= limit for n in sizes):
        raise argparse.ArgumentTypeError(f"{text}: each count must be 1 to {limit} (the map's capacity)")
    return sorted(sizes)


class CounterWriter:
    """Writes counters into the pinned `traffic` map as the kernel would, counter i being
    process 1000 + i // ADDRESSES_PER_PROCESS toward one of that many addresses on 443."""

    def __init__(self, pin_dir: Path) -> None:
        self.fd = bpfsys.open_pinned(str(pin_dir / "traffic"))

    def write(self, counters: range, sent: int) -> None:
        for i in counters:
            address = bytes(10) + b"\xff\xff" + bytes([198, 18, i % ADDRESSES_PER_PROCESS, 10])
            key = TRAFFIC_KEY.pack(0, 1000 + i // ADDRESSES_PER_PROCESS, address, 443, socket.IPPROTO_TCP, 0, 0)
            bpfsys.map_update(self.fd, key, TRAFFIC_VALUE.pack(sent, sent // 1000 + 1))

    def close(self) -> None:
        os.close(self.fd)


def milliseconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1e3


def measure(size: int, ticks: int) -> dict[str, Any]:
    """A fresh program set and map of `size` counters, ticked as the agent ticks."""
    workload = load_policy(REPO / "examples" / "policy.yaml", check_permissions=False).workloads[0]
    pin_dir = Path("/sys/fs/bpf") / f"ew-bench-accounting-{secrets.token_hex(3)}"
    kernel = KernelPrograms(pin_dir=pin_dir)
    writer = CounterWriter(pin_dir)
    try:
        writer.write(range(size), 1000)
        watch, clock = TrafficWatch(), [0.0]

        def tick() -> None:
            changes = kernel.traffic_changes()
            clock[0] += 1.0
            watch.tick(changes.changed, {0: workload}, clock[0], changes.gone)

        first = milliseconds(tick)
        steady = []
        for n in range(ticks):
            writer.write(range(max(size // 100, 1)), 2000 + 1000 * n)
            steady.append(milliseconds(tick))
        quiet = milliseconds(tick)
        return {"counters": size, "first_ms": first, "steady_ms": statistics.median(steady), "quiet_ms": quiet}
    finally:
        writer.close()
        kernel.close()
        remove_pins(pin_dir)


def measure_kills(kills: int) -> dict[str, dict[str, float]]:
    """Violation to workload gone, p50 and p99, with the agent's counter map as it comes and full."""
    connect_workload, kill_workload = unique_name("bench-c"), unique_name("bench-k")
    found = {}
    with agent_in_lab(bench_policy(connect_workload, kill_workload), [connect_workload, kill_workload]) as (lab, agent):
        agent.start()
        for state in ("as it comes", "full"):
            if state == "full":
                writer = CounterWriter(agent.pin_dir)
                writer.write(range(PINNED_MAPS["traffic"].max_entries), 1000)
                writer.close()
                # No pause: the first trials fall while the agent reads and ticks over 65,536
                # new counters (within its next second).
            samples = []
            for _ in range(kills):
                samples.append(kill_trial_ms(lab, agent, kill_workload)[0])
                time.sleep(0.137)  # so the trials fall at every point of the accounting's second
            found[state] = {"p50_ms": statistics.median(samples), "p99_ms": percentile(samples, 99),
                            "max_ms": max(samples)}
            progress(f"  kills, counter map {state}: p50 {found[state]['p50_ms']:.1f} ms, "
                     f"p99 {found[state]['p99_ms']:.1f} ms")
    return found


def table(results: list[dict[str, Any]], kills: dict[str, dict[str, float]]) -> str:
    rows = [("counters", "first read", "steady tick (1 % grew)", "quiet tick")]
    rows += [(str(r["counters"]), f"{r['first_ms']:.1f} ms", f"{r['steady_ms']:.1f} ms", f"{r['quiet_ms']:.1f} ms")
             for r in results]
    kill_rows = [("counter map", "violation -> workload gone p50", "p99", "max",
                  f"target p99 < {TARGET_KILL_P99_MS:g} ms")]
    kill_rows += [(state, f"{k['p50_ms']:.1f} ms", f"{k['p99_ms']:.1f} ms", f"{k['max_ms']:.1f} ms",
                   "PASS" if k["p99_ms"] < TARGET_KILL_P99_MS else "MISS") for state, k in kills.items()]
    return "\n".join(aligned(rows) + [""] + aligned(kill_rows))


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--counters", type=counter_sizes, default=[1000, 10000, 65536],
                        help="map sizes to measure, comma-separated (default 1000,10000,65536)")
    parser.add_argument("--ticks", type=positive, default=5, help="steady ticks per size (default 5)")
    parser.add_argument("--kills", type=int, default=40, help="violations for each state of the map (default 40)")
    arguments = parse(parser)
    if arguments.kills < 2:
        parser.error("--kills must be at least 2 (a p99 needs two samples)")
    results = []
    for size in arguments.counters:
        results.append(measure(size, arguments.ticks))
        progress(f"  {size} counters: first read {results[-1]['first_ms']:.1f} ms, "
                 f"steady tick {results[-1]['steady_ms']:.1f} ms, quiet tick {results[-1]['quiet_ms']:.1f} ms")
    progress(f"kills: {arguments.kills} violations with the counter map as it comes, then as many with it full")
    kills = measure_kills(arguments.kills)
    report(arguments.output, {"sizes": results, "kills": kills}, table(results, kills))


if __name__ == "__main__":
    main()
