"""The budgets' windows, kept in the agent's state directory.

The kernel's counters are pinned and outlive the agent; a budget's window (the totals of the
last minute) lived only in the agent. A restarted one (a crash, an upgrade, `systemctl
restart`) took the totals it found as its windows' start, so what a router had sent in the
minute before and everything it sent while no agent ran counted toward no budget: a stolen key
could be drained by a router that gets the agent restarted. Samples are kept by the wall clock
with the kernel index each workload had, because the counters are keyed by that index: a
workload that comes back under another index would be judged by another workload's bytes."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from agent.state import replace_file

from .budgets import BudgetWatch

log = logging.getLogger(__name__)

WINDOWS_FILE = "budget_windows.json"
# A save costs a file sync; between saves, what a router sends is not lost but counted as
# sent while unwatched, from the last saved sample on.
SAVE_EVERY_SECONDS = 5.0

Kept = dict[str, dict[str, list[dict[str, Any]]]]  # BudgetWatch.kept()


def _wall_minus_monotonic() -> float:
    return time.time() - time.monotonic()


def _shift_samples(kept: Kept, by: float) -> Kept:
    return {workload: {**state, "windows": [{**w, "samples": [[round(t + by, 3), total] for t, total in w["samples"]]}
                                            for w in state["windows"]]}
            for workload, state in kept.items()}


class BudgetWindowsFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / WINDOWS_FILE
        self._saved_at = float("-inf")
        self._failing = False

    def save_due(self, now: float) -> bool:
        """Whether a save is due at this monotonic time; the first is due at once."""
        return now - self._saved_at >= SAVE_EVERY_SECONDS

    def save(self, kept: Kept, indexes: dict[str, int]) -> None:
        """`kept`: BudgetWatch.kept(); `indexes`: each workload's kernel index."""
        self._saved_at = time.monotonic()
        by_wall = _shift_samples(kept, _wall_minus_monotonic())
        text = json.dumps({"workloads": {w: {"index": indexes[w], **state} for w, state in by_wall.items()
                                         if w in indexes}}, sort_keys=True)
        try:
            replace_file(self.path, text)
        except OSError as e:  # a full disk must not stop enforcement; the next save tries again
            if not self._failing:
                log.error("cannot save the budgets' windows to %s (%s); a restart would start them afresh",
                          self.path, e.strerror)
            self._failing = True
        else:
            self._failing = False

    def restore_into(self, watch: BudgetWatch, indexes: dict[str, int]) -> None:
        """Gives `watch` the earlier agent's windows, moved to this agent's monotonic clock, of
        the workloads that have the kernel index they had then. A file that cannot be read is
        logged and skipped: the budgets then start afresh, as they did before there was one."""
        try:
            saved = json.loads(self.path.read_text())["workloads"]
            kept = {w: {"windows": state["windows"], "over": state["over"]} for w, state in saved.items()
                    if indexes.get(w) == state["index"]}
            watch.restore(_shift_samples(kept, -_wall_minus_monotonic()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("%s: not a readable record of budget windows (%s: %s); the budgets start afresh", self.path,
                      e.__class__.__name__, e)
