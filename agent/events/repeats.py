"""Identical repeated verdicts folded into one event that carries their exact count.

A router stuck in a retry loop against a denied destination makes tens of thousands of
identical refusals a second. The first of a kind (same workload, process, hook, verdict,
destination) is published at once, as always; identical ones in the next WINDOW seconds
are only counted, and one event then says how many (detail.count, with repeat_of naming
the first event's seq). So the sum over events of detail.count (1 where absent) is exactly
the number of kernel refusals, and a subscriber learns of a new kind of refusal without
delay while a flood costs the agent a counter increment per refusal."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Hashable

from agent.events.model import Event

WINDOW_SECONDS = 0.5


@dataclass
class _Window:
    first: Event
    opened: float
    count: int = 0
    first_time: float = 0.0
    last_time: float = 0.0


@dataclass
class RepeatFolder:
    window: float = WINDOW_SECONDS
    _open: dict[Hashable, _Window] = field(default_factory=dict)
    _closed: list[_Window] = field(default_factory=list)

    def absorb(self, key: Hashable) -> bool:
        """True when this verdict repeats one published less than a window ago: counted, not published."""
        window = self._open.get(key)
        if window is None:
            return False
        now = time.monotonic()
        if now - window.opened >= self.window:
            self._closed.append(self._open.pop(key))
            return False
        window.count += 1
        window.last_time = time.time()
        window.first_time = window.first_time or window.last_time
        return True

    def track(self, key: Hashable, published: Event) -> None:
        """`published` opens a window: identical verdicts after it are counted."""
        self._open[key] = _Window(published, time.monotonic())

    def due(self, everything: bool = False) -> list[Event]:
        """One summary event per window that is over (every window, with `everything`)
        and absorbed at least one repeat."""
        now = time.monotonic()
        for key in [k for k, w in self._open.items() if everything or now - w.opened >= self.window]:
            self._closed.append(self._open.pop(key))
        closed, self._closed = self._closed, []
        return [self._summary(w) for w in closed if w.count]

    def _summary(self, window: _Window) -> Event:
        first = window.first
        detail = {k: v for k, v in first.detail.items() if k != "thread"}
        detail.update(count=window.count, repeat_of=first.seq, first_time=window.first_time,
                      last_time=window.last_time,
                      folded=f"identical to event {first.seq}, within {self.window:g} s after it")
        return replace(first, detail=detail, seq=0, time=0.0, agent="")
