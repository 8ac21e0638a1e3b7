"""DNS proxy benchmark: what the in-path proxy adds to a lookup, and how many it answers.

    python bench/dns.py [--queries N] [--seconds S] [-o table|json]

1. lookup latency of an allowed name from a process in ROUTER: through the agent's proxy
   (under `warden run`, so the kernel redirects it) against the same dnsmasq asked directly
   (the same client outside any workload); interleaved rounds, median and p99, added time
   and ratio
2. queries per second the proxy sustains: one client keeping a window of queries in flight
   for S seconds (the same client against dnsmasq directly, for reference)

dnsmasq runs in the Lab's NET namespace (agent/lab/dns_server.py).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

# first: puts tests/ and the repository root on sys.path
from common import agent_in_lab, argument_parser, parse, report

from agentproc import AgentProcess, unique_name
from agent.lab.dns_server import DnsServer
from agent.lab.network import Lab

RESOLVER = "198.18.5.53"
NAME = "api.provider.test"
ROUNDS = 5
WINDOW = 32
TARGET_ADDED_MEDIAN_MS = 1.0
TARGET_QPS = 5000

CLIENT = r"""
import json, socket, struct, sys, time
mode, server, amount = sys.argv[1], sys.argv[2], float(sys.argv[3])
labels = b"".join(bytes([len(l)]) + l.encode() for l in sys.argv[4].split("."))
def query(ident):
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(2)
if mode == "latency":
    samples = []
    for i in range(int(amount)):
        started = time.perf_counter_ns()
        s.send(query(i & 0xFFFF))
        while struct.unpack("!H", s.recv(4096)[:2])[0] != i & 0xFFFF:
            pass
        samples.append((time.perf_counter_ns() - started) / 1e6)
    print(json.dumps(samples))
else:
    answered = sent = 0
    s.settimeout(0.5)
    deadline = time.monotonic() + amount
    for _ in range(WINDOW):
        s.send(query(sent & 0xFFFF)); sent += 1
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            s.recv(4096)
            answered += 1
        except socket.timeout:
            for _ in range(WINDOW - (sent - answered)):  # refill what was lost
                s.send(query(sent & 0xFFFF)); sent += 1
            continue
        s.send(query(sent & 0xFFFF)); sent += 1
    print(json.dumps({"answered": answered, "sent": sent, "seconds": time.monotonic() - started}))
""".replace("WINDOW", str(WINDOW))


def percentile(samples: list[float], pct: int) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def policy(workload: str) -> str:
    return f"""
    version: 1
    workloads:
      - name: {workload}
        allow:
          - fqdn: {NAME}
            ports: [443]
        dns:
          upstream: [{RESOLVER}]
    """


def client(lab: Lab, prefix: list[str], mode: str, amount: float) -> Any:
    argv = [*prefix, sys.executable, "-c", CLIENT, mode, RESOLVER, str(amount), NAME]
    done = subprocess.run(lab.router_cmd(argv), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(lab: Lab, agent: AgentProcess, workload: str, queries: int, seconds: float) -> dict[str, Any]:
    proxied_prefix = agent.run_cmd(workload, [])
    latency: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(ROUNDS):
        latency["direct"] += client(lab, [], "latency", queries)
        latency["proxy"] += client(lab, proxied_prefix, "latency", queries)
    rates = {name: client(lab, prefix, "rate", seconds) for name, prefix in (("direct", []), ("proxy", proxied_prefix))}
    summary = {name: {"median_ms": statistics.median(s), "p99_ms": percentile(s, 99), "samples": len(s)}
               for name, s in latency.items()}
    return {
        "latency": summary,
        "added_median_ms": summary["proxy"]["median_ms"] - summary["direct"]["median_ms"],
        "added_p99_ms": summary["proxy"]["p99_ms"] - summary["direct"]["p99_ms"],
        "median_ratio": summary["proxy"]["median_ms"] / summary["direct"]["median_ms"],
        "p99_ratio": summary["proxy"]["p99_ms"] / summary["direct"]["p99_ms"],
        "qps": {name: r["answered"] / r["seconds"] for name, r in rates.items()},
        "unanswered": {name: r["sent"] - r["answered"] for name, r in rates.items()},
        "window": WINDOW,
    }


def table(results: dict[str, Any]) -> str:
    lat = results["latency"]
    met_latency = results["added_median_ms"] < TARGET_ADDED_MEDIAN_MS
    met_qps = results["qps"]["proxy"] >= TARGET_QPS
    rows = [
        ("lookup median direct / proxy", f"{lat['direct']['median_ms']:.3f} / {lat['proxy']['median_ms']:.3f} ms",
         f"added {results['added_median_ms']:.3f} ms, ratio {results['median_ratio']:.2f}",
         f"< {TARGET_ADDED_MEDIAN_MS} ms added: {'met' if met_latency else 'MISSED'}"),
        ("lookup p99 direct / proxy", f"{lat['direct']['p99_ms']:.3f} / {lat['proxy']['p99_ms']:.3f} ms",
         f"added {results['added_p99_ms']:.3f} ms, ratio {results['p99_ratio']:.2f}", ""),
        ("queries/s direct / proxy", f"{results['qps']['direct']:.0f} / {results['qps']['proxy']:.0f}",
         f"window {results['window']}, unanswered {results['unanswered']['direct']} / {results['unanswered']['proxy']}",
         f">= {TARGET_QPS}: {'met' if met_qps else 'MISSED'}"),
    ]
    return "\n".join(" | ".join(row) for row in rows)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--queries", type=int, default=1000, help="sequential lookups per client round (default 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of the throughput run (default 5)")
    args = parse(parser)
    workload = unique_name("bdns")
    with agent_in_lab(policy(workload), [workload]) as (lab, agent):
        DnsServer(lab, RESOLVER, agent.tmp, hosts={NAME: Lab.PROVIDER4}, ttl=60, cache=1000, log_queries=False)
        agent.start()
        results = measure(lab, agent, workload, args.queries, args.seconds)
    report(args.output, results, table(results))


if __name__ == "__main__":
    main()
