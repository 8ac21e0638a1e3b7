"""One tick of traffic accounting: counters in; totals, rates, budget crossings and spikes out."""
from __future__ import annotations

from typing import Any, Iterable

from agent.kernel.loader import TrafficCounter
from agent.policy import Workload

from .budgets import BudgetCrossing, BudgetWatch
from .meter import DestinationTraffic, NameLookup, ProcessTraffic, TrafficMeter, no_names
from .spikes import Anomaly, SpikeWatch


class TrafficWatch:
    def __init__(self, names: NameLookup = no_names) -> None:
        self.meter = TrafficMeter(names)
        self.budgets = BudgetWatch()
        self.spikes = SpikeWatch()

    def tick(self, changed: Iterable[TrafficCounter], workloads: dict[int, Workload], now: float,
             gone: Iterable[TrafficCounter] = ()) -> tuple[list[BudgetCrossing], list[Anomaly]]:
        """`changed` and `gone` as TrafficMeter.update takes them; `workloads`: the policy's
        workloads by kernel index."""
        rates_known = self.meter.has_rates  # the first tick has totals, not rates
        self.meter.update(changed, {index: spec.name for index, spec in workloads.items()}, now, gone)
        crossings, anomalies = [], []
        for spec in workloads.values():
            destinations = self.meter.destinations(spec.name)
            crossings += self.budgets.check(spec.name, spec.budgets, destinations, now, self.meter.retired(spec.name))
            if rates_known:
                anomalies += self.spikes.check(spec.name, spec.spike, destinations, now)
        names = {spec.name for spec in workloads.values()}
        self.budgets.forget_workloads_not_in(names)
        self.spikes.forget_workloads_not_in(names)
        return crossings, anomalies

    def kept(self, to_wall: float) -> dict[str, dict[str, Any]]:
        """Per workload, what its budgets and its spike detector learned over time (their
        kept(), times moved to the wall clock by `to_wall`)."""
        budgets, spikes = self.budgets.kept(to_wall), self.spikes.kept(to_wall)
        return {workload: {"budgets": budgets.get(workload, {"windows": [], "over": []}),
                           "spikes": spikes.get(workload, [])} for workload in budgets.keys() | spikes.keys()}

    def restore(self, kept: dict[str, dict[str, Any]], to_wall: float) -> None:
        """At start, what kept() gave: all of it or, when any of it is malformed (ValueError,
        KeyError, TypeError), none."""
        budgets, spikes = BudgetWatch(self.budgets.window_seconds), SpikeWatch()
        budgets.restore({workload: state["budgets"] for workload, state in kept.items()}, to_wall)
        spikes.restore({workload: state["spikes"] for workload, state in kept.items()}, to_wall)
        self.budgets, self.spikes = budgets, spikes

    def processes(self) -> list[ProcessTraffic]:
        return self.meter.processes()

    def destinations(self, workload: str) -> list[DestinationTraffic]:
        return self.meter.destinations(workload)

    def top_processes(self, workload: str, labels: Iterable[str], limit: int = 5) -> list[dict]:
        """The processes that sent most toward the given destinations: who used a budget."""
        wanted = set(labels)
        found = []
        for process in self.meter.processes():
            if process.workload != workload:
                continue
            sent = sum(d.bytes for d in process.destinations if d.label in wanted)
            if sent:
                found.append({"pid": process.pid, "comm": process.comm, "bytes": sent})
        return sorted(found, key=lambda p: -p["bytes"])[:limit]
