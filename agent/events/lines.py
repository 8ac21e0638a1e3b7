"""Files of JSON lines, one event a line, that a killed writer appends to again after its restart."""
from __future__ import annotations

import os
from pathlib import Path

_TAIL_CHUNK = 65536


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
