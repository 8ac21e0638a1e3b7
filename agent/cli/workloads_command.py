"""warden workloads, warden ps: what the agent guards, and the processes in it."""
from __future__ import annotations

import time

import click

from agent.cli.client import EXIT_CODES_HELP, Client, Target, as_dict, echo_json, echo_table, output_option, target_options


@click.command("workloads", epilog=EXIT_CODES_HELP)
@target_options
@output_option
def workloads_command(target: Target, output: str) -> None:
    """The workloads of the policy in force: mode, violation action, state, processes, allow rules."""
    from agent.api.gen.egress_warden.v1 import agent_pb2 as pb

    with Client(target) as client:
        workloads = client.call("ListWorkloads", pb.ListWorkloadsRequest()).workloads
    if output == "json":
        echo_json([as_dict(w) for w in workloads])
        return
    echo_table(["WORKLOAD", "MODE", "ON_VIOLATION", "STATE", "PROCESSES", "ALLOW"],
               ([w.name, w.mode, w.on_violation, _state(w), w.processes, "; ".join(w.allow)] for w in workloads))


def _state(workload) -> str:
    if not workload.quarantined_since:
        return workload.state
    return f"{workload.state} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(workload.quarantined_since))}"


@click.command("ps", epilog=EXIT_CODES_HELP)
@click.argument("workload", required=False)
@target_options
@output_option
def ps_command(workload: str | None, target: Target, output: str) -> None:
    """The processes of WORKLOAD (default: every workload) with the destinations they hold
    sockets to and the bytes they sent.

    Example:  warden ps litellm
    """
    from agent.api.gen.egress_warden.v1 import agent_pb2 as pb

    with Client(target) as client:
        processes = client.call("ListProcesses", pb.ListProcessesRequest(workload=workload or "")).processes
    if output == "json":
        echo_json([as_dict(p) for p in processes])
        return
    echo_table(["WORKLOAD", "PID", "USER", "COMMAND", "BYTES_SENT", "DESTINATIONS"],
               ([p.workload, p.process.pid, p.process.uid, " ".join(p.process.cmdline) or p.process.comm, p.bytes_sent,
                 ", ".join(_destination(d) for d in p.destinations)] for p in processes))


def _destination(d) -> str:
    host = d.fqdn or (f"[{d.ip}]" if ":" in d.ip else d.ip)
    return f"{d.protocol}:{host}:{d.port} ({d.state}, {d.bytes_sent} B)"
