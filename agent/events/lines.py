"""Files of JSON lines, one event a line, that a killed writer appends to again after its restart."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Callable

_TAIL_CHUNK = 65536
ROTATE_AT_BYTES = 100 * 10**6
ROTATED_KEPT = 5


def drop_torn_line(path: Path) -> int:
    """Truncates the file after its last newline and returns how many bytes went. A writer
    killed in the middle of a write (the kernel stops a write at a fatal signal) leaves part
    of a line at the end, and a reader would find the next writer's first line glued to it."""
    try:
        file = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with file:
        size = end = file.seek(0, os.SEEK_END)
        while end > 0:
            start = max(end - _TAIL_CHUNK, 0)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            file.truncate(end)
        return size - end


class LinesOutput:
    """Whole lines to standard output (path None), or appended to a file that is rotated by size
    as logrotate would: PATH moves to PATH.1 (PATH.1 to PATH.2, ...), `keep` old files are kept,
    and a shipper that follows PATH by name (Filebeat, Vector, Fluent Bit) picks up the new one.
    One write never straddles two files. A part of a line that a killed writer left is dropped
    (and `on_torn_line` told) before the first write."""

    def __init__(self, path: Path | None, max_bytes: int = ROTATE_AT_BYTES, keep: int = ROTATED_KEPT,
                 on_torn_line: Callable[[Path, int], None] = lambda path, dropped: None) -> None:
        """`max_bytes` 0 never rotates."""
        if max_bytes < 0 or keep < 1:
            raise ValueError("rotating lines needs max_bytes >= 0 and keep >= 1")
        self._path = path
        self._max_bytes = max_bytes
        self._keep = keep
        self._on_torn_line = on_torn_line
        self._lock = threading.Lock()
        self._file = sys.stdout.buffer if path is None else self._open()

    def _open(self) -> BinaryIO:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        dropped = drop_torn_line(self._path)
        if dropped:
            self._on_torn_line(self._path, dropped)
        return open(self._path, "ab")

    def write(self, lines: str) -> None:
        """Writes whole lines and flushes them, after rotating a file they would take past
        max_bytes (a file is never left empty by it: one write larger than max_bytes has a
        file of its own)."""
        data = lines.encode()
        with self._lock:
            if self._path is not None and self._max_bytes:
                written = self._file.tell()
                if 0 < written and written + len(data) > self._max_bytes:
                    self._rotate()
            self._file.write(data)
            self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self._keep - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{index}")
            if older.exists():
                os.replace(older, self._path.with_name(f"{self._path.name}.{index + 1}"))
        os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))
        self._file = self._open()

    def close(self) -> None:
        with self._lock:
            if self._path is not None:
                self._file.close()
