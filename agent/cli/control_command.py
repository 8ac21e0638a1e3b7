"""warden quarantine / release / kill: an operator's action on a workload, through the agent."""
from __future__ import annotations

import json

import click

from agent.cli.client import EXIT_CODES_HELP, Client, Target, echo_json, output_option, target_options


def _action(method: str, verb: str, summary: str):
    @click.command(verb, epilog=EXIT_CODES_HELP, help=summary)
    @click.argument("workload")
    @target_options
    @output_option
    def command(workload: str, target: Target, output: str) -> None:
        from agent.api.gen.egress_warden.v1 import agent_pb2 as pb

        with Client(target) as client:
            event = client.call(method, pb.WorkloadRequest(workload=workload)).event
        if output == "json":
            echo_json(json.loads(event.json))
            return
        click.echo(f"{event.kind} {workload} (event seq {event.seq}): {_summary(json.loads(event.detail_json))}")

    return command


def _summary(detail: dict) -> str:
    shown = {k: v for k, v in detail.items() if k != "evidence"}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "done"


quarantine_command = _action("Quarantine", "quarantine", """Quarantine WORKLOAD: deny all its egress in the kernel
at once, freeze its processes, record evidence (an action_quarantine event). Undo with `warden release`.""")
release_command = _action("Release", "release", """Release WORKLOAD from quarantine: its policy applies again
and its processes are thawed.""")
kill_command = _action("Kill", "kill", """Kill every process of WORKLOAD (cgroup.kill); the workload stays
guarded for whatever starts in it next.""")
