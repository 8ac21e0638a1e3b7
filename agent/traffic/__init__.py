"""Outbound traffic of the workloads: the kernel's byte counters turned into per-process and
per-destination totals and rates, byte budgets and the spike detector."""
from .budgets import BudgetCrossing, BudgetWatch
from .meter import DestinationTraffic, NameLookup, ProcessTraffic, TrafficMeter, no_names
from .spikes import Anomaly, SpikeWatch
from .watch import TrafficWatch

__all__ = [
    "Anomaly",
    "BudgetCrossing",
    "BudgetWatch",
    "DestinationTraffic",
    "NameLookup",
    "ProcessTraffic",
    "SpikeWatch",
    "TrafficMeter",
    "TrafficWatch",
    "no_names",
]
