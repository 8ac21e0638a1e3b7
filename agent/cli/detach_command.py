"""`warden detach`: end enforcement on purpose."""
from __future__ import annotations

import os
from pathlib import Path

import click

from agent import cgroups
from agent.kernel.loader import detach_all


@click.command("detach")
@click.argument("workloads", nargs=-1)
@click.option("--remove-cgroups", is_flag=True,
              help="Also kill the processes left in the egress-warden cgroups and remove the cgroups.")
def detach_command(workloads: tuple[str, ...], remove_cgroups: bool) -> None:
    """Detach Egress Warden programs: from the named WORKLOADS' egress-warden cgroups,
    or, with no name, from every cgroup (including systemd units a policy named).

    The agent leaves its programs attached when it stops, so workloads stay
    enforced (fail closed). This command is how enforcement is ended on purpose,
    for an uninstall. Stop the agent first, or it keeps enforcing what it knows.
    """
    root = cgroups.cgroup2_root()
    parent = cgroups.warden_parent(root)
    if workloads:
        targets = [parent / name for name in workloads]
        missing = [str(t) for t in targets if not t.is_dir()]
        if missing:
            raise click.ClickException(f"no such workload cgroup: {', '.join(missing)}")
    else:
        targets = [Path(directory) for directory, _subdirs, _files in os.walk(root)]
    detached = 0
    for cgroup in targets:
        count = detach_all(cgroup)
        if count:
            click.echo(f"{cgroup}: detached {count} program(s)")
            detached += count
    click.echo(f"detached {detached} program(s) in all")
    if remove_cgroups:
        for cgroup in targets if workloads else cgroups.workload_cgroups(root):
            cgroups.remove(cgroup)
            click.echo(f"{cgroup}: removed")
