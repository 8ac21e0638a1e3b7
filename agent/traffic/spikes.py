"""The spike detector: a workload's rate toward one destination far above its own baseline.

The baseline is an exponentially weighted average of the workload's rate toward that
destination, with a time constant of the policy's `spike.baseline_seconds`. A destination
is judged only after it has been watched for that long (a new destination has no
baseline), and a rate is a spike when it is above `factor` times the baseline and above
`min_rate`. A spike is reported once, and again only after the rate came back down."""
from __future__ import annotations

from dataclasses import dataclass

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
