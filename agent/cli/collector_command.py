"""`warden collector`: many agents in, every event stored exactly once; `warden collector status`."""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from agent.cli.client import output_option
from agent.cli.sdnotify import notify

from agent.collector.config import (DEFAULT_LISTEN, DEFAULT_STORE, CollectorConfig, ConfigError, JsonLines,
                                    TlsFiles, agent_target, load_config)

_PATH = click.Path(dir_okay=False, path_type=Path)


def _flags_over(config: CollectorConfig, flags: dict) -> CollectorConfig:
    """The configuration file's values with every flag given on the command line taking precedence."""
    changes: dict = {}
    if flags["store"]:
        changes["store"] = flags["store"]
    if flags["listen"] is not None:
        changes["listen"] = flags["listen"] or None
    if flags["agents"]:
        targets = []
        for i, spec in enumerate(flags["agents"]):
            name, sep, address = spec.partition("=")
            if not sep:
                raise ConfigError(f"--agent {spec!r}: expected NAME=HOST:PORT")
            targets.append(agent_target(name, address, None, f"--agent[{i}]"))
        changes["agents"] = config.agents + tuple(targets)
    tls = [flags["tls_ca"], flags["tls_cert"], flags["tls_key"]]
    if any(tls):
        base = config.tls
        if base is None and not all(tls):
            raise ConfigError("--tls-ca, --tls-cert and --tls-key go together (or set tls: in the config file)")
        changes["tls"] = TlsFiles(*(flag or getattr(base, key) for flag, key in zip(tls, ("ca", "cert", "key"))))
    if flags["jsonl"]:
        base = config.jsonl or JsonLines(flags["jsonl"])
        changes["jsonl"] = dataclasses.replace(base, path=flags["jsonl"])
    return dataclasses.replace(config, **changes)


@click.group("collector", invoke_without_command=True)
@click.option("--config", "config_path", type=_PATH, help="Collector configuration (YAML; see below).")
@click.option("--store", help=f"Where events go: a file path (SQLite) or postgresql://USER@HOST/DB "
                              f"[default: {DEFAULT_STORE}]. The password belongs in ~/.pgpass or PGPASSWORD.")
@click.option("--agent", "agents", multiple=True, metavar="NAME=HOST:PORT",
              help="An agent to collect from (its --listen address); repeat for more. Adds to the file's list.")
@click.option("--tls-ca", type=_PATH, help="CA certificate that signed the agents' server certificates.")
@click.option("--tls-cert", type=_PATH, help="This collector's client certificate (the agents must trust its CA).")
@click.option("--tls-key", type=_PATH, help="The client certificate's private key.")
@click.option("--jsonl", help='Also write each stored event as a JSON line to this file (rotated by size), or "-".')
@click.option("--listen", help=f"HOST:PORT for /metrics and /status; empty for none [default: {DEFAULT_LISTEN}].")
@click.pass_context
def collector_command(ctx: click.Context, config_path: Path | None, **flags) -> None:
    """Collect events from many agents into one store, each exactly once.

    Each agent is followed over mutual TLS, resuming after the last seq the store holds
    for it, so a restarted collector (or a second one on the same PostgreSQL database)
    neither loses nor repeats an event. A dead or stuck agent is retried with backoff
    and holds up no other.

    \b
    Configuration file:
      store: postgresql://collector@db.internal/events   # or a path: SQLite
      tls: {ca: ca.pem, cert: collector.pem, key: collector.key}
      agents:
        - {name: inference-1, address: 10.0.0.11:7443}
        - {name: inference-2, address: 10.0.0.12:7443, server_name: inference-2.internal}
      jsonl: {path: /var/log/egress-warden-collector/events.jsonl, max_bytes: 100MB, keep: 5}
      listen: 127.0.0.1:9465
    \b
    Health: `warden collector status`, or scrape http://LISTEN/metrics.
    Query the store: `warden events --db STORE [filters]`.
    SIGTERM or SIGINT stops it; what was stored stays stored.
    """
    if ctx.invoked_subcommand is not None:
        return
    from agent.collector.service import Collector

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = _flags_over(load_config(config_path) if config_path else CollectorConfig(), flags)
        collector = Collector(config)
        collector.start()
    except (ConfigError, OSError, ValueError) as e:
        click.echo(f"warden collector: {e}", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - a store that cannot be opened: say which and why, no trace
        click.echo(f"warden collector: cannot open the store: {e}", err=True)
        sys.exit(1)
    # Handlers only append (no lock): one can be interrupted by the next signal, and a
    # threading.Event.set there would wait forever on the lock its own thread holds.
    stop_signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stop_signals.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: stop_signals.append(signum))
    notify(f"READY=1\nSTATUS=collecting from {len(config.agents)} agent(s)")
    while not stop_signals:
        time.sleep(0.2)
    notify("STOPPING=1")
    collector.stop()


@collector_command.command("status")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="The collector's --listen address.")
@output_option
def status_command(listen: str, output: str) -> None:
    """Show a running collector's agents: connected, lag in seq, last error; events/s in."""
    try:
        with urllib.request.urlopen(f"http://{listen}/status", timeout=5) as answer:
            status = json.load(answer)
    except (urllib.error.URLError, OSError) as e:
        click.echo(f"warden collector status: no collector answers at {listen}: {getattr(e, 'reason', e)}", err=True)
        sys.exit(1)
    if output == "json":
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"store {status['store']}: {status['events_per_second']} events/s, "
               f"{status['events_stored']} stored, {status['store_errors']} store errors")
    rows = [("AGENT", "ADDRESS", "ID", "CONNECTED", "STORED SEQ", "LAG", "LAST ERROR")]
    rows += [(a["name"], a["address"], a["agent_id"] or "-", "yes" if a["connected"] else "no",
              str(a["stored_seq"]), str(a["lag"]), a["last_error"] or "-") for a in status["agents"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
