"""Which workloads are quarantined, kept in the agent's state directory.

A quarantine lasts until an operator releases it. The kernel's deny-all lives in the program
set of the agent that ordered it, and a restarted agent (a crash, an upgrade, a reboot) loads
a program set of its own: without this record it would hand a frozen, compromised router its
allowances back, and a rebooted one would run free."""
from __future__ import annotations

import json
from pathlib import Path

from agent.state import replace_file

QUARANTINES_FILE = "quarantined.json"


class QuarantineRecordError(Exception):
    """The record cannot be read: the agent cannot know which workloads must stay quarantined."""


class QuarantineRecord:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / QUARANTINES_FILE

    def load(self) -> dict[str, float]:
        """Workload name -> when its quarantine began (seconds since the epoch)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            since = json.loads(text)["workloads"]
            return {str(name): float(when) for name, when in since.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise QuarantineRecordError(
                f"{self.path}: not a quarantine record ({e.__class__.__name__}: {e}). The agent writes it whole "
                "(a new file renamed over the old), so something else changed it. Fix it, or move it aside to "
                "start with no workload quarantined") from None

    def save(self, since: dict[str, float]) -> None:
        replace_file(self.path, json.dumps({"workloads": since}, sort_keys=True))
