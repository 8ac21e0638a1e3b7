"""`warden agent`: the daemon in the foreground."""
from __future__ import annotations

import grp
import logging
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import click

from agent.cli.values import Duration, Size
from agent.events import Event, EventBus, EventKind, JsonLinesSink
from agent.events.spool import SPOOL_FILE, Spool, SpoolAhead
from agent.policy import PolicyError

DEFAULT_STATE_DIR = Path("/var/lib/egress-warden")
DEFAULT_SOCKET = Path("/run/egress-warden/agent.sock")


@click.command("agent")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (YAML, version 1). Must be owned by root and not writable by others.")
@click.option("--events-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append every event as one JSON line here (default: standard output).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="Where state that outlives a restart is kept (event sequence numbers, the event spool).")
@click.option("--agent-id", default=socket.gethostname(), show_default="host name",
              help="The name this agent gives itself in events.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_SOCKET,
              show_default=True, help="Unix socket serving the whole API (mode 0660, owner root).")
@click.option("--socket-group", default="root", show_default=True,
              help="Group owning the socket: its members may use every call, including kill.")
@click.option("--listen", metavar="HOST:PORT",
              help="Also serve the read-only calls (status, lists, WatchEvents) on TCP with mutual TLS.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --listen: the server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --listen: its private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --listen: the CA that signs client certificates; others are refused at the handshake.")
@click.option("--spool-max-bytes", type=Size(), default="256MiB", show_default=True,
              help="Bound of the event spool; the oldest events go first.")
@click.option("--spool-max-age", type=Duration(), default="7d", show_default=True,
              help="Events older than this leave the spool.")
def agent_command(policy_path: Path, events_file: Path | None, state_dir: Path, agent_id: str, socket_path: Path,
                  socket_group: str, listen: str | None, tls_cert: Path | None, tls_key: Path | None,
                  tls_client_ca: Path | None, spool_max_bytes: int, spool_max_age: float) -> None:
    """Run the agent in the foreground: enforce the policy, report every decision.

    \b
    Signals:
      SIGHUP   reload the policy file; an invalid one is refused (policy_rejected
               event) and the policy in force stays
      SIGTERM  stop; the kernel programs stay attached, so the workloads remain
               enforced (fail closed) until an agent takes them over again
    Logs go to standard error; events to --events-file or standard output, and to
    the spool (STATE_DIR/events.db) that `warden events` and collectors read.
    """
    from agent.api.server import ApiServers
    from agent.daemon import Agent

    tls = _tls_files(listen, tls_cert, tls_key, tls_client_ca)
    _check_group(socket_group)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    started_at = time.time()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stream = open(events_file, "a", encoding="utf-8") if events_file else sys.stdout
    bus = EventBus(agent_id, state_dir)
    try:
        spool = Spool(state_dir, first_seq=bus.first_seq, max_bytes=spool_max_bytes, max_age_seconds=spool_max_age)
    except sqlite3.Error as e:
        click.echo(f"warden agent: cannot open the event spool {state_dir / SPOOL_FILE}: {e}; move it aside "
                   "to start with an empty one (seq numbers continue)", err=True)
        sys.exit(1)
    except SpoolAhead as e:
        click.echo(f"warden agent: {state_dir}: {e}", err=True)
        sys.exit(1)
    bus.subscribe(spool.append)  # first: every event is queued for the spool before anyone acts on it
    bus.subscribe(JsonLinesSink(stream))
    if spool.crash_gap:
        bus.publish(Event(EventKind.EVENTS_LOST, detail={
            "count": None, "at_most": spool.crash_gap.last - spool.crash_gap.first + 1,
            "first_seq": spool.crash_gap.first, "last_seq": spool.crash_gap.last,
            "where": "the previous agent stopped without a clean shutdown: events it published in its "
                     "last moments may be missing from the spool (the events file has them)"}))
    agent = Agent(policy_path, state_dir, bus)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    try:
        agent.start()
    except PolicyError as e:
        click.echo(f"warden agent: policy refused, nothing enforced:\n{e}", err=True)
        sys.exit(1)
    api = ApiServers(agent, bus, spool, started_at=started_at)
    try:
        if listen:
            api.serve_tcp(listen, tls)
        api.serve_unix(socket_path, socket_group)  # last: once the socket exists, every server is up
    except (OSError, RuntimeError) as e:  # grpc says RuntimeError when it cannot bind
        api.stop()
        spool.close()
        click.echo(f"warden agent: cannot serve the API: {e} (enforcement stays attached)", err=True)
        sys.exit(1)
    try:
        agent.run()
    finally:
        api.stop()
        spool.close()


def _tls_files(listen: str | None, cert: Path | None, key: Path | None, client_ca: Path | None):
    from agent.api.server import TlsFiles

    given = {"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": client_ca}
    if not listen:
        if any(given.values()):
            raise click.UsageError("--tls-cert, --tls-key and --tls-client-ca go with --listen HOST:PORT")
        return None
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise click.UsageError(f"--listen serves mutual TLS only: give {', '.join(missing)} too")
    return TlsFiles(cert, key, client_ca)


def _check_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        raise click.BadParameter(f"no group named {name!r} on this host", param_hint="--socket-group") from None
