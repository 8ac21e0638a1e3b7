"""The answers the DNS proxy let through, kept in the agent's state directory.

A restarted agent (a crash, an upgrade) loads programs with allow maps of its own, holding
only the policy's static rules. Without the answers the agent before it wrote there, every
connection to an address a name allowed would be cut (the backstop judges each packet by the
new maps) and refused until the router asked for the name again, which a pooled connection
never does. The answers are kept by wall clock, so the ones still valid after a reboot are
too; they are judged again by the policy in force when they are restored."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from agent.state import replace_file, wall_minus_monotonic

log = logging.getLogger(__name__)

ANSWERS_FILE = "dns_answers.json"
# Addresses kept, the oldest answer forgotten first: as many as the proxy keeps names for.
MAX_ANSWERS = 65536
# A new address is on disk before its answer goes out, but not more often than this: a flood
# of new addresses (a wildcard zone that answers anything) must not put a disk sync on every
# query of every workload. Within it, the next save (at most a second later) takes them.
SAVE_AT_MOST_EVERY = 0.1


class RememberedAnswers:
    """(workload, address) -> (the name last resolved to it, until when it is allowed in
    CLOCK_MONOTONIC ns). By address, as the kernel keeps them, so that many names resolving to
    a few addresses keep a few answers; an address two names share is restored by the later."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / ANSWERS_FILE
        self._lock = threading.Lock()  # the proxy's thread notes, the agent's thread forgets
        self._save_lock = threading.Lock()  # both save
        self._answers: dict[tuple[str, str], tuple[str, int]] = {}
        self._changed = False
        self._saved_at = 0.0
        self._earlier = self._load()  # the agent before this one's

    def note(self, workload: str, name: str, address: str, expires_ns: int) -> bool:
        """Remembers an answer; True when the address is new to the workload."""
        with self._lock:
            key = (workload, address)
            known = self._answers.pop(key, None)  # re-inserted last: the newest is kept longest
            self._answers[key] = (name, max(expires_ns, known[1]) if known else expires_ns)
            self._changed = True
            if len(self._answers) > MAX_ANSWERS:
                del self._answers[next(iter(self._answers))]
            return known is None

    def take_earlier(self, workload: str) -> list[tuple[str, str, int]]:
        """The earlier agent's answers for `workload` as (name, address, expires_ns), once."""
        with self._lock:
            mine = [(key, answer) for key, answer in self._earlier.items() if key[0] == workload]
            for key, _ in mine:
                del self._earlier[key]
        return [(name, address, expires) for (_, address), (name, expires) in mine]

    def of(self, workload: str) -> list[tuple[str, str, int]]:
        """This agent's answers for `workload` as (name, address, expires_ns)."""
        with self._lock:
            return [(name, address, expires) for (held, address), (name, expires) in self._answers.items()
                    if held == workload]

    def forget_addresses(self, workload: str, addresses: list[str]) -> None:
        with self._lock:
            self._drop([key for key in ((workload, address) for address in addresses) if key in self._answers])

    def forget(self, workload: str, now_ns: int, still_allowed: Callable[[], set[str]]) -> None:
        """Drop the workload's expired answers whose address the kernel no longer allows by a name
        (an expired entry stays there while an established socket uses it, and so does its answer).
        `still_allowed` is asked only when an answer has expired: it decodes every entry."""
        with self._lock:
            expired = [key for key, (_, expires) in self._answers.items() if key[0] == workload and expires <= now_ns]
            if expired:
                allowed = still_allowed()
                self._drop([key for key in expired if key[1] not in allowed])

    def forget_workload(self, workload: str) -> None:
        with self._lock:
            self._drop([key for key in self._answers if key[0] == workload])

    def _drop(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            del self._answers[key]
        self._changed |= bool(keys)

    def save_soon(self) -> None:
        """Save now, unless a save was less than SAVE_AT_MOST_EVERY ago (the next one takes it)."""
        if time.monotonic() - self._saved_at >= SAVE_AT_MOST_EVERY:
            self.save_if_changed()

    def save_if_changed(self) -> None:
        with self._save_lock:
            with self._lock:
                if not self._changed:
                    return
                self._changed = False
                to_wall = wall_minus_monotonic()
                rows = [[workload, name, address, round(expires / 1e9 + to_wall, 3)]
                        for (workload, address), (name, expires) in self._answers.items()]
                saved_at = round(time.monotonic() + to_wall, 3)
            replace_file(self.path, json.dumps({"saved_at": saved_at, "answers": rows}))
            self._saved_at = time.monotonic()

    def _load(self) -> dict[tuple[str, str], tuple[str, int]]:
        """An unreadable file costs connections, not safety (nothing is allowed that the policy in
        force does not allow): it is reported and the agent starts without it."""
        try:
            saved = json.loads(self.path.read_text())
            rows = saved["answers"]
            # A wall clock set back since the save (by hand, or by NTP between the agents) would
            # lengthen every answer by as much: it is taken to stand at the save at least, so no
            # answer lasts longer than it had left then (its TTL, at most MAX_TTL, plus grace).
            # A file of an agent before saved_at has none: its answers are restored as they were.
            to_wall = max(wall_minus_monotonic(), float(saved.get("saved_at", 0)) - time.monotonic())
            # Never 0: an entry expiring at 0 would be static, allowed for good.
            return {(str(workload), str(address)): (str(name), max(1, int((float(until) - to_wall) * 1e9)))
                    for workload, name, address, until in rows}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: cannot read the DNS answers the agent before this one allowed (%s: %s); starting "
                        "without them: connections to addresses they allowed are refused until their names "
                        "are asked again", self.path, e.__class__.__name__, e)
            return {}
