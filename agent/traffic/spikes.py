"""The spike detector: a workload's rate toward one destination far above its own baseline.

The baseline is an exponentially weighted average of the workload's rate toward that
destination, with a time constant of the policy's `spike.baseline_seconds`. A destination
is judged only after it has been watched for that long (a new destination has no
baseline), and a rate is a spike when it is above `factor` times the baseline and above
`min_rate`. A spike is reported once, and again only after the rate came back down."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from agent.policy import Spike

from .meter import DestinationTraffic


@dataclass(frozen=True)
class Anomaly:
    workload: str
    destination: DestinationTraffic
    rate: float
    baseline: float
    factor: float


@dataclass
class _Baseline:
    since: float
    updated: float
    rate: float = 0.0
    spiking: bool = False


class SpikeWatch:
    def __init__(self) -> None:
        self._baselines: dict[tuple[str, str], _Baseline] = {}

    def check(self, workload: str, spike: Spike | None, destinations: list[DestinationTraffic],
              now: float) -> list[Anomaly]:
        if spike is None:
            return []
        anomalies = []
        for destination in destinations:
            key = (workload, destination.label)
            baseline = self._baselines.get(key)
            if baseline is None:
                self._baselines[key] = _Baseline(since=now, updated=now, rate=destination.rate)
                continue
            warmed_up = now - baseline.since >= spike.baseline_seconds
            above = destination.rate >= spike.min_rate and destination.rate > spike.factor * baseline.rate
            if warmed_up and above and not baseline.spiking:
                anomalies.append(Anomaly(workload, destination, destination.rate, baseline.rate, spike.factor))
            baseline.spiking = warmed_up and above
            weight = min((now - baseline.updated) / spike.baseline_seconds, 1.0)
            baseline.rate += weight * (destination.rate - baseline.rate)
            baseline.updated = now
        return anomalies

    def forget_workloads_not_in(self, workloads: set[str]) -> None:
        self._baselines = {key: b for key, b in self._baselines.items() if key[0] in workloads}

    def kept(self, to_wall: float) -> dict[str, list[dict[str, Any]]]:
        """Per workload, its baselines, their times moved to the wall clock by `to_wall`: a
        restarted agent that began them again would let a router spike unseen while they warm up."""
        kept: dict[str, list[dict[str, Any]]] = {}
        for (workload, destination), b in self._baselines.items():
            kept.setdefault(workload, []).append({**dataclasses.asdict(b), "destination": destination,
                                                  "since": round(b.since + to_wall, 3),
                                                  "updated": round(b.updated + to_wall, 3)})
        return kept

    def restore(self, kept: dict[str, list[dict[str, Any]]], to_wall: float) -> None:
        """Takes what kept() gave."""
        baselines = {(workload, str(b["destination"])): _Baseline(float(b["since"]) - to_wall,
                                                                  float(b["updated"]) - to_wall, float(b["rate"]),
                                                                  bool(b["spiking"]))
                     for workload, kept_baselines in kept.items() for b in kept_baselines}
        self._baselines.update(baselines)
