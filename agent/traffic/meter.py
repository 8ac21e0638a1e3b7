"""Totals and rates from the kernel's cumulative counters (bpf/warden.bpf.c `traffic`).

The kernel counts per (workload index, tgid, destination address, port, protocol); a
TrafficMeter is given every counter at each tick and keeps the previous tick's values, so
a rate is the growth between two ticks divided by the time between them."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from agent.kernel.loader import TrafficCounter

# The DNS proxy's answer to "which name did this address come from"; None when not known.
NameLookup = Callable[[str], "str | None"]

_PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
                   socket.IPPROTO_ICMPV6: "icmpv6"}


def no_names(_address: str) -> str | None:
    """The name lookup until the DNS proxy provides one: addresses stay addresses."""
    return None


def protocol_name(number: int) -> str:
    return _PROTOCOL_NAMES.get(number, str(number))


@dataclass(frozen=True)
class TrafficSample:
    """One kernel counter at one tick, with its workload named and its rate computed."""

    workload: str
    tgid: int
    address: str | None  # None: replies to clients on a listen port
    port: int
    protocol: str
    listen: bool
    bytes: int
    packets: int
    rate: float  # bytes per second since the previous tick (0 on the first)

    @property
    def destination_key(self) -> tuple[str | None, int, str, bool]:
        return (self.address, self.port, self.protocol, self.listen)


@dataclass
class DestinationTraffic:
    address: str | None
    port: int
    protocol: str
    fqdn: str | None
    listen: bool
    bytes: int
    packets: int
    rate: float

    @property
    def label(self) -> str:
        """How metrics and events name it: the DNS name when known, else the address."""
        if self.listen:
            return f"listen:{self.port}"
        return self.fqdn or self.address or "unknown"


@dataclass
class ProcessTraffic:
    """What one process of a workload sent, per destination. pid 0 gathers sockets whose
    process no hook saw (opened before enforcement began, or replies on listen ports)."""

    pid: int
    comm: str | None
    workload: str
    destinations: list[DestinationTraffic] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.destinations)

    @property
    def rate(self) -> float:
        return sum(d.rate for d in self.destinations)


class TrafficMeter:
    def __init__(self, names: NameLookup = no_names) -> None:
        self.names = names
        self.samples: list[TrafficSample] = []
        self._previous: dict[tuple, int] = {}
        self._previous_time: float | None = None
        self._comms: dict[int, str] = {}

    def update(self, counters: Iterable[TrafficCounter], workload_names: dict[int, str], now: float) -> None:
        """Take a new tick. Counters of workload indexes not in `workload_names` (gone from
        the policy) are left out."""
        elapsed = now - self._previous_time if self._previous_time is not None else 0.0
        samples, current = [], {}
        for c in counters:
            workload = workload_names.get(c.workload)
            if workload is None:
                continue
            key = (c.workload, c.tgid, c.address, c.port, c.protocol, c.listen)
            current[key] = c.bytes
            grown = c.bytes - self._previous.get(key, c.bytes if elapsed == 0 else 0)
            rate = max(grown, 0) / elapsed if elapsed > 0 else 0.0
            samples.append(TrafficSample(workload, c.tgid, c.address, c.port, protocol_name(c.protocol),
                                         c.listen, c.bytes, c.packets, rate))
        self.samples, self._previous, self._previous_time = samples, current, now

    def processes(self) -> list[ProcessTraffic]:
        by_process: dict[tuple[str, int], ProcessTraffic] = {}
        for s in self.samples:
            process = by_process.get((s.workload, s.tgid))
            if process is None:
                process = by_process[(s.workload, s.tgid)] = ProcessTraffic(s.tgid, self._comm(s.tgid), s.workload)
            process.destinations.append(self.destination(s))
        for process in by_process.values():
            process.destinations.sort(key=lambda d: -d.bytes)
        return sorted(by_process.values(), key=lambda p: (p.workload, -p.bytes))

    def destinations(self, workload: str) -> list[DestinationTraffic]:
        """The workload's traffic per destination, all its processes together."""
        merged: dict[tuple, DestinationTraffic] = {}
        for s in self.samples:
            if s.workload != workload:
                continue
            known = merged.get(s.destination_key)
            if known is None:
                merged[s.destination_key] = self.destination(s)
            else:
                known.bytes += s.bytes
                known.packets += s.packets
                known.rate += s.rate
        return sorted(merged.values(), key=lambda d: -d.bytes)

    def destination(self, s: TrafficSample) -> DestinationTraffic:
        fqdn = self.names(s.address) if s.address else None
        return DestinationTraffic(s.address, s.port, s.protocol, fqdn, s.listen, s.bytes, s.packets, s.rate)

    def _comm(self, tgid: int) -> str | None:
        """The process's name, remembered after it exits."""
        if tgid == 0:
            return None
        try:
            self._comms[tgid] = Path(f"/proc/{tgid}/comm").read_text().strip()
        except OSError:
            pass
        return self._comms.get(tgid)
