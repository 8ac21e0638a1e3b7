"""Turns a YAML node tree into a Policy, collecting every problem on the way.

A check that finds a problem records it and returns a placeholder, so that
checking goes on and the user sees all problems at once. parse() raises
PolicyError when any problem was recorded: a placeholder never reaches a Policy.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import values
from .errors import PolicyError, PolicyProblem
from .model import AllowRule, Budget, DnsConfig, Hooks, Match, Policy, Spike, Workload
from .yamlnodes import FLOAT, INT, STR, YamlSyntaxError, compose, describe, int_value, is_int, is_str, line

T = TypeVar("T")
Check = Callable[[Node, str], T]

TOP_KEYS = ("version", "workloads")
WORKLOAD_KEYS = ("name", "mode", "on_violation", "match", "listen", "allow", "dns", "budgets", "hooks", "spike")
MATCH_KEYS = ("systemd_unit", "exe", "cmdline")
RULE_KEYS = ("cidr", "fqdn", "ports", "protocol")
BUDGET_KEYS = ("fqdn", "cidr", "bytes_per_minute", "action")
DNS_KEYS = ("upstream", "grace_seconds")
HOOK_KEYS = ("on_violation", "on_budget")
SPIKE_KEYS = ("factor", "baseline_seconds", "min_rate")
MODES = ("enforce", "monitor")
VIOLATION_ACTIONS = ("deny", "kill", "quarantine")
BUDGET_ACTIONS = ("alert", "kill", "quarantine")
PROTOCOLS = ("tcp", "udp", "any")


def parse(text: str, path: str) -> Policy:
    checker = _Checker(path)
    try:
        root = compose(text)
    except YamlSyntaxError as error:
        raise PolicyError([PolicyProblem(path, error.line, "", error.reason)]) from None
    workloads = checker.policy(root)
    if checker.problems:
        raise PolicyError(sorted(checker.problems, key=lambda problem: problem.line or 0))
    return Policy(version=1, workloads=workloads, path=path, notices=tuple(checker.notices))


def _child(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _unknown_key(name: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {name!r} ({hint}expected one of: {', '.join(allowed)})"


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[PolicyProblem] = []
        self.notices: list[str] = []

    def problem(self, node: Node | None, key: str, reason: str) -> None:
        self.problems.append(PolicyProblem(self.path, line(node) if node is not None else None, key, reason))

    def notice(self, node: Node, key: str, message: str) -> None:
        self.notices.append(str(PolicyProblem(self.path, line(node), key, message)))

    # --- the policy's structure -------------------------------------------------

    def policy(self, root: Node | None) -> tuple[Workload, ...]:
        if root is None:
            self.problem(None, "", "the file is empty: a policy is a mapping with 'version: 1' and 'workloads'")
            return ()
        if not isinstance(root, MappingNode):
            self.problem(
                root, "", f"the top level must be a mapping with 'version' and 'workloads', got {describe(root)}"
            )
            return ()
        fields = self.mapping(root, "", TOP_KEYS)
        self.required(fields, root, "", "version", self.version, None)
        return self.required(fields, root, "", "workloads", self.workloads, ())

    def version(self, node: Node, key: str) -> None:
        if not (is_int(node) and int_value(node) == 1):
            self.problem(node, key, f"must be 1 (the only policy format so far), got {describe(node)}")

    def workloads(self, node: Node, key: str) -> tuple[Workload, ...]:
        if isinstance(node, SequenceNode) and not node.value:
            self.problem(node, key, "must list at least one workload")
        if isinstance(node, SequenceNode) and len(node.value) > values.MAX_WORKLOADS:
            self.problem(node, key, f"lists {len(node.value)} workloads; the kernel's table holds at most "
                                    f"{values.MAX_WORKLOADS}")
        first_lines: dict[str, int] = {}
        found = [self.workload(item, item_key, first_lines) for item_key, item in self.items(node, key)]
        return tuple(workload for workload in found if workload)

    def workload(self, node: Node, key: str, first_lines: dict[str, int]) -> Workload | None:
        if not isinstance(node, MappingNode):
            self.problem(node, key, f"expected a workload (a mapping with 'name' and 'allow'), got {describe(node)}")
            return None
        fields = self.mapping(node, key, WORKLOAD_KEYS)
        return Workload(
            name=self.required(fields, node, key, "name", lambda n, k: self.name(n, k, first_lines), ""),
            mode=self.optional(fields, key, "mode", self.choice(MODES), "enforce"),
            on_violation=self.optional(fields, key, "on_violation", self.choice(VIOLATION_ACTIONS), "deny"),
            match=self.optional(fields, key, "match", self.match, Match(None, (), ())),
            listen=self.optional(fields, key, "listen", self.ports, ()),
            allow=self.required(fields, node, key, "allow", self.allow, ()),
            dns=self.optional(fields, key, "dns", self.dns, DnsConfig()),
            budgets=self.optional(fields, key, "budgets", self.budgets, ()),
            hooks=self.optional(fields, key, "hooks", self.hooks, Hooks()),
            spike=self.optional(fields, key, "spike", self.spike, None),
        )

    def name(self, node: Node, key: str, first_lines: dict[str, int]) -> str:
        name = self.text(node, key, values.workload_name, "")
        if name in first_lines:
            self.problem(node, key, f"duplicate workload name {name!r} (first defined at line {first_lines[name]})")
        elif name:
            first_lines[name] = line(node)
        return name

    def match(self, node: Node, key: str) -> Match:
        fields = self.mapping(node, key, MATCH_KEYS)
        return Match(
            systemd_unit=self.optional(fields, key, "systemd_unit", self.text_check(values.systemd_unit), None),
            exe=self.optional(fields, key, "exe", self.texts_check(values.absolute_path), ()),
            cmdline=self.optional(fields, key, "cmdline", self.texts_check(values.non_empty), ()),
        )

    def allow(self, node: Node, key: str) -> tuple[AllowRule, ...]:
        if isinstance(node, SequenceNode) and not node.value:
            self.problem(node, key, "must list at least one rule (an empty allowlist would refuse all egress)")
        return tuple(self.allow_rule(item, item_key) for item_key, item in self.items(node, key))

    def allow_rule(self, node: Node, key: str) -> AllowRule:
        fields = self.mapping(node, key, RULE_KEYS)
        kind = self.exactly_one(fields, node, key, ("cidr", "fqdn"))
        value = ""
        if kind == "cidr":
            value = self.text(fields["cidr"], _child(key, "cidr"), values.cidr, "")
        elif kind == "fqdn":
            value = self.text(fields["fqdn"], _child(key, "fqdn"), values.fqdn, "")
        return AllowRule(
            kind="fqdn" if kind == "fqdn" else "cidr",
            value=value,
            ports=self.optional(fields, key, "ports", self.ports, ()),
            protocol=self.optional(fields, key, "protocol", self.choice(PROTOCOLS), "any"),
            line=line(node),
        )

    def dns(self, node: Node, key: str) -> DnsConfig:
        fields = self.mapping(node, key, DNS_KEYS)
        return DnsConfig(
            upstream=self.optional(fields, key, "upstream", self.upstream, ("system",)),
            grace_seconds=self.optional(fields, key, "grace_seconds", self.grace, DnsConfig.grace_seconds),
        )

    def grace(self, node: Node, key: str) -> int:
        if not is_int(node):
            self.problem(node, key, f"expected a number of seconds, got {describe(node)}")
            return DnsConfig.grace_seconds
        return self.parsed(node, key, values.dns_grace, int_value(node), DnsConfig.grace_seconds)

    def upstream(self, node: Node, key: str) -> tuple[str, ...]:
        if isinstance(node, SequenceNode) and not node.value:
            self.problem(node, key, "must list at least one resolver, or 'system'")
        return self.texts(node, key, values.dns_upstream)

    def budgets(self, node: Node, key: str) -> tuple[Budget, ...]:
        return tuple(self.budget(item, item_key) for item_key, item in self.items(node, key))

    def budget(self, node: Node, key: str) -> Budget:
        fields = self.mapping(node, key, BUDGET_KEYS)
        target = self.exactly_one(fields, node, key, ("fqdn", "cidr"))
        return Budget(
            fqdn=self.text(fields["fqdn"], _child(key, "fqdn"), values.fqdn, "") if target == "fqdn" else None,
            cidr=self.text(fields["cidr"], _child(key, "cidr"), values.cidr, "") if target == "cidr" else None,
            bytes_per_minute=self.required(fields, node, key, "bytes_per_minute", self.byte_count, 0),
            action=self.optional(fields, key, "action", self.choice(BUDGET_ACTIONS), "alert"),
        )

    def hooks(self, node: Node, key: str) -> Hooks:
        fields = self.mapping(node, key, HOOK_KEYS)
        commands = self.texts_check(values.absolute_path)
        return Hooks(
            on_violation=self.optional(fields, key, "on_violation", commands, ()),
            on_budget=self.optional(fields, key, "on_budget", commands, ()),
        )

    def spike(self, node: Node, key: str) -> Spike:
        fields = self.mapping(node, key, SPIKE_KEYS)
        default = Spike(factor=0)
        return Spike(
            factor=self.required(fields, node, key, "factor", self.factor, 0.0),
            baseline_seconds=self.optional(fields, key, "baseline_seconds", self.seconds, default.baseline_seconds),
            min_rate=self.optional(fields, key, "min_rate", self.byte_count, default.min_rate),
        )

    def factor(self, node: Node, key: str) -> float:
        if isinstance(node, ScalarNode) and node.tag in (INT, FLOAT):
            return self.parsed(node, key, values.factor, node.value, 0.0)
        self.problem(node, key, f"expected a number above 1 (like 5 or 2.5), got {describe(node)}")
        return 0.0

    def seconds(self, node: Node, key: str) -> int:
        if not is_int(node):
            self.problem(node, key, f"expected a whole number of seconds, got {describe(node)}")
            return 0
        return self.parsed(node, key, values.seconds, int_value(node), 0)

    # --- generic checks ---------------------------------------------------------

    def mapping(self, node: Node, key: str, allowed: Sequence[str]) -> dict[str, Node]:
        """The mapping's known fields by name; unknown, duplicate and non-name keys are problems."""
        if not isinstance(node, MappingNode):
            self.problem(node, key, f"expected a mapping, got {describe(node)}")
            return {}
        fields: dict[str, Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.problem(key_node, key, f"a key must be a name, got {describe(key_node)}")
                continue
            name = key_node.value
            if name in key_lines:
                self.problem(key_node, _child(key, name), f"duplicate key (first at line {key_lines[name]})")
                continue
            key_lines[name] = line(key_node)
            if name in allowed:
                fields[name] = value_node
            else:
                self.problem(key_node, _child(key, name), _unknown_key(name, allowed))
        return fields

    def required(
        self, fields: dict[str, Node], parent: Node, key: str, name: str, check: Check[T], placeholder: T
    ) -> T:
        if name not in fields:
            self.problem(parent, _child(key, name), "required key missing")
            return placeholder
        return check(fields[name], _child(key, name))

    def optional(self, fields: dict[str, Node], key: str, name: str, check: Check[T], default: T) -> T:
        return check(fields[name], _child(key, name)) if name in fields else default

    def exactly_one(self, fields: dict[str, Node], parent: Node, key: str, names: tuple[str, str]) -> str | None:
        present = [name for name in names if name in fields]
        if len(present) == 1:
            return present[0]
        found = "both" if present else "neither"
        self.problem(parent, key, f"needs exactly one of '{names[0]}' or '{names[1]}' (found {found})")
        return None

    def items(self, node: Node, key: str) -> list[tuple[str, Node]]:
        if not isinstance(node, SequenceNode):
            self.problem(node, key, f"expected a list, got {describe(node)}")
            return []
        return [(f"{key}[{index}]", item) for index, item in enumerate(node.value)]

    def text(self, node: Node, key: str, parse: Callable[[str], T], placeholder: T) -> T:
        # Plain numbers count as text: a name like 4000 or an address YAML read as a number.
        if not (isinstance(node, ScalarNode) and node.tag in (STR, INT, FLOAT)):
            self.problem(node, key, f"expected a string, got {describe(node)}")
            return placeholder
        return self.parsed(node, key, parse, node.value, placeholder)

    def text_check(self, parse: Callable[[str], Any]) -> Check[Any]:
        return lambda node, key: self.text(node, key, parse, "")

    def texts(self, node: Node, key: str, parse: Callable[[str], str]) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple."""
        if isinstance(node, SequenceNode):
            return tuple(self.text(item, item_key, parse, "") for item_key, item in self.items(node, key))
        return (self.text(node, key, parse, ""),)

    def texts_check(self, parse: Callable[[str], str]) -> Check[tuple[str, ...]]:
        return lambda node, key: self.texts(node, key, parse)

    def choice(self, choices: tuple[str, ...]) -> Check[Any]:
        def check(node: Node, key: str) -> str:
            if is_str(node) and node.value in choices:
                return str(node.value)
            self.problem(node, key, f"must be one of {', '.join(choices)}; got {describe(node)}")
            return choices[0]

        return check

    def ports(self, node: Node, key: str) -> tuple[int, ...]:
        return tuple(self.port(item, item_key) for item_key, item in self.items(node, key))

    def port(self, node: Node, key: str) -> int:
        if not is_int(node):
            self.problem(node, key, f"expected a port number 1-65535, got {describe(node)}")
            return 0
        return self.parsed(node, key, values.port, int_value(node), 0)

    def byte_count(self, node: Node, key: str) -> int:
        if is_int(node):
            return self.parsed(node, key, values.positive_bytes, int_value(node), 0)
        if is_str(node):
            return self.parsed(node, key, values.size, node.value, 0)
        self.problem(node, key, f"expected a number of bytes or a size like '50MB', got {describe(node)}")
        return 0

    def parsed(self, node: Node, key: str, parse: Callable[[Any], T], raw: Any, placeholder: T) -> T:
        try:
            return parse(raw)
        except ValueError as error:
            self.problem(node, key, str(error))
            return placeholder
