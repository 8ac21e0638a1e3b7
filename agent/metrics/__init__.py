"""The Prometheus endpoint (`warden agent --metrics-listen`): bytes by workload and
destination, events by kind, verdicts, actions, ring-buffer losses, hook outcomes, and each
budget's window against its limit (to alert before a budget's action is taken).

Label sets stay bounded: workloads come from the policy, and each workload names at most
MAX_DESTINATIONS destinations, the first ones it sent to; the rest are summed as "other".
A destination keeps its label once given, so every series only grows."""
from __future__ import annotations

import ipaddress
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.events import Event, EventKind
from agent.policy import Budget
from agent.traffic import DestinationTraffic

MAX_DESTINATIONS = 20
OTHER = "other"
PREFIX = "egress_warden"

# workload name -> its traffic per destination
TrafficSource = Callable[[], dict[str, list[DestinationTraffic]]]
# (workload, budget, bytes in its window now)
BudgetSource = Callable[[], list[tuple[str, Budget, int]]]

_VERDICT_KINDS = {EventKind.EGRESS_DENIED: "deny", EventKind.EGRESS_OBSERVED: "observe"}


def parse_listen(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:9464', '[::1]:9464' or 'off' (None)."""
    if text == "off":
        return None
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (like 127.0.0.1:9464 or [::1]:9464) or 'off'") from None
    if not colon or not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    return host, number


class Metrics:
    def __init__(self, traffic: TrafficSource, lost_records: Callable[[], int], budgets: BudgetSource,
                 max_destinations: int = MAX_DESTINATIONS) -> None:
        self.registry = CollectorRegistry()
        self._events = Counter(f"{PREFIX}_events", "Events published, by kind.", ["kind"], registry=self.registry)
        self._verdicts = Counter(f"{PREFIX}_verdicts", "Egress refused (deny) or let through in monitor mode "
                                 "(observe), by workload.", ["workload", "verdict"], registry=self.registry)
        self._actions = Counter(f"{PREFIX}_actions", "Actions taken on workloads.", ["workload", "action"],
                                registry=self.registry)
        self._hooks = Counter(f"{PREFIX}_hook_runs", "Hook executables run, by how they ended "
                              "(ok, failed, timeout, error, cancelled).", ["workload", "hook", "outcome"], registry=self.registry)
        self.registry.register(_TrafficCollector(traffic, lost_records, budgets, max_destinations))
        self._server = None

    def observe(self, event: Event) -> None:
        """An EventBus sink."""
        self._events.labels(event.kind.value).inc()
        workload = event.workload or ""
        if event.kind in _VERDICT_KINDS:
            self._verdicts.labels(workload, _VERDICT_KINDS[event.kind]).inc()
        if event.action:
            self._actions.labels(workload, event.action).inc()
        if event.kind == EventKind.HOOK_FINISHED:
            self._hooks.labels(workload, event.detail["hook"], event.detail["outcome"]).inc()

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Start serving on a thread of its own; returns the address bound (port 0: any free one)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[:2]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _TrafficCollector:
    """Reads the agent's latest traffic tick at scrape time."""

    def __init__(self, traffic: TrafficSource, lost_records: Callable[[], int], budgets: BudgetSource,
                 max_destinations: int) -> None:
        self._traffic = traffic
        self._lost_records = lost_records
        self._budgets = budgets
        self._max = max_destinations
        self._labels: dict[str, set[str]] = {}

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        sent = CounterMetricFamily(f"{PREFIX}_sent_bytes", "Bytes the workload's processes sent (IP packets "
                                   "with headers), by destination: DNS name, address, or listen:PORT for replies "
                                   "to its clients.", labels=["workload", "destination"])
        packets = CounterMetricFamily(f"{PREFIX}_sent_packets", "Packets sent, as sent_bytes.",
                                      labels=["workload", "destination"])
        rate = GaugeMetricFamily(f"{PREFIX}_send_rate_bytes_per_second", "Send rate over the last tick.",
                                 labels=["workload", "destination"])
        for workload, destinations in self._traffic().items():
            for label, (total, count, per_second) in self._fold(workload, destinations).items():
                sent.add_metric([workload, label], total)
                packets.add_metric([workload, label], count)
                rate.add_metric([workload, label], per_second)
        lost = CounterMetricFamily(f"{PREFIX}_ringbuf_lost_records", "Kernel records the ring buffer had no "
                                   "room for.")
        lost.add_metric([], self._lost_records())
        return [sent, packets, rate, lost, *self._budget_families()]

    def _budget_families(self) -> list[GaugeMetricFamily]:
        labels = ["workload", "budget", "action"]
        used = GaugeMetricFamily(f"{PREFIX}_budget_window_bytes", "Bytes a budget's window holds now: what the "
                                 "workload sent toward its name or network in the last minute.", labels=labels)
        limit = GaugeMetricFamily(f"{PREFIX}_budget_limit_bytes", "A budget's bytes_per_minute: past it, the "
                                  "budget's action is taken.", labels=labels)
        for workload, budget, window_bytes in self._budgets():
            budget_labels = [workload, budget.fqdn or budget.cidr or "", budget.action]
            used.add_metric(budget_labels, window_bytes)
            limit.add_metric(budget_labels, budget.bytes_per_minute)
        return [used, limit]

    def _fold(self, workload: str, destinations: list[DestinationTraffic]) -> dict[str, tuple[int, int, float]]:
        named = self._labels.setdefault(workload, set())
        folded: dict[str, tuple[int, int, float]] = {}
        for d in destinations:
            label = d.label
            if label not in named and len(named) < self._max:
                named.add(label)
            if label not in named:
                label = OTHER
            total, count, per_second = folded.get(label, (0, 0, 0.0))
            folded[label] = (total + d.bytes, count + d.packets, per_second + d.rate)
        return folded
