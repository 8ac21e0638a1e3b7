"""warden events: the agent's events from its spool, and with -f as they happen."""
from __future__ import annotations

import time

import click

from agent.cli.client import EXIT_CODES_HELP, Client, Target, output_option, target_options
from agent.cli.values import duration_seconds
from agent.events import EventKind


@click.command("events", epilog=EXIT_CODES_HELP)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they happen (Ctrl-C ends).")
@click.option("--since", metavar="SEQ|DURATION",
              help="Events after seq SEQ (resume where you stopped: each event exactly once), "
                   "or from DURATION ago (90s, 15m, 2h, 7d). --since 0: everything the spool holds.")
@click.option("--last", type=click.IntRange(min=1), default=20, show_default=True,
              help="Without --since: start with the last N matching events.")
@click.option("--workload", "workloads", multiple=True, metavar="W", help="Only workload W (repeatable).")
@click.option("--kind", "kinds", multiple=True, metavar="KIND", type=click.Choice([k.value for k in EventKind]),
              help=f"Only events of this kind (repeatable): {', '.join(k.value for k in EventKind)}.")
@click.option("--pid", type=click.IntRange(min=1), help="Only events about this process.")
@click.option("--db", metavar="STORE", help="Read a collector's store instead of an agent: a SQLite file "
                                            "or postgresql://USER@HOST/DB (the same filters apply).")
@click.option("--agent", "agent_id", metavar="ID", help="With --db: only events of this agent (its agent id).")
@target_options
@output_option
def events_command(follow: bool, since: str | None, last: int, workloads: tuple[str, ...], kinds: tuple[str, ...],
                   pid: int | None, db: str | None, agent_id: str | None, target: Target, output: str) -> None:
    """The agent's events, oldest first, from its durable spool.

    With -o json each event is one JSON line, exactly as the agent writes it; a
    script resumes with --since the last seq it saw and misses nothing. When the
    spool's bound dropped events it never read, it first gets an events_lost
    event saying how many.

    \b
    Examples:
      warden events -f --workload litellm --kind egress_denied
      warden events --since 15m -o json | jq .destination
      warden events --db postgresql://ew@db/events --agent host-7 --kind egress_denied
    """
    from agent.api.gen.egress_warden.v1 import agent_pb2 as pb

    request = pb.WatchEventsRequest(follow=follow, workloads=workloads, kinds=kinds, pid=pid or 0)
    if since is None:
        request.last = last
    elif since.isdigit():
        request.since_seq = int(since)
    else:
        try:
            request.since_time = time.time() - duration_seconds(since)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--since") from None
    show = _json_line if output == "json" else human_line
    if db or agent_id:
        from agent.collector.cli_query import print_from_store
        # A store holds many agents: the table says whose each event is (JSON lines carry it).
        print_from_store(db, agent_id, request, lambda event: click.echo(
            show(event) if output == "json" else f"{event.agent}  {show(event)}"))
        return
    with Client(target) as client:
        try:
            for event in client.stream("WatchEvents", request):
                click.echo(show(event))
        except KeyboardInterrupt:
            pass


def _json_line(event) -> str:
    return event.json


def human_line(event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time % 1 * 1000):03d}"
    who = f"{event.process.pid}/{event.process.comm}" if event.HasField("process") else "-"
    where = "-"
    if event.HasField("destination"):
        d = event.destination
        where = f"{d.protocol}:{d.fqdn or d.ip}:{d.port}" if d.port else f"{d.protocol}:{d.fqdn or d.ip}"
    parts = [str(event.seq), stamp, event.kind, event.workload or "-", who, where, event.verdict or "-",
             event.action or "-"]
    if event.kind == EventKind.EVENTS_LOST.value:
        parts.append(event.detail_json)
    return "  ".join(parts)
