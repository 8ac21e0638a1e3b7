"""`warden agent`: the daemon in the foreground."""
from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

import click

from agent.events import EventBus, JsonLinesSink
from agent.actions.hooks import DEFAULT_TIMEOUT_SECONDS
from agent.kernel.loader import DEFAULT_PIN_DIR
from agent.policy import PolicyError

DEFAULT_STATE_DIR = Path("/var/lib/egress-warden")


@click.command("agent")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (YAML, version 1). Must be owned by root and not writable by others.")
@click.option("--events-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append every event as one JSON line here (default: standard output).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="Where state that outlives a restart is kept (event sequence numbers).")
@click.option("--pin-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_PIN_DIR,
              show_default=True, help="bpffs directory for the maps that outlive a restart (byte counters, "
              "socket owners). One per agent: two agents must never share it.")
@click.option("--metrics-listen", default="127.0.0.1:9464", show_default=True, metavar="ADDRESS:PORT|off",
              help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics, or 'off'. Keep it on loopback: "
              "the figures name workloads and destinations.")
@click.option("--hook-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT_SECONDS, show_default=True,
              help="Seconds a policy hook executable may run before it is killed (reported in hook_finished).")
@click.option("--agent-id", default=socket.gethostname(), show_default="host name",
              help="The name this agent gives itself in events.")
def agent_command(policy_path: Path, events_file: Path | None, state_dir: Path, pin_dir: Path,
                  metrics_listen: str, hook_timeout: float, agent_id: str) -> None:
    """Run the agent in the foreground: enforce the policy, report every decision.

    \b
    Signals:
      SIGHUP   reload the policy file; an invalid one is refused (policy_rejected
               event) and the policy in force stays
      SIGTERM  stop; the kernel programs stay attached, so the workloads remain
               enforced (fail closed) until an agent takes them over again
    Logs go to standard error; events to --events-file or standard output.
    """
    from agent.daemon import Agent
    from agent.metrics import Metrics, parse_listen

    try:
        metrics_address = parse_listen(metrics_listen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics-listen") from None

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stream = open(events_file, "a", encoding="utf-8") if events_file else sys.stdout
    bus = EventBus(agent_id, state_dir)
    bus.subscribe(JsonLinesSink(stream))
    agent = Agent(policy_path, state_dir, bus, pin_dir=pin_dir, hook_timeout=hook_timeout)
    metrics = Metrics(agent.traffic_by_workload, lambda: agent.kernel.lost_records() if agent.kernel else 0)
    bus.subscribe(metrics.observe)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    try:
        agent.start()
    except PolicyError as e:
        click.echo(f"warden agent: policy refused, nothing enforced:\n{e}", err=True)
        sys.exit(1)
    if metrics_address:
        serve_metrics(metrics, *metrics_address)
    try:
        agent.run()
    finally:
        metrics.close()


def serve_metrics(metrics, host: str, port: int) -> None:
    """A metrics endpoint that cannot start is logged, not fatal: enforcement matters more."""
    try:
        bound = metrics.serve(host, port)
    except OSError as e:
        logging.error("metrics endpoint %s:%d not started (%s); enforcement goes on without it", host, port, e.strerror)
        return
    logging.info("Prometheus metrics at http://%s:%d/metrics", bound[0], bound[1])
