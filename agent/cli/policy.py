"""warden policy: check a policy file the way the agent will load it."""
from __future__ import annotations

import dataclasses
import json

import click

from agent.cli.client import EXIT_CODES_HELP, EXIT_FAILED, Client, Target, echo_json, output_option, target_options
from agent.policy import Policy, PolicyError, PolicyProblem, load_policy


@click.group()
def policy() -> None:
    """Check policy files before the agent loads them; make the agent reload its own.

    A policy says, per workload (one router deployment), which destinations
    it may reach and what happens on a violation. The format is described
    in DESIGN.md, section "Policy file"; examples/policy.yaml is a commented
    example.
    """


@policy.command()
@click.argument("file")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one line per problem on stderr; json: one object on stdout.",
)
@click.option(
    "--no-permission-check",
    is_flag=True,
    help="Skip the ownership and mode checks, to validate a draft that is not installed yet.",
)
def check(file: str, output: str, no_permission_check: bool) -> None:
    """Validate policy FILE exactly as the agent would load it.

    Reports every problem at once, each as FILE:LINE: KEY: REASON, where KEY
    is a path like workloads[0].allow[1].ports[0]. Like sshd's StrictModes,
    the file and each directory above it must be owned by root and not
    writable by group or others.

    \b
    Exit status: 0 valid, 1 invalid (or unreadable), 2 usage error.
    Example:  warden policy check /etc/egress-warden/policy.yaml
    """
    try:
        loaded = load_policy(file, check_permissions=not no_permission_check)
    except PolicyError as error:
        _report_problems(file, error.problems, output)
        raise SystemExit(1) from None
    _report_ok(loaded, output)


def _report_ok(loaded: Policy, output: str) -> None:
    if output == "json":
        click.echo(_json_report(loaded.path, loaded, []))
        return
    count = len(loaded.workloads)
    summary = ", ".join(f"{workload.name} ({workload.mode})" for workload in loaded.workloads)
    click.echo(f"OK: {loaded.path} ({count} workload{'s' if count != 1 else ''}: {summary})")
    for notice in loaded.notices:
        click.echo(f"note: {notice}")


def _report_problems(path: str, problems: list[PolicyProblem], output: str) -> None:
    if output == "json":
        click.echo(_json_report(path, None, problems))
        return
    for problem in problems:
        click.echo(str(problem), err=True)


def _json_report(path: str, loaded: Policy | None, problems: list[PolicyProblem]) -> str:
    document = {
        "ok": loaded is not None,
        "path": path,
        "workloads": [dataclasses.asdict(workload) for workload in loaded.workloads] if loaded else [],
        "problems": [dataclasses.asdict(problem) for problem in problems],
        "notices": list(loaded.notices) if loaded else [],
    }
    return json.dumps(document, indent=2)


@policy.command(epilog=EXIT_CODES_HELP)
@target_options
@output_option
def reload(target: Target, output: str) -> None:
    """Make the running agent load its policy file again (as SIGHUP does), and say how it went.

    A policy that does not validate is refused with every problem listed, and
    the policy in force stays. Check a draft first with `warden policy check`.
    """
    from agent.api.gen.egress_warden.v1 import agent_pb2 as pb

    with Client(target) as client:
        reply = client.call("ReloadPolicy", pb.ReloadPolicyRequest())
    if output == "json":
        echo_json({"ok": reply.ok, "problems": list(reply.problems), "event": json.loads(reply.event.json)})
    elif reply.ok:
        click.echo(f"reloaded: {json.loads(reply.event.detail_json)['path']} (event seq {reply.event.seq})")
    else:
        click.echo("refused; the policy in force stays:", err=True)
        for problem in reply.problems:
            click.echo(f"  {problem}", err=True)
    if not reply.ok:
        raise SystemExit(EXIT_FAILED)
