"""Publishes events: stamps seq, time and agent id, then hands each event to every sink
in order: the spool first, then the log file. Publishing is serialised, so every sink
sees events in seq order, whichever thread (kernel loop, API call) publishes."""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from agent.events.lines import LinesOutput
from agent.events.model import Event
from agent.events.sequence import SequenceAllocator

Sink = Callable[[Event], None]


class EventBus:
    def __init__(self, agent_id: str, state_dir: Path) -> None:
        self.agent_id = agent_id
        self._seq = SequenceAllocator(state_dir)
        self._sinks: list[Sink] = []
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # events published per kind since the agent started

    @property
    def first_seq(self) -> int:
        """The first seq this run hands out (the spool records what lies before it)."""
        return self._seq.first

    def subscribe(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def publish(self, event: Event) -> Event:
        with self._lock:
            event.seq = self._seq.next()
            event.time = time.time()
            event.agent = self.agent_id
            for sink in self._sinks:
                sink(event)
            self.counts[event.kind.value] += 1
        return event


class JsonLinesSink:
    """One JSON object per line, flushed per event so a reader never waits on a buffer."""

    def __init__(self, output: LinesOutput) -> None:
        self._output = output

    def __call__(self, event: Event) -> None:
        self._output.write(event.to_json() + "\n")
