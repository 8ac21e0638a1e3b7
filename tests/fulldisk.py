"""A small filesystem a test can fill up: what a full disk does to the agent."""
from __future__ import annotations

import errno
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (as mount takes it: 256k, 1m) mounted at `path`, owned by root, 0700."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # the agent may still hold files there


def fill(path: Path, chunk: bytes = b"\0" * 4096) -> None:
    """Appends `chunk` to `path` until its filesystem is full."""
    with open(path, "ab", buffering=0) as file:
        try:
            while True:
                file.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
