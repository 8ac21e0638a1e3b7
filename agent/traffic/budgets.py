"""Byte budgets (DESIGN.md `budgets`): bytes per minute toward a name or a network.

Each budget keeps the history of its cumulative byte total over the last window; what it
used in the window is the total now minus the total at the window's start. A budget that
crosses its limit is reported once, and again only after it fell back under the limit."""
from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

from agent.dns.names import name_matches
from agent.policy import Budget

from .meter import DestinationTraffic

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class BudgetCrossing:
    workload: str
    budget: Budget
    window_bytes: int
    window_seconds: float
    destinations: tuple[str, ...]  # the labels of the destinations that used the budget

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


class BudgetWatch:
    def __init__(self, window_seconds: float = WINDOW_SECONDS) -> None:
        self.window_seconds = window_seconds
        self._history: dict[tuple[str, Budget], deque[tuple[float, int]]] = {}
        self._over: set[tuple[str, Budget]] = set()

    def check(self, workload: str, budgets: tuple[Budget, ...], destinations: list[DestinationTraffic],
              now: float) -> list[BudgetCrossing]:
        crossings = []
        for budget in budgets:
            covered = [d for d in destinations if budget_covers(budget, d)]
            used = self._window_bytes((workload, budget), sum(d.bytes for d in covered), now)
            key = (workload, budget)
            if used > budget.bytes_per_minute and key not in self._over:
                self._over.add(key)
                crossings.append(BudgetCrossing(workload, budget, used, self.window_seconds,
                                                tuple(d.label for d in covered)))
            elif used <= budget.bytes_per_minute:
                self._over.discard(key)
        self._forget_budgets_not_in(workload, budgets)
        return crossings

    def _window_bytes(self, key: tuple[str, Budget], total: int, now: float) -> int:
        history = self._history.setdefault(key, deque())
        if history and total < history[-1][1]:
            history.clear()  # counters evicted from the kernel's LRU: start afresh
        history.append((now, total))
        # Keep one sample at or before the window's start: it is the baseline.
        while len(history) > 1 and history[1][0] <= now - self.window_seconds:
            history.popleft()
        return total - history[0][1]

    def _forget_budgets_not_in(self, workload: str, budgets: tuple[Budget, ...]) -> None:
        for key in [k for k in self._history if k[0] == workload and k[1] not in budgets]:
            del self._history[key]
            self._over.discard(key)
