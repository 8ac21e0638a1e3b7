"""Counting and backstop overhead: bulk TCP and connect rate, with the agent against without.

    python bench/traffic.py [--rounds N] [--bytes SIZE] [--sets N] [--blocks N] [--block-size N] [-o table|json]

Both are measured in one run, interleaved, so a drift of this shared machine favours
neither side:
1. bulk TCP: iperf3 from ROUTER to an iperf3 server in NET over the Lab's veth pair, pinned
   to one CPU and the server to the other, in many short rounds of --bytes each (without/with,
   then with/without, ...; this machine's speed drifts within seconds), sender throughput by
   wall time and per
   second of the sender's CPU; under `warden run` every packet passes the counting backstop.
   Each ratio two ways: median(with) / median(without), and the median of the rounds' ratios;
2. connect rate: bench/foundation.py's measurement (sets of clients taking turns in short
   blocks), by wall time and by the client's own CPU time.
The runs without the agent are in a cgroup as deep as the workload's, with nothing attached
(foundation.baseline_cgroup says why).
Target >= 0.97.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

# first: puts tests/ and the repository root on sys.path
from common import agent_in_lab, argument_parser, parse, progress, report

from agentproc import AgentProcess, unique_name
from foundation import (PROVIDER_PORT, add_connect_arguments, baseline_cgroup, client_and_server_cpus, in_cgroup,
                        measure_connect_rates, pinned, positive, start_accept_server)
from agent.lab.network import Lab

IPERF_PORT = 5201
TARGET_RATIO = 0.97
Pair = dict[str, list[float]]


def bench_policy(workload: str) -> str:
    return f"""
    version: 1
    workloads:
      - name: {workload}
        on_violation: deny
        allow:
          - cidr: {Lab.PROVIDER4}/32
            ports: [{PROVIDER_PORT}, {IPERF_PORT}]
            protocol: tcp
    """


def iperf_measures(lab: Lab, argv: list[str]) -> dict[str, float]:
    """Sender throughput, by wall time and per second of the sender's CPU (iperf3's own
    getrusage figure: user + system)."""
    client = lab.run_in_router(argv, stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=120)
    if client.returncode != 0:
        raise RuntimeError(f"iperf3 failed (exit {client.returncode}): {out[-2000:]}")
    end = json.loads(out)["end"]
    gbit = end["sum_sent"]["bits_per_second"] / 1e9
    cpu_share = end["cpu_utilization_percent"]["host_total"] / 100
    return {"bulk_gbit_per_second": gbit, "bulk_gbit_per_cpu_second": gbit / max(cpu_share, 1e-9)}


def interleaved(runs: dict[str, Callable[[], dict[str, float]]], rounds: int, label: str) -> dict[str, Pair]:
    """measure name -> {"without": [...], "with": [...]}; each run returns several measures."""
    results: dict[str, Pair] = {}
    for round_number in range(rounds):
        order = ("without", "with") if round_number % 2 == 0 else ("with", "without")
        for side in order:
            for measure, value in runs[side]().items():
                results.setdefault(measure, {"without": [], "with": []})[side].append(value)
        progress(f"  {label} round {round_number + 1}: " + "; ".join(
            f"{m} {v['without'][-1]:.4g} -> {v['with'][-1]:.4g}" for m, v in results.items()))
    return results


def ratios(pair: Pair) -> dict[str, float]:
    return {"ratio_of_medians": statistics.median(pair["with"]) / statistics.median(pair["without"]),
            "median_of_round_ratios": statistics.median(w / o for w, o in zip(pair["with"], pair["without"]))}


def run(lab: Lab, agent: AgentProcess, workload: str, baseline: Path, arguments) -> dict[str, Any]:
    agent.start()
    client_cpu, server_cpu = client_and_server_cpus()
    lab.run_in_net(pinned(server_cpu, ["iperf3", "-s", "-B", Lab.PROVIDER4, "-p", str(IPERF_PORT)]),
                   stdout=subprocess.DEVNULL)
    iperf = ["iperf3", "-c", Lab.PROVIDER4, "-p", str(IPERF_PORT), "-n", arguments.bytes, "-J"]
    bulk = interleaved({"without": lambda: iperf_measures(lab, pinned(client_cpu, in_cgroup(baseline, iperf))),
                        "with": lambda: iperf_measures(lab, pinned(client_cpu, agent.run_cmd(workload, iperf)))},
                       arguments.rounds, "bulk TCP")
    start_accept_server(lab, server_cpu)
    connects = measure_connect_rates(lab, agent, workload, baseline, arguments.sets, arguments.blocks,
                                     arguments.block_size)
    return {"bulk": {measure: {"samples": pair, **ratios(pair)} for measure, pair in bulk.items()},
            "connect": {"samples": connects.blocks, **connects.summary()}}


UNITS = {"bulk_gbit_per_second": "Gbit/s", "bulk_gbit_per_cpu_second": "Gbit/CPU s"}


def table(result: dict[str, Any]) -> str:
    rows = []
    for measure, found in result["bulk"].items():
        pair = found["samples"]
        rows += [(f"{measure} without agent (median)", f"{statistics.median(pair['without']):.4g} {UNITS[measure]}"),
                 (f"{measure} with agent (median)", f"{statistics.median(pair['with']):.4g} {UNITS[measure]}"),
                 (f"{measure} ratio: of medians / median of rounds",
                  f"{found['ratio_of_medians']:.3f} / {found['median_of_round_ratios']:.3f}  (target >= {TARGET_RATIO})")]
    c = result["connect"]
    blocks = len(c["samples"]["with"])
    rows += [(f"connects per second without / with agent ({blocks} blocks each)",
              f"{c['rate_without_agent']:.0f} / {c['rate_with_agent']:.0f} /s"),
             ("connect rate ratio: wall / client CPU (all blocks)",
              f"{c['rate_ratio']:.3f} / {c['rate_ratio_cpu']:.3f}  (target >= {TARGET_RATIO})"),
             ("connect rate ratio, blocks: p10 / median / p90",
              f"{c['rate_ratio_blocks_p10']:.3f} / {c['rate_ratio_blocks_median']:.3f} / {c['rate_ratio_blocks_p90']:.3f}"),
             ("connect rate ratio, client sets: lowest / highest",
              f"{c['rate_ratio_client_sets_min']:.3f} / {c['rate_ratio_client_sets_max']:.3f}"),
             ("connect rate ratio against the root cgroup",
              f"{c['rate_ratio_against_root_cgroup']:.3f}")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rounds", type=positive, default=41, help="interleaved iperf3 rounds (default 41)")
    parser.add_argument("--bytes", default="1G", help="bytes per iperf3 run, iperf3's K/M/G suffixes (default 1G)")
    add_connect_arguments(parser)
    arguments = parse(parser)
    if shutil.which("iperf3") is None:
        parser.error("iperf3 is not installed: ./scripts/setup.sh (as root) installs it (Debian package iperf3)")
    workload = unique_name("bench-t")
    with agent_in_lab(bench_policy(workload), [workload]) as (lab, agent), baseline_cgroup() as baseline:
        result = run(lab, agent, workload, baseline, arguments)
    report(arguments.output, result, table(result))


if __name__ == "__main__":
    main()
