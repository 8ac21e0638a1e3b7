"""Files of the agent's state directory: what must outlive the agent (restarts, crashes, reboots)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def wall_minus_monotonic() -> float:
    """Seconds that turn CLOCK_MONOTONIC into the wall clock, now. State files keep times by the
    wall clock: the monotonic clock starts again at a reboot."""
    return time.time() - time.monotonic()


def replace_file(path: Path, text: str) -> None:
    """Writes `text` to a new file, syncs it, and renames it over `path`: a crash at any point
    leaves the old content or the new, never a part."""
    staged = path.with_name(path.name + ".tmp")
    with open(staged, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
