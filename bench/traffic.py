"""Counting and backstop overhead: bulk TCP and connect rate, with the agent against without.

    python bench/traffic.py [--rounds N] [--connects N] [--seconds S] [-o table|json]

Both are measured in one run, in interleaved rounds (without/with, then with/without, ...),
so a drift of this shared machine favours neither side:
1. bulk TCP: iperf3 from ROUTER to an iperf3 server in NET over the Lab's veth pair, sender
   throughput; under `warden run` every packet passes the counting backstop;
2. connect rate: the connect client of bench/foundation.py (connect + reset close).
The ratio is the median of with-agent results over the median of without. Target >= 0.97.
A measurement, not a test: it exits 0 whether targets are met or not.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench"), str(REPO)]

from agent import cgroups  # noqa: E402
from agentproc import AgentProcess, unique_name  # noqa: E402
from foundation import CONNECT_CLIENT, PROVIDER_PORT, client_rate, own_cgroup, progress, start_accept_server  # noqa: E402
from netlab import Lab  # noqa: E402

IPERF_PORT = 5201
TARGET_RATIO = 0.97


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


def iperf_bits_per_second(lab: Lab, argv: list[str]) -> float:
    client = lab.run_in_router(argv, stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=120)
    if client.returncode != 0:
        raise RuntimeError(f"iperf3 failed (exit {client.returncode}): {out[-2000:]}")
    return json.loads(out)["end"]["sum_sent"]["bits_per_second"]


def interleaved(runs: dict[str, Callable[[], float]], rounds: int, label: str, unit: str) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"without": [], "with": []}
    for round_number in range(rounds):
        order = ("without", "with") if round_number % 2 == 0 else ("with", "without")
        for name in order:
            results[name].append(runs[name]())
        progress(f"  {label} round {round_number + 1}: without {results['without'][-1]:.4g} {unit}, "
                 f"with {results['with'][-1]:.4g} {unit}")
    return results


def ratio(results: dict[str, list[float]]) -> float:
    return statistics.median(results["with"]) / statistics.median(results["without"])


def run(lab: Lab, agent: AgentProcess, workload: str, rounds: int, connects: int, seconds: float) -> dict[str, Any]:
    agent.start()
    inside = f"/{cgroups.PARENT}/{workload}"
    lab.run_in_net(["iperf3", "-s", "-B", Lab.PROVIDER4, "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
    start_accept_server(lab)
    iperf = ["iperf3", "-c", Lab.PROVIDER4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    bulk = interleaved({"without": lambda: iperf_bits_per_second(lab, iperf) / 1e9,
                        "with": lambda: iperf_bits_per_second(lab, agent.run_cmd(workload, iperf)) / 1e9},
                       rounds, "bulk TCP", "Gbit/s")
    client = [sys.executable, "-c", CONNECT_CLIENT, Lab.PROVIDER4, str(PROVIDER_PORT), str(connects)]
    rate = interleaved({"without": lambda: client_rate(lab, client, connects, own_cgroup()),
                        "with": lambda: client_rate(lab, agent.run_cmd(workload, client), connects, inside)},
                       rounds, "connect", "/s")
    return {"bulk_gbit_per_second": bulk, "connects_per_second": rate,
            "bulk_ratio": ratio(bulk), "connect_ratio": ratio(rate)}


def table(result: dict[str, Any]) -> str:
    bulk, rate = result["bulk_gbit_per_second"], result["connects_per_second"]
    rows = [
        ("bulk TCP without agent (median)", f"{statistics.median(bulk['without']):.2f} Gbit/s"),
        ("bulk TCP with agent (median)", f"{statistics.median(bulk['with']):.2f} Gbit/s"),
        ("bulk TCP ratio with/without", f"{result['bulk_ratio']:.3f}  (target >= {TARGET_RATIO})"),
        ("connect rate without agent (median)", f"{statistics.median(rate['without']):.0f} /s"),
        ("connect rate with agent (median)", f"{statistics.median(rate['with']):.0f} /s"),
        ("connect rate ratio with/without", f"{result['connect_ratio']:.3f}  (target >= {TARGET_RATIO})"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of each measurement (default 9)")
    parser.add_argument("--connects", type=int, default=3000, help="connects per client run (default 3000)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per iperf3 run (default 2)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    arguments = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workload = unique_name("bench-t")
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="ew-bench-") as tmp:
        agent = AgentProcess(Path(tmp), bench_policy(workload), [workload])
        try:
            result = run(lab, agent, workload, arguments.rounds, arguments.connects, arguments.seconds)
        finally:
            agent.cleanup()
    if arguments.output == "json":
        print(json.dumps(result, indent=2))
        print(table(result), file=sys.stderr)
    else:
        print(table(result))


if __name__ == "__main__":
    main()
