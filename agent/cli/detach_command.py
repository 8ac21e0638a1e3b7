"""`warden detach`: end enforcement on purpose."""
from __future__ import annotations

import click

from agent import cgroups
from agent.kernel.loader import detach_all


@click.command("detach")
@click.option("--remove-cgroups", is_flag=True,
              help="Also kill the processes left in the egress-warden cgroups and remove the cgroups.")
def detach_command(remove_cgroups: bool) -> None:
    """Detach every Egress Warden program from the egress-warden cgroups.

    The agent leaves its programs attached when it stops, so workloads stay
    enforced (fail closed). This command is how enforcement is ended on purpose,
    for an uninstall. Stop the agent first, or it keeps enforcing what it knows.
    """
    parent = cgroups.warden_parent()
    if not parent.is_dir():
        click.echo(f"nothing to detach: {parent} does not exist")
        return
    for cgroup in sorted(p for p in parent.iterdir() if p.is_dir()):
        click.echo(f"{cgroup}: detached {detach_all(cgroup)} program(s)")
        if remove_cgroups:
            cgroups.remove(cgroup)
            click.echo(f"{cgroup}: removed")
