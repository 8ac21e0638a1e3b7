"""One tick of traffic accounting: counters in; totals, rates, budget crossings and spikes out."""
from __future__ import annotations

from typing import Iterable

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
        self.meter.update(changed, {index: spec.name for index, spec in workloads.items()}, now, gone)
        crossings, anomalies = [], []
        for spec in workloads.values():
            destinations = self.meter.destinations(spec.name)
            crossings += self.budgets.check(spec.name, spec.budgets, destinations, now)
            anomalies += self.spikes.check(spec.name, spec.spike, destinations, now)
        self.budgets.forget_workloads_not_in({spec.name for spec in workloads.values()})
        return crossings, anomalies

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
