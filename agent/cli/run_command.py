"""`warden run`: start a router inside its workload."""
from __future__ import annotations

import click

from agent.cgroups.launch import ESCAPE_CAPABILITIES, LaunchError, exec_in_workload


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("workload")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--user", help="Run COMMAND as this user (name from the passwd database).")
@click.option("--keep-capabilities", is_flag=True,
              help="Keep the capabilities that open a way around the agent (not recommended).")
def run_command(workload: str, command: tuple[str, ...], user: str | None, keep_capabilities: bool) -> None:
    """Run COMMAND inside WORKLOAD's cgroup, guarded from its first instruction.

    \b
    The process joins the cgroup before exec, so it never runs unguarded and holds
    no socket opened outside. Unless --keep-capabilities is given, these leave its
    bounding, inheritable and ambient sets first: {caps}.
    The agent must be running with a policy naming WORKLOAD. If WORKLOAD has fqdn
    rules, it waits until the agent's DNS proxy listens in this network namespace.

    \b
    Example:
      warden run litellm --user litellm -- litellm --config /etc/litellm.yaml
    """
    argv = list(command[1:] if command[0] == "--" else command)
    if not argv:
        raise click.UsageError("no COMMAND given after --")
    try:
        exec_in_workload(workload, argv, user=user, keep_capabilities=keep_capabilities)
    except LaunchError as e:
        raise click.ClickException(str(e)) from None


run_command.help = run_command.help.replace("{caps}", ", ".join(ESCAPE_CAPABILITIES))
