"""What every benchmark in bench/ shares: the import path, its command line, and its output.

Importing this module puts tests/ (AgentProcess and friends) and the repository root on
sys.path, so a benchmark runs as `python bench/NAME.py` without installing anything more.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from agentproc import AgentProcess, warden_parent_removed_if_new  # noqa: E402
from agent.lab.network import Lab  # noqa: E402


def progress(message: str) -> None:
    """Progress goes to standard error, so standard output holds only the result."""
    print(message, file=sys.stderr, flush=True)


EPILOG = """\
A measurement, not a test: it exits 0 whether its targets are met or not. Its traffic
stays inside the namespaces of an agent/lab/network.py Lab and on loopback (DESIGN.md,
"Testing rules")."""


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the benchmark's docstring and EPILOG; `parse` adds -o and parses."""
    return argparse.ArgumentParser(description=doc, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds -o table|json, parses, and makes SIGTERM a SystemExit so cleanups run as on Ctrl-C."""
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="json: the JSON on standard output, the table on standard error")
    arguments = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return arguments


@contextmanager
def agent_in_lab(policy_text: str, workloads: list[str]) -> Iterator[tuple[Lab, AgentProcess]]:
    """A Lab and a (not yet started) agent in a temporary directory, both cleaned up after,
    with the egress-warden parent cgroup if the agent made it."""
    with warden_parent_removed_if_new(), Lab() as lab, tempfile.TemporaryDirectory(prefix="ew-bench-") as tmp:
        agent = AgentProcess(Path(tmp), policy_text, workloads)
        try:
            yield lab, agent
        finally:
            agent.cleanup()


def percentile(samples: list[float], pct: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as lines whose columns line up, two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def report(output: str, result: Any, table: str) -> None:
    """-o table: the table on standard output; -o json: the JSON there and the table on standard error."""
    if output == "json":
        print(json.dumps(result, indent=2))
        print(table, file=sys.stderr)
    else:
        print(table)
