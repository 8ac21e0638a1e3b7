"""JSON lines for a SIEM shipper: stdout, or a file rotated by size as logrotate's copy would be.

A rotated file moves to PATH.1 (PATH.1 to PATH.2, ...), keeping `keep` old files; a shipper
that follows PATH by name (Filebeat, Vector, Fluent Bit) picks up the new file."""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Iterable

from agent.collector.rows import EventRow
from agent.events.lines import drop_torn_line

log = logging.getLogger("egress_warden.collector")


class JsonLinesOutput:
    def __init__(self, target: str, max_bytes: int = 100 * 2**20, keep: int = 5) -> None:
        """`target` is a file path or "-" for stdout; `max_bytes` 0 never rotates."""
        if max_bytes < 0 or keep < 1:
            raise ValueError("JSON lines rotation needs max_bytes >= 0 and keep >= 1")
        self._path = None if target == "-" else Path(target)
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._stream = sys.stdout.buffer if self._path is None else self._open()

    def _open(self) -> BinaryIO:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        dropped = drop_torn_line(self._path)
        if dropped:
            log.warning("collector: %s ended in %d bytes of a line cut off when the collector was last stopped; "
                        "dropped them (that batch was not stored, so it is written again)", self._path, dropped)
        return open(self._path, "ab")

    def write(self, rows: Iterable[EventRow]) -> None:
        """Writes each row's event as one line, then flushes. A write that a kill cuts short
        leaves part of a line, which the next collector drops before it writes (_open)."""
        data = "".join(row.body + "\n" for row in rows).encode()
        if not data:
            return
        with self._lock:
            if self._path is not None and self._max_bytes and self._stream.tell() > 0 \
                    and self._stream.tell() + len(data) > self._max_bytes:
                self._rotate()
            self._stream.write(data)
            self._stream.flush()

    def _rotate(self) -> None:
        self._stream.close()
        for index in range(self._keep - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{index}")
            if older.exists():
                os.replace(older, self._path.with_name(f"{self._path.name}.{index + 1}"))
        os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))
        self._stream = self._open()

    def close(self) -> None:
        with self._lock:
            if self._path is not None:
                self._stream.close()
