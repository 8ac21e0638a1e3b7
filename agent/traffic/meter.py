"""Totals and rates from the kernel's cumulative counters (bpf/warden.bpf.c `traffic`).

The kernel counts per (workload index, tgid, destination address, port, protocol); a
TrafficMeter is given, at each tick, the counters that changed since the one before, so a
rate is the growth between two ticks divided by the time between them. A tick costs what
changed, not what the kernel holds: a busy host's map fills up (65,536 counters) with
processes and addresses long gone quiet."""
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


# A counter: (workload index, tgid, address, port, protocol number, listen); a destination
# within a workload: the counter's key from its address on.
CounterKey = tuple
DestinationKey = tuple


@dataclass(slots=True)
class _Totals:
    """A counter's or a destination's bytes and packets as of the last tick, and its rate."""

    bytes: int
    packets: int
    rate: float = 0.0  # bytes per second since the previous tick (0 on the first)
    counters: int = 0  # of a destination: how many counters it gathers


class TrafficMeter:
    def __init__(self, names: NameLookup = no_names) -> None:
        self.names = names
        self._counters: dict[CounterKey, _Totals] = {}
        self._destinations: dict[int, dict[DestinationKey, _Totals]] = {}  # by workload index
        self._moving: set[CounterKey] = set()  # counters whose rate is not 0
        self._moving_destinations: set[tuple[int, DestinationKey]] = set()
        self._workload_names: dict[int, str] = {}
        self._previous_time: float | None = None
        self._comms: dict[int, str] = {}
        self._retired: dict[tuple[int, DestinationKey], _Totals] = {}  # by the last tick's evictions

    @property
    def has_rates(self) -> bool:
        """Whether the next tick gives rates: it is not the first."""
        return self._previous_time is not None

    def update(self, changed: Iterable[TrafficCounter], workload_names: dict[int, str], now: float,
               gone: Iterable[TrafficCounter] = ()) -> None:
        """Take a new tick. `changed`: the counters new or grown since the last tick (giving an
        unchanged one too does no harm); every other keeps its totals and its rate drops to 0.
        `gone`: counters the kernel no longer holds (evicted from its LRU map). Counters of
        workload indexes not in `workload_names` (gone from the policy) are kept but left out
        of what the meter reports. A destination's totals move by what its counters moved, so
        a tick costs what changed."""
        elapsed = now - self._previous_time if self._previous_time is not None else 0.0
        self._retired = {}
        for c in gone:
            key = _key(c)
            if key in self._counters:
                self._retire(key)
        touched, moving, grown_by_destination = set(), set(), {}
        for c in changed:
            key = _key(c)
            totals = self._counters.get(key)
            if totals and c.bytes < totals.bytes:  # evicted and counted afresh between two reads
                self._retire(key)
                totals = None
            start = totals.bytes if totals else (c.bytes if elapsed == 0 else 0)
            grown = max(c.bytes - start, 0)
            if totals:
                destination = self._add_to_destination(key, c.bytes - totals.bytes, c.packets - totals.packets, 0)
                totals.bytes, totals.packets = c.bytes, c.packets
            else:
                destination = self._add_to_destination(key, c.bytes, c.packets, 1)
                totals = self._counters[key] = _Totals(c.bytes, c.packets)
            totals.rate = grown / elapsed if elapsed > 0 else 0.0
            grown_by_destination[destination] = grown_by_destination.get(destination, 0) + grown
            touched.add(key)
            if totals.rate:
                moving.add(key)
        for key in self._moving - touched:
            self._counters[key].rate = 0.0
        self._moving = moving
        self._rate_destinations(grown_by_destination, elapsed)
        self._workload_names, self._previous_time = dict(workload_names), now

    def _retire(self, key: CounterKey) -> None:
        """A counter the kernel evicted: its bytes leave the destination's total, and are
        kept for the tick as retired (a budget's window must not take them for bytes unsent)."""
        totals = self._counters.pop(key)
        self._moving.discard(key)
        index, destination = self._add_to_destination(key, -totals.bytes, -totals.packets, -1)
        retired = self._retired.setdefault((index, destination), _Totals(0, 0))
        retired.bytes += totals.bytes
        retired.packets += totals.packets

    def _add_to_destination(self, key: CounterKey, sent: int, packets: int,
                            counters: int) -> tuple[int, DestinationKey]:
        index, destination = key[0], key[2:]
        by_destination = self._destinations.setdefault(index, {})
        totals = by_destination.get(destination)
        if totals is None:
            totals = by_destination[destination] = _Totals(0, 0)
        totals.bytes += sent
        totals.packets += packets
        totals.counters += counters
        if not totals.counters:
            del by_destination[destination]
            self._moving_destinations.discard((index, destination))
        return index, destination

    def _rate_destinations(self, grown_by_destination: dict[tuple[int, DestinationKey], int], elapsed: float) -> None:
        for index, destination in self._moving_destinations - grown_by_destination.keys():
            self._destinations[index][destination].rate = 0.0
        self._moving_destinations = set()
        for (index, destination), grown in grown_by_destination.items():
            totals = self._destinations[index][destination]
            totals.rate = grown / elapsed if elapsed > 0 else 0.0
            if totals.rate:
                self._moving_destinations.add((index, destination))

    def processes(self) -> list[ProcessTraffic]:
        by_process: dict[tuple[str, int], ProcessTraffic] = {}
        for key, totals in self._counters.items():
            workload = self._workload_names.get(key[0])
            if workload is None:
                continue
            tgid = key[1]
            process = by_process.get((workload, tgid))
            if process is None:
                process = by_process[(workload, tgid)] = ProcessTraffic(tgid, self._comm(tgid), workload)
            process.destinations.append(self._destination(key[2:], totals))
        for process in by_process.values():
            process.destinations.sort(key=lambda d: -d.bytes)
        return sorted(by_process.values(), key=lambda p: (p.workload, -p.bytes))

    def destinations(self, workload: str) -> list[DestinationTraffic]:
        """The workload's traffic per destination, all its processes together."""
        found = [self._destination(destination, totals)
                 for index, name in self._workload_names.items() if name == workload
                 for destination, totals in self._destinations.get(index, {}).items()]
        return sorted(found, key=lambda d: -d.bytes)

    def retired(self, workload: str) -> list[DestinationTraffic]:
        """Per destination, the bytes of the workload's counters evicted at the last tick."""
        return [self._destination(destination, totals)
                for (index, destination), totals in self._retired.items()
                if self._workload_names.get(index) == workload]

    def _destination(self, destination: DestinationKey, totals: _Totals) -> DestinationTraffic:
        address, port, protocol, listen = destination
        fqdn = self.names(address) if address else None
        return DestinationTraffic(address, port, protocol_name(protocol), fqdn, listen, totals.bytes, totals.packets,
                                  totals.rate)

    def _comm(self, tgid: int) -> str | None:
        """The process's name, remembered after it exits."""
        if tgid == 0:
            return None
        try:
            self._comms[tgid] = Path(f"/proc/{tgid}/comm").read_text().strip()
        except OSError:
            pass
        return self._comms.get(tgid)


def _key(c: TrafficCounter) -> CounterKey:
    return (c.workload, c.tgid, c.address, c.port, c.protocol, c.listen)
