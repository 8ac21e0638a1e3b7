"""Publishes events: stamps seq, time and agent id, then hands each event to every sink
in order: the spool first, then the log file. Publishing is serialised, so every sink
sees events in seq order, whichever thread (kernel loop, API call) publishes."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from agent.events.lines import LinesOutput
from agent.events.model import Event
from agent.events.sequence import SequenceAllocator

Sink = Callable[[Event], None]
log = logging.getLogger("egress_warden")


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
    """One JSON object per line, flushed per event so a reader never waits on a buffer. A write
    that fails (a full disk, a reader's pipe closed) loses the line here only: the spool, the
    sink before this one, holds the event, and the agent must go on to act on it."""

    def __init__(self, output: LinesOutput) -> None:
        self._output = output
        self._failed = 0  # events not written since the last that was

    def __call__(self, event: Event) -> None:
        try:
            self._output.write(event.to_json() + "\n")
        except OSError as e:
            if not self._failed:
                log.error("events file: cannot write (%s); every event is still in the spool (`warden events`)", e)
            self._failed += 1
            return
        if self._failed:
            log.warning("events file: writing again; %d event(s) before this one are in the spool only", self._failed)
            self._failed = 0
