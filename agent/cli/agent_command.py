"""`warden agent`: the daemon in the foreground."""
from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import click

from agent.actions.hooks import DEFAULT_TIMEOUT_SECONDS
from agent.actions.quarantines import QuarantineRecordError
from agent.cli.sdnotify import notify
from agent.cli.values import DURATION, PEM_FILE, PRIVATE_KEY_FILE, SIZE, SIZE_OR_ZERO
from agent.events import EventBus, JsonLinesSink
from agent.events.lines import ROTATE_AT_BYTES, ROTATED_KEPT, LinesOutput
from agent.events.spool import SPOOL_FILE, Spool, SpoolAhead
from agent.kernel.loader import DEFAULT_PIN_DIR
from agent.permissions import permission_problems
from agent.policy import PolicyError

DEFAULT_STATE_DIR = Path("/var/lib/egress-warden")
DEFAULT_SOCKET = Path("/run/egress-warden/agent.sock")


@click.command("agent")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (YAML, version 1). Must be owned by root and not writable by others.")
@click.option("--events-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append every event as one JSON line here (default: standard output). Its directory must "
                   "exist and be writable by root only (or sticky, as /tmp), as must the directories above it.")
@click.option("--events-max-bytes", type=SIZE_OR_ZERO, default=str(ROTATE_AT_BYTES),
              show_default=f"{ROTATE_AT_BYTES // 10**6}MB",
              help="Rotate --events-file before it would pass this size: it moves to FILE.1 (FILE.1 to "
                   "FILE.2, ...). 0: never. The spool, not this file, is what collectors resume from.")
@click.option("--events-keep", type=click.IntRange(min=1), default=ROTATED_KEPT, show_default=True,
              help="Rotated --events-file files kept; older ones are deleted.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="Where state that outlives a restart is kept (event sequence numbers, the "
                                      "event spool, which workloads are quarantined, the DNS answers in force, the "
                                      "budgets' windows and spike baselines, each workload's kernel index). Must be owned "
                                      "by root and not writable by group or others, nor the directories above it.")
@click.option("--agent-id", default=socket.gethostname(), show_default="host name",
              help="The name this agent gives itself in events.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_SOCKET,
              show_default=True, help="Unix socket serving the whole API (mode 0660, owner root).")
@click.option("--socket-group", default="root", show_default=True,
              help="Group owning the socket: its members may use every call, including kill.")
@click.option("--listen", metavar="HOST:PORT",
              help="Also serve the read-only calls (status, lists, WatchEvents) on TCP with mutual TLS.")
@click.option("--tls-cert", type=PEM_FILE,
              help="With --listen: the server certificate (PEM).")
@click.option("--tls-key", type=PRIVATE_KEY_FILE,
              help="With --listen: its private key (PEM).")
@click.option("--tls-client-ca", type=PEM_FILE,
              help="With --listen: the CA that signs client certificates; others are refused at the handshake.")
@click.option("--spool-max-bytes", type=SIZE, default="256MiB", show_default=True,
              help="Bound of the event spool; the oldest events go first.")
@click.option("--spool-max-age", type=DURATION, default="7d", show_default=True,
              help="Events older than this leave the spool.")
@click.option("--pin-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_PIN_DIR,
              show_default=True, help="bpffs directory for the maps that outlive a restart (byte counters, "
              "socket owners). One per agent: two agents must never share it.")
@click.option("--metrics-listen", default="127.0.0.1:9464", show_default=True, metavar="ADDRESS:PORT|off",
              help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics, or 'off'. Keep it on loopback: "
              "the figures name workloads and destinations.")
@click.option("--hook-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT_SECONDS, show_default=True,
              help="Seconds a policy hook executable may run before it is killed (reported in hook_finished).")
def agent_command(policy_path: Path, events_file: Path | None, events_max_bytes: int, events_keep: int,
                  state_dir: Path, agent_id: str, socket_path: Path, socket_group: str, listen: str | None,
                  tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None, spool_max_bytes: int,
                  spool_max_age: float, pin_dir: Path, metrics_listen: str, hook_timeout: float) -> None:
    """Run the agent in the foreground: enforce the policy, report every decision.

    \b
    Signals:
      SIGHUP   reload the policy file; an invalid one is refused (policy_rejected
               event) and the policy in force stays
      SIGTERM  stop; the kernel programs stay attached, so the workloads remain
               enforced (fail closed) until an agent takes them over again
    Logs go to standard error; events to --events-file (rotated by size) or standard
    output, and to the spool (STATE_DIR/events.db) that `warden events` and
    collectors read.
    Under systemd (Type=notify) READY=1 is sent once the programs are attached,
    the policy is enforced and the API is served.
    """
    from agent.api.server import ApiServers
    from agent.daemon import Agent
    from agent.metrics import Metrics, parse_listen

    try:
        metrics_address = parse_listen(metrics_listen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics-listen") from None

    tls = _tls_files(listen, tls_cert, tls_key, tls_client_ca)
    _check_group(socket_group)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    started_at = time.time()
    _check_state_dir(state_dir)
    _check_events_file(events_file)
    _check_socket_dir(socket_path)
    lines = LinesOutput(events_file, events_max_bytes, events_keep, _say_torn_line_dropped)
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
    bus.subscribe(JsonLinesSink(lines))
    if spool.crash_gap:
        bus.publish(spool.crash_gap.event())
    agent = Agent(policy_path, state_dir, bus, pin_dir=pin_dir, hook_timeout=hook_timeout)
    metrics = Metrics(agent.traffic_by_workload, lambda: agent.kernel.lost_records() if agent.kernel else 0,
                      agent.budget_usage)
    bus.subscribe(metrics.observe)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    try:
        agent.start()
    except PolicyError as e:
        spool.close()
        click.echo(f"warden agent: policy refused, nothing enforced:\n{e}", err=True)
        sys.exit(1)
    except QuarantineRecordError as e:
        spool.close()
        click.echo(f"warden agent: {e}", err=True)
        sys.exit(1)
    api = ApiServers(agent, bus, spool, started_at=started_at)
    if metrics_address:
        serve_metrics(metrics, *metrics_address)
    try:
        if listen:
            api.serve_tcp(listen, tls)
        api.serve_unix(socket_path, socket_group)  # last: once the socket exists, every server is up
    except (OSError, RuntimeError) as e:  # grpc says RuntimeError when it cannot bind
        api.stop()
        metrics.close()
        spool.close()
        click.echo(f"warden agent: cannot serve the API: {e} (enforcement stays attached)", err=True)
        sys.exit(1)
    notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=enforcing {len(agent.workloads)} workload(s)")
    try:
        agent.run()
    finally:
        notify("STOPPING=1")
        api.stop()
        spool.close()
        metrics.close()


def _check_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _refuse_if_others_can_change(state_dir, f"the state directory {state_dir}", "decides which quarantines "
                                 "outlast a restart and which addresses DNS answers allow again", files_too=True)


def _check_socket_dir(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _refuse_if_others_can_change(socket_path.parent, f"--socket {socket_path}", "can put a link in the socket's "
                                 "place as it is bound, and the agent would hand the file it points to to "
                                 "--socket-group")


def _check_events_file(events_file: Path | None) -> None:
    if events_file is not None:
        directory = events_file.absolute().parent
        _refuse_if_others_can_change(directory, f"--events-file {events_file}", "can make it a link to any file, "
                                     "which the agent (root) would then append events to")


def _refuse_if_others_can_change(directory: Path, what: str, because: str, files_too: bool = False) -> None:
    """`files_too`: also the files in it (one planted before the directory was closed)."""
    try:
        problems = permission_problems(str(directory), os.stat(directory), what=f"directory {directory} ")
    except FileNotFoundError:
        problems = [f"directory {directory} does not exist"]
    if files_too and not problems:
        problems = [p for entry in sorted(directory.iterdir()) if entry.is_file()
                    for p in permission_problems(str(entry), os.stat(entry), what=f"{entry} ")]
    if problems:
        click.echo(f"warden agent: refusing {what}: whoever can change {directory} {because}.\n"
                   + "\n".join(f"  {p}" for p in problems), err=True)
        sys.exit(1)


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


def _say_torn_line_dropped(path: Path, dropped: int) -> None:
    logging.warning("%s ended in %d bytes of an event line cut off when the agent was last stopped; dropped "
                    "them (the spool has that event, or the events_lost event after a kill names its seq)",
                    path, dropped)


def _check_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        raise click.BadParameter(f"no group named {name!r} on this host", param_hint="--socket-group") from None


def serve_metrics(metrics, host: str, port: int) -> None:
    """A metrics endpoint that cannot start is logged, not fatal: enforcement matters more."""
    try:
        bound = metrics.serve(host, port)
    except OSError as e:
        logging.error("metrics endpoint %s:%d not started (%s); enforcement goes on without it", host, port, e.strerror)
        return
    logging.info("Prometheus metrics at http://%s:%d/metrics", bound[0], bound[1])
