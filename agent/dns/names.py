"""Which names a workload may resolve, from its policy's fqdn rules. As in Cilium's toFQDNs,
"*.example.com" stands for exactly one label: it matches a.example.com, not example.com and
not a.b.example.com."""
from __future__ import annotations

from dataclasses import dataclass

from agent.policy import AllowRule


@dataclass(frozen=True)
class NameGrant:
    """What an allowed name's addresses may be reached on."""

    pattern: str
    protocol: str
    ports: tuple[int, ...]  # empty: any port
    rule_line: int


def wildcard_suffix(name: str) -> str | None:
    """What follows "*." in a pattern that matches `name`: all but its first label."""
    first, dot, rest = name.partition(".")
    return rest if dot and first else None


def name_matches(pattern: str, name: str) -> bool:
    """One pattern against one name (budgets name destinations this way too)."""
    if pattern.startswith("*."):
        return wildcard_suffix(name) == pattern[2:]
    return name == pattern


class NameMatcher:
    def __init__(self, rules: tuple[AllowRule, ...]) -> None:
        self._exact: dict[str, list[NameGrant]] = {}
        self._wildcard: dict[str, list[NameGrant]] = {}  # by the suffix after "*."
        for rule in rules:
            if rule.kind != "fqdn":
                continue
            grant = NameGrant(rule.value, rule.protocol, rule.ports, rule.line)
            if rule.value.startswith("*."):
                self._wildcard.setdefault(rule.value[2:], []).append(grant)
            else:
                self._exact.setdefault(rule.value, []).append(grant)

    def grants(self, name: str) -> list[NameGrant]:
        """The grants of every rule `name` matches; empty: the name is not allowed."""
        found = list(self._exact.get(name, ()))
        suffix = wildcard_suffix(name)
        if suffix is not None:
            found.extend(self._wildcard.get(suffix, ()))
        return found

    @property
    def exact_names(self) -> list[str]:
        return sorted(self._exact)

    def __bool__(self) -> bool:
        return bool(self._exact or self._wildcard)
