"""`warden demo`: see the agent stop a compromised router, on this host, in under a minute."""
from __future__ import annotations

import sys

import click


@click.command("demo")
@click.option("--action", type=click.Choice(["kill", "quarantine"]), default="kill", show_default=True,
              help="The violation action of the demo's second round.")
def demo_command(action: str) -> None:
    """Build network namespaces with a fake provider, a DNS server and an attacker host,
    start an agent, and run a small LLM router that calls its provider by name and then
    tries to exfiltrate a (fake) key: a direct connection, a DNS tunnel, a child process.
    Events are shown live as the agent reports them.

    \b
    Round 1, on_violation: deny   every attempt is refused in the kernel
    Round 2, on_violation: ACTION  the first attempt kills or quarantines the router

    Needs root and `scripts/setup.sh`, nothing else: no traffic leaves the namespaces it
    builds, and everything it made (namespaces, cgroup, programs, files) is removed at the
    end, also on Ctrl-C.
    """
    from agent.lab.demo import Demo

    demo = Demo(action, echo=click.echo)
    try:
        demo.run()
    except KeyboardInterrupt:
        sys.exit(130)
