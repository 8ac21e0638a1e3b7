"""The lifetime of a process a test started (an agent, a collector): stop it, kill it, clean up."""
from __future__ import annotations

import subprocess


class ChildProcess:
    """Subclasses set `process` when they start it and may change `stop_timeout`."""

    process: subprocess.Popen | None = None
    stop_timeout = 15.0

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM and wait for the exit status (0 when it never ran)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        return self.process.wait(timeout=self.stop_timeout)

    def cleanup(self) -> None:
        """Kills it if it still runs: a failed test must leave nothing behind."""
        if self.process is not None and self.process.poll() is None:
            self.kill9()
