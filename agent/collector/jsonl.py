"""The collector's JSON lines for a SIEM shipper: each stored event once more, as a line."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from agent.collector.rows import EventRow
from agent.events.lines import ROTATE_AT_BYTES, ROTATED_KEPT, LinesOutput

log = logging.getLogger("egress_warden.collector")


def _say_torn_line_dropped(path: Path, dropped: int) -> None:
    log.warning("collector: %s ended in %d bytes of a line cut off when the collector was last stopped; "
                "dropped them (that batch was not stored, so it is written again)", path, dropped)


class JsonLinesOutput:
    def __init__(self, target: str, max_bytes: int = ROTATE_AT_BYTES, keep: int = ROTATED_KEPT) -> None:
        """`target` is a file path or "-" for stdout; `max_bytes` 0 never rotates."""
        self._output = LinesOutput(None if target == "-" else Path(target), max_bytes, keep, _say_torn_line_dropped)

    def write(self, rows: Iterable[EventRow]) -> None:
        """Writes each row's event as one line, then flushes. A write that a kill cuts short
        leaves part of a line, which the next collector drops before it writes."""
        data = "".join(row.body + "\n" for row in rows)
        if data:
            self._output.write(data)

    def close(self) -> None:
        self._output.close()
