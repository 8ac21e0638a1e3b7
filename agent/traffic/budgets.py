"""Byte budgets (DESIGN.md `budgets`): bytes per minute toward a name or a network.

Each budget keeps the history of its cumulative byte total over the last window; what it
used in the window is the total now minus the total at the window's start. A budget that
crosses its limit is reported once, and again only after it fell back under the limit.
Budgets that cover the same destinations share one history, so a reload that changes only a
limit or an action keeps the window, and so does a restarted agent (record.py)."""
from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.dns.names import name_matches
from agent.policy import Budget

from .meter import DestinationTraffic

WINDOW_SECONDS = 60.0

# What a budget counts: (fqdn, cidr).
Cover = tuple["str | None", "str | None"]


@dataclass(frozen=True)
class BudgetCrossing:
    workload: str
    budget: Budget
    window_bytes: int
    window_seconds: float
    destinations: tuple[str, ...]  # the labels of the destinations that used the budget
    # Set when more than a window passed unwatched (no agent ran): what was sent meanwhile,
    # of which some window must have carried window_bytes.
    unwatched_seconds: float | None = None
    unwatched_bytes: int | None = None

    @property
    def target(self) -> str:
        return self.budget.fqdn or self.budget.cidr or ""


def budget_covers(budget: Budget, destination: DestinationTraffic) -> bool:
    if destination.listen or destination.address is None:
        return False
    if budget.cidr:
        address = ipaddress.ip_address(destination.address)
        return address in ipaddress.ip_network(budget.cidr)
    return destination.fqdn is not None and name_matches(budget.fqdn, destination.fqdn)


def _cover(budget: Budget) -> Cover:
    return budget.fqdn, budget.cidr


@dataclass(frozen=True)
class _Used:
    bytes: int
    unwatched_seconds: float | None = None
    unwatched_bytes: int | None = None


class BudgetWatch:
    def __init__(self, window_seconds: float = WINDOW_SECONDS) -> None:
        self.window_seconds = window_seconds
        self._history: dict[tuple[str, Cover], deque[tuple[float, int]]] = {}
        self._over: set[tuple[str, Budget]] = set()
        self._used: dict[tuple[str, Cover], int] = {}  # as of the last check

    def check(self, workload: str, budgets: tuple[Budget, ...], destinations: list[DestinationTraffic],
              now: float, retired: list[DestinationTraffic] = ()) -> list[BudgetCrossing]:
        """`retired`: what counters evicted since the last check held (TrafficMeter.retired)."""
        crossings, used_by_cover = [], {}
        for budget in budgets:
            covered = [d for d in destinations if budget_covers(budget, d)]
            cover = _cover(budget)
            if cover not in used_by_cover:
                left = sum(d.bytes for d in retired if budget_covers(budget, d))
                used_by_cover[cover] = self._window_bytes((workload, cover), sum(d.bytes for d in covered), now,
                                                          left)
                self._used[(workload, cover)] = used_by_cover[cover].bytes
            used, key = used_by_cover[cover], (workload, budget)
            if used.bytes > budget.bytes_per_minute and key not in self._over:
                self._over.add(key)
                crossings.append(BudgetCrossing(workload, budget, used.bytes, self.window_seconds,
                                                tuple(d.label for d in covered), used.unwatched_seconds,
                                                used.unwatched_bytes))
            elif used.bytes <= budget.bytes_per_minute:
                self._over.discard(key)
        self._forget_budgets_not_in(workload, budgets)
        return crossings

    def _window_bytes(self, key: tuple[str, Cover], total: int, now: float, retired: int = 0) -> _Used:
        history = self._history.setdefault(key, deque())
        if retired:
            # Evicted counters took their bytes out of the total, not out of what was sent: the
            # samples lose them too, so the window keeps what it held (an idle counter's eviction,
            # which a router can cause by forking, once restarted the window from nothing).
            history = self._history[key] = deque((at, sent - retired) for at, sent in history)
        if history and total < history[-1][1]:
            history.clear()  # a reboot emptied the kernel's counters: start afresh
        if history and now - history[-1][0] > self.window_seconds:
            return self._after_unwatched_gap(history, total, now)
        history.append((now, total))
        # Keep one sample at or before the window's start: it is the baseline.
        while len(history) > 1 and history[1][0] <= now - self.window_seconds:
            history.popleft()
        return _Used(total - history[0][1])

    def _after_unwatched_gap(self, history: deque[tuple[float, int]], total: int, now: float) -> _Used:
        """More than a window since the last sample (the agent was down): what was sent in
        between is known only as a sum. Split the gap into whole windows and one of them
        carried at least its share, so that share is what is judged: a budget is crossed only
        when it certainly was, and a long routine downtime kills no router. The next window
        starts from now."""
        last_time, last_total = history[-1]
        gap, sent = now - last_time, total - last_total
        history.clear()
        history.append((now, total))
        return _Used(-(-sent // math.ceil(gap / self.window_seconds)), round(gap, 1), sent)

    def _forget_budgets_not_in(self, workload: str, budgets: tuple[Budget, ...]) -> None:
        covers = {_cover(b) for b in budgets}
        for key in [k for k in self._history if k[0] == workload and k[1] not in covers]:
            del self._history[key]
            self._used.pop(key, None)
        self._over -= {k for k in self._over if k[0] == workload and k[1] not in budgets}

    def used(self, workload: str, budget: Budget) -> int | None:
        """What the budget's window held at the last check; None before the first."""
        return self._used.get((workload, _cover(budget)))

    def forget_workloads_not_in(self, workloads: set[str]) -> None:
        """A workload gone from the policy loses its windows (it may come back much later)."""
        for key in [k for k in self._history if k[0] not in workloads]:
            del self._history[key]
            self._used.pop(key, None)
        self._over = {k for k in self._over if k[0] in workloads}

    def kept(self, to_wall: float) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Per workload, its windows' samples and the budgets over their limit: what a restarted
        agent needs to go on where this one stopped. `to_wall`: what turns this watch's clock
        into the wall clock (added to every time)."""
        kept: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for (workload, (fqdn, cidr)), history in self._history.items():
            windows = kept.setdefault(workload, {"windows": [], "over": []})["windows"]
            windows.append({"fqdn": fqdn, "cidr": cidr, "samples": [[round(t + to_wall, 3), total]
                                                                    for t, total in history]})
        for workload, budget in self._over:
            kept.setdefault(workload, {"windows": [], "over": []})["over"].append(dataclasses.asdict(budget))
        return kept

    def restore(self, kept: dict[str, dict[str, list[dict[str, Any]]]], to_wall: float) -> None:
        """Takes what kept() gave."""
        history = {(workload, (window["fqdn"], window["cidr"])): deque((float(t) - to_wall, int(total))
                                                                      for t, total in window["samples"])
                   for workload, state in kept.items() for window in state["windows"]}
        over = {(workload, Budget(**budget)) for workload, state in kept.items() for budget in state["over"]}
        self._history.update(history)
        self._over |= over
