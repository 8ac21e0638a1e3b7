import click

from agent.cli.agent_command import agent_command
from agent.cli.collector_command import collector_command
from agent.cli.control_command import kill_command, quarantine_command, release_command
from agent.cli.demo_command import demo_command
from agent.cli.detach_command import detach_command
from agent.cli.events_command import events_command
from agent.cli.policy import policy
from agent.cli.run_command import run_command
from agent.cli.status_command import status_command
from agent.cli.workloads_command import ps_command, workloads_command


@click.group()
def main() -> None:
    """Egress Warden: keeps LLM routers to the destinations their policy allows.

    \b
    Commands:
      agent       run the agent: enforce a policy, report every decision
      run         start a router inside its workload, guarded from the first instruction
      policy      check policy files before the agent loads them; make the agent reload
      detach      end enforcement on purpose (uninstall)
      collector   collect many agents' events into SQLite or PostgreSQL, each once
      demo        watch it stop a compromised router, in throwaway namespaces (a minute)
    \b
    Asking a running agent (its Unix socket, --socket or $WARDEN_SOCKET; or
    --server HOST:PORT with mutual TLS for the read-only ones):
      status      version, uptime, workloads, event counts, spool, losses
      workloads   the workloads in force
      ps          their processes and the destinations they talk to
      events      events from the spool; -f follows, --since resumes
      quarantine  deny all egress of a workload and freeze it; release undoes it
      kill        kill every process of a workload
    \b
    Exit status:
      0  success
      1  failure, or invalid input such as a policy that does not validate
      2  usage error (unknown command or option, missing argument)
      3  no agent answers (not running, wrong socket, no permission on it)
      4  a control call sent over TCP: those are served on the Unix socket only
    """


main.add_command(agent_command)
main.add_command(run_command)
main.add_command(policy)
main.add_command(detach_command)
main.add_command(demo_command)
for command in (status_command, workloads_command, ps_command, events_command, quarantine_command,
                release_command, kill_command, collector_command):
    main.add_command(command)
