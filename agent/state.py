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
    """Writes `text` to a new file, syncs it, renames it over `path` and syncs the directory:
    a crash at any point leaves the old content or the new, never a part, and once this returns
    a power loss does not bring the old one back (a quarantine would be lost with it)."""
    staged = path.with_name(path.name + ".tmp")
    # 0600 whatever the umask: what the agent keeps is for the agent, and it trusts it at start.
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover .tmp from a crash keeps its old mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
