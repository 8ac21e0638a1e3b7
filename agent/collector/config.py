"""The collector's configuration: a YAML file, with command-line flags taking precedence.

    store: postgresql://collector@db.internal/events   # or a file path (SQLite, the default)
    tls:                          # mutual TLS to every agent
      ca: /etc/egress-warden/ca.pem          # the CA that signed the agents' certificates
      cert: /etc/egress-warden/collector.pem # this collector's client certificate
      key: /etc/egress-warden/collector.key
    agents:
      - name: inference-1                    # a label for status and logs
        address: 10.0.0.11:7443              # the agent's --listen address
        server_name: inference-1.internal    # optional: the name its certificate carries
    jsonl:                                   # optional JSON lines for a SIEM shipper
      path: /var/log/egress-warden-collector/events.jsonl   # or "-" for stdout
      max_bytes: 100MB                       # rotate beyond this size (0: never)
      keep: 5                                # rotated files kept
    listen: 127.0.0.1:9465                   # /metrics (Prometheus) and /status
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from agent.events.lines import ROTATE_AT_BYTES, ROTATED_KEPT
from agent.permissions import private_key_problem
from agent.policy.values import size_or_zero

DEFAULT_STORE = "/var/lib/egress-warden/collector.db"
DEFAULT_LISTEN = "127.0.0.1:9465"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class AgentTarget:
    name: str
    address: str
    server_name: str | None = None


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class JsonLines:
    path: str
    max_bytes: int = ROTATE_AT_BYTES
    keep: int = ROTATED_KEPT


@dataclass(frozen=True)
class CollectorConfig:
    agents: tuple[AgentTarget, ...] = ()
    store: str = DEFAULT_STORE
    tls: TlsFiles | None = None
    jsonl: JsonLines | None = None
    listen: str | None = DEFAULT_LISTEN
    source: str = "<flags>"

    def check(self) -> "CollectorConfig":
        """Refuses a configuration the collector could not run with, naming what to fix."""
        if not self.agents:
            raise ConfigError(f"{self.source}: agents: no agent to collect from (give agents: or --agent NAME=HOST:PORT)")
        names = [a.name for a in self.agents]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{self.source}: agents: name(s) {', '.join(twice)} given twice")
        if self.tls is None:
            raise ConfigError(f"{self.source}: tls: agents serve collectors over mutual TLS only; "
                              "give tls.ca, tls.cert and tls.key (or --tls-ca, --tls-cert, --tls-key)")
        for key in ("ca", "cert", "key"):
            path = getattr(self.tls, key)
            if not path.is_file():
                raise ConfigError(f"{self.source}: tls.{key}: {path}: no such file")
        problem = private_key_problem(str(self.tls.key))
        if problem:
            raise ConfigError(f"{self.source}: tls.key: {problem}")
        return self


def _require(data: dict, key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _agent(item: Any, where: str) -> AgentTarget:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with name and address")
    unknown = set(item) - {"name", "address", "server_name"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: name, address, server_name)")
    return agent_target(_require(item, "name", str, where), _require(item, "address", str, where),
                        item.get("server_name"), where)


def agent_target(name: str, address: str, server_name: str | None, where: str) -> AgentTarget:
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r}: letters, digits, '.', '_' and '-' only")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}.address: {address!r}: expected HOST:PORT ([v6]:PORT for IPv6)")
    return AgentTarget(name, address, server_name)


def load_config(path: Path) -> CollectorConfig:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top")
    unknown = set(data) - {"store", "tls", "agents", "jsonl", "listen"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          "(known: store, tls, agents, jsonl, listen)")
    config = CollectorConfig(source=where)
    if "store" in data:
        config = replace(config, store=_require(data, "store", str, where))
    if "listen" in data:
        listen = data["listen"]
        if listen is not None and not isinstance(listen, str):
            raise ConfigError(f"{where}.listen: expected HOST:PORT, or null for no status endpoint")
        config = replace(config, listen=listen)
    if "agents" in data:
        agents = _require(data, "agents", list, where)
        config = replace(config, agents=tuple(_agent(a, f"{where}: agents[{i}]") for i, a in enumerate(agents)))
    if "tls" in data:
        tls = _require(data, "tls", dict, where)
        config = replace(config, tls=TlsFiles(*(Path(_require(tls, k, str, f"{where}: tls")) for k in ("ca", "cert", "key"))))
    if "jsonl" in data:
        jsonl = _require(data, "jsonl", dict, where)
        try:
            max_bytes = jsonl.get("max_bytes", JsonLines.max_bytes)
            max_bytes = size_or_zero(str(max_bytes))
        except ValueError as e:
            raise ConfigError(f"{where}: jsonl.max_bytes: {e}") from None
        keep = jsonl.get("keep", JsonLines.keep)
        if not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"{where}: jsonl.keep: expected a whole number >= 1")
        config = replace(config, jsonl=JsonLines(_require(jsonl, "path", str, f"{where}: jsonl"), max_bytes, keep))
    return config
