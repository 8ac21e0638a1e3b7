"""Event sequence numbers: strictly increasing per agent, never reused, also across restarts.

A block of numbers is reserved on disk before any of it is handed out, so a crash costs
at most a gap, never a repeat, and the disk is written once per block, not per event."""
from __future__ import annotations

from pathlib import Path

from agent.state import replace_file


class SequenceAllocator:
    def __init__(self, state_dir: Path, block: int = 1000) -> None:
        self._file = state_dir / "seq"
        self._block = block
        self._next = self._read_reserved() + 1
        self._reserved = self._next - 1
        self.first = self._next  # the first seq this run hands out

    def _read_reserved(self) -> int:
        try:
            return int(self._file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _reserve(self, upto: int) -> None:
        replace_file(self._file, str(upto))
        self._reserved = upto

    def next(self) -> int:
        if self._next > self._reserved:
            self._reserve(self._next + self._block - 1)
        value = self._next
        self._next += 1
        return value
