"""`warden detach`: end enforcement on purpose."""
from __future__ import annotations

import os
from pathlib import Path

import click

from agent import cgroups
from agent.kernel.loader import detach_all


@click.command("detach")
@click.option("--remove-cgroups", is_flag=True,
              help="Also kill the processes left in the egress-warden cgroups and remove the cgroups.")
def detach_command(remove_cgroups: bool) -> None:
    """Detach every Egress Warden program from every cgroup (the egress-warden ones and
    the systemd units a policy named).

    The agent leaves its programs attached when it stops, so workloads stay
    enforced (fail closed). This command is how enforcement is ended on purpose,
    for an uninstall. Stop the agent first, or it keeps enforcing what it knows.
    """
    root = cgroups.cgroup2_root()
    detached = 0
    for directory, _subdirs, _files in os.walk(root):
        count = detach_all(Path(directory))
        if count:
            click.echo(f"{directory}: detached {count} program(s)")
            detached += count
    click.echo(f"detached {detached} program(s) in all")
    parent = cgroups.warden_parent(root)
    if remove_cgroups and parent.is_dir():
        for cgroup in sorted(p for p in parent.iterdir() if p.is_dir()):
            cgroups.remove(cgroup)
            click.echo(f"{cgroup}: removed")
