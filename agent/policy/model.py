"""The validated policy: frozen values that the rest of the agent reads.

Everything here is already checked and normalized by agent.policy.validate:
CIDRs are canonical network strings, FQDNs are lowercase without a trailing
dot, sizes are bytes. Nothing here can fail for a policy that loaded.
"""
from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from typing import Literal

Mode = Literal["enforce", "monitor"]
ViolationAction = Literal["deny", "kill", "quarantine"]
BudgetAction = Literal["alert", "kill", "quarantine"]
Protocol = Literal["tcp", "udp", "any"]


@dataclass(frozen=True)
class AllowRule:
    kind: Literal["cidr", "fqdn"]
    value: str
    ports: tuple[int, ...]  # empty: any port
    protocol: Protocol
    line: int

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if self.kind != "cidr":
            raise ValueError(f"rule at line {self.line} is an fqdn rule, not a cidr rule")
        return ipaddress.ip_network(self.value)


@dataclass(frozen=True)
class Budget:
    fqdn: str | None
    cidr: str | None
    bytes_per_minute: int
    action: BudgetAction


@dataclass(frozen=True)
class Spike:
    """An anomaly is a rate toward one destination above `factor` times the workload's own
    baseline toward it (an average over about `baseline_seconds`), and above `min_rate`."""

    factor: float
    baseline_seconds: int = 300
    min_rate: int = 1_000_000  # bytes per second


@dataclass(frozen=True)
class Match:
    systemd_unit: str | None
    exe: tuple[str, ...]
    cmdline: tuple[str, ...]

    def matches(self, exe: str, cmdline: str) -> bool:
        """True if exe fits one of the exe globs or cmdline contains one of the cmdline strings.

        Globs are matched against the full path with fnmatch (case-sensitive,
        and '*' also matches '/'); cmdline is the process's arguments joined by
        spaces. systemd_unit is not considered: units are found by cgroup.
        """
        return any(fnmatch.fnmatchcase(exe, glob) for glob in self.exe) or any(
            part in cmdline for part in self.cmdline
        )


@dataclass(frozen=True)
class DnsConfig:
    upstream: tuple[str, ...] = ("system",)
    grace_seconds: int = 60  # how long past its TTL an answer's addresses stay allowed


@dataclass(frozen=True)
class Hooks:
    on_violation: tuple[str, ...] = ()
    on_budget: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    name: str
    mode: Mode
    on_violation: ViolationAction
    match: Match
    listen: tuple[int, ...]
    allow: tuple[AllowRule, ...]
    dns: DnsConfig
    budgets: tuple[Budget, ...]
    hooks: Hooks
    spike: Spike | None = None


@dataclass(frozen=True)
class Policy:
    version: int
    workloads: tuple[Workload, ...]
    path: str
    notices: tuple[str, ...]  # non-fatal messages, formatted like problems

    def workload(self, name: str) -> Workload:
        for workload in self.workloads:
            if workload.name == name:
                return workload
        raise KeyError(name)
