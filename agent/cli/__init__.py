import click

from agent.cli.agent_command import agent_command
from agent.cli.collector_command import collector_command
from agent.cli.detach_command import detach_command
from agent.cli.policy import policy
from agent.cli.run_command import run_command


@click.group()
def main() -> None:
    """Egress Warden: keeps LLM routers to the destinations their policy allows.

    \b
    Commands:
      agent    run the agent: enforce a policy, report every decision
      run      start a router inside its workload, guarded from the first instruction
      policy   check policy files before the agent loads them
      detach   end enforcement on purpose (uninstall)
      collector  collect events from many agents into SQLite or PostgreSQL
    \b
    Exit status:
      0  success
      1  failure, or invalid input such as a policy that does not validate
      2  usage error (unknown command or option, missing argument)
    """


main.add_command(agent_command)
main.add_command(run_command)
main.add_command(policy)
main.add_command(detach_command)
main.add_command(collector_command)
