"""`warden detach`: end enforcement on purpose."""
from __future__ import annotations

import os
from pathlib import Path

import click

from agent import cgroups
from agent.kernel.loader import DEFAULT_PIN_DIR, detach_all, remove_pins


@click.command("detach")
@click.argument("workloads", nargs=-1)
@click.option("--remove-cgroups", is_flag=True,
              help="Also kill the processes left in the egress-warden cgroups and remove the cgroups.")
@click.option("--remove-pins", "remove_pins_too", is_flag=True,
              help="Also remove the pinned byte counters and socket owners from --pin-dir, which hold "
                   "kernel memory (28 MiB) until removed; a later agent counts from zero.")
@click.option("--pin-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_PIN_DIR,
              show_default=True, help="Where the agent pinned its maps (its --pin-dir).")
def detach_command(workloads: tuple[str, ...], remove_cgroups: bool, remove_pins_too: bool, pin_dir: Path) -> None:
    """Detach Egress Warden programs: from the named WORKLOADS' egress-warden cgroups,
    or, with no name, from every cgroup (including systemd units a policy named).

    The agent leaves its programs attached when it stops, so workloads stay
    enforced (fail closed). This command is how enforcement is ended on purpose,
    for an uninstall. Stop the agent first, or it keeps enforcing what it knows.

    \b
    warden detach                           end enforcement everywhere
    warden detach litellm                   only the litellm workload's cgroup
    warden detach --remove-pins             uninstall: also free the pinned maps
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
    if remove_pins_too:
        removed = remove_pins(pin_dir)
        click.echo(f"{pin_dir}: removed {len(removed)} pinned map(s)" + (f" ({', '.join(removed)})" if removed else ""))
