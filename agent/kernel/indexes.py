"""Which kernel index each workload has, kept in the agent's state directory.

The kernel keys the byte counters, socket slots and socket owners by workload index, in maps
pinned so that they outlive the agent. An agent that numbered the workloads afresh by their
order in the policy handed one workload's counters to another whenever the policy had
changed while no agent ran (a workload taken out, the list reordered): metrics, `warden ps`
and budgets then counted another workload's bytes. So an index stays with its name, and a new
workload takes an index that no workload had before, while there is one."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.policy.values import MAX_WORKLOADS
from agent.state import replace_file

log = logging.getLogger(__name__)

INDEXES_FILE = "workload_indexes.json"


class WorkloadIndexes:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / INDEXES_FILE
        self._by_name = self._load()

    def _load(self) -> dict[str, int]:
        """An unreadable file is reported and the agent numbers afresh: counters may then be
        shown under the wrong workload, which is no reason not to enforce."""
        try:
            saved = json.loads(self.path.read_text())["workloads"]
            return {str(name): int(index) for name, index in saved.items() if 0 <= int(index) < MAX_WORKLOADS}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: cannot read which kernel index each workload had (%s: %s); numbering afresh, so "
                        "counters kept from before may show under another workload", self.path,
                        e.__class__.__name__, e)
            return {}

    def index_for(self, name: str, in_use: set[int]) -> int:
        """The workload's index: the one it had, unless in use; else one no workload had; else
        (all had one) the first free, whose earlier owner is forgotten. Saved before it is
        returned, so the kernel never counts under an index the file does not name."""
        index = self._by_name.get(name)
        if index is None or index in in_use:
            had_one = set(self._by_name.values())
            free = [i for i in range(MAX_WORKLOADS) if i not in in_use]
            index = next((i for i in free if i not in had_one), free[0])
            self._by_name = {n: i for n, i in self._by_name.items() if i != index and n != name}
            self._by_name[name] = index
            self._save()
        return index

    def _save(self) -> None:
        try:
            replace_file(self.path, json.dumps({"workloads": self._by_name}, sort_keys=True))
        except OSError as e:  # a full disk must not keep a workload from being enforced
            log.error("cannot save which kernel index each workload has to %s (%s); after a restart with "
                      "another policy, counters kept from before may show under another workload", self.path,
                      e.strerror)
