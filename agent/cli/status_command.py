"""warden status: what the agent enforces, and how its events and spool are doing."""
from __future__ import annotations

import click

from agent.cli.client import EXIT_CODES_HELP, Client, Target, as_dict, echo_json, echo_table, output_option, target_options


@click.command("status", epilog=EXIT_CODES_HELP)
@target_options
@output_option
def status_command(target: Target, output: str) -> None:
    """The agent's version, uptime, kernel features, workloads, event counts, spool and losses.

    Example:  warden status -o json | jq .spool
    """
    from agent.api.gen.egress_warden.v1 import agent_pb2 as pb

    with Client(target) as client:
        status = client.call("GetStatus", pb.GetStatusRequest())
    if output == "json":
        echo_json(as_dict(status))
        return
    spool = status.spool
    lines = [
        ("agent", f"{status.agent} (version {status.version}), up {_duration(status.uptime_seconds)}"),
        ("policy", status.policy_path),
        ("kernel", ", ".join(status.kernel_features)),
        ("spool", f"{spool.events} events, {_size(spool.bytes)}, seq {spool.oldest_seq}..{spool.newest_seq}; "
                  f"bound {_size(spool.max_bytes)} / {_duration(spool.max_age_seconds)}"),
        ("losses", f"kernel ring buffer {status.kernel_records_lost}, spool bound dropped {spool.dropped}"),
        ("events", ", ".join(f"{k} {v}" for k, v in sorted(status.event_counts.items())) or "none yet"),
    ]
    for label, value in lines:
        click.echo(f"{label:<8}{value}")
    click.echo()
    echo_table(["WORKLOAD", "MODE", "ON_VIOLATION", "STATE", "PROCESSES"],
               ([w.name, w.mode, w.on_violation, w.state, w.processes] for w in status.workloads))


def _duration(seconds: float) -> str:
    """The two largest units: 3d 4h, 2m 5s, 7s."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    shown = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return " ".join(shown[:2]) or "0s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
