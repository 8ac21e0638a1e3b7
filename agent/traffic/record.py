"""What the traffic watch learned over time, kept in the agent's state directory: the
budgets' windows and the spike detector's baselines.

The kernel's counters are pinned and outlive the agent; the windows (the totals of the last
minute) and baselines lived only in the agent. A restarted one (a crash, an upgrade,
`systemctl restart`) took the totals it found as its windows' start, so what a router had
sent in the minute before and everything it sent while no agent ran counted toward no budget,
and its baselines warmed up again, a time in which no spike is seen: a stolen key could be
drained by a router that gets the agent restarted. Times are kept by the wall clock, with the
kernel index each workload had, because the counters are keyed by that index."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from agent.state import replace_file, wall_minus_monotonic

from .watch import TrafficWatch

log = logging.getLogger(__name__)

RECORD_FILE = "traffic_watch.json"
# A save costs a file sync. What a router sends between saves is not lost: a restarted agent
# counts it as sent while unwatched, from the last saved sample on.
SAVE_EVERY_SECONDS = 5.0

Kept = dict[str, dict[str, Any]]  # TrafficWatch.kept()


class TrafficRecord:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / RECORD_FILE
        self._saved_at = float("-inf")
        self._failing = False

    def save_due(self, now: float) -> bool:
        """Whether a save is due at this monotonic time; the first is due at once."""
        return now - self._saved_at >= SAVE_EVERY_SECONDS

    @staticmethod
    def kept_of(watch: TrafficWatch) -> Kept:
        """What save() takes: the watch's state, its times by the wall clock."""
        return watch.kept(wall_minus_monotonic())

    def save(self, kept: Kept, indexes: dict[str, int]) -> None:
        """`kept`: kept_of(the watch); `indexes`: each workload's kernel index."""
        self._saved_at = time.monotonic()
        text = json.dumps({"workloads": {w: {"index": indexes[w], **state} for w, state in kept.items()
                                         if w in indexes}}, sort_keys=True)
        try:
            replace_file(self.path, text)
        except OSError as e:  # a full disk must not stop enforcement; the next save tries again
            if not self._failing:
                log.error("cannot save the budgets' windows and spike baselines to %s (%s); a restarted agent "
                          "would count from the last save on as unwatched", self.path, e.strerror)
            self._failing = True
        else:
            self._failing = False

    def restore_into(self, watch: TrafficWatch, indexes: dict[str, int]) -> None:
        """Gives `watch` what the earlier agent kept of the workloads that have the kernel index
        they had then. A file that cannot be read is logged and skipped: the budgets and
        baselines then start afresh, as they did before there was one."""
        try:
            saved = json.loads(self.path.read_text())["workloads"]
            watch.restore({w: state for w, state in saved.items() if indexes.get(w) == state["index"]},
                          wall_minus_monotonic())
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("%s: not a readable record of budget windows and spike baselines (%s: %s); they start "
                      "afresh", self.path, e.__class__.__name__, e)
