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

from agent.state import replace_file

log = logging.getLogger(__name__)

ANSWERS_FILE = "dns_answers.json"

# (workload, asked name, address) -> until when the answer allows the address (CLOCK_MONOTONIC ns)
AnswerKey = tuple[str, str, str]


class RememberedAnswers:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / ANSWERS_FILE
        self._lock = threading.Lock()  # the proxy's thread notes, the agent's thread forgets
        self._save_lock = threading.Lock()  # both save
        self._answers: dict[AnswerKey, int] = {}
        self._changed = False
        self._earlier: dict[AnswerKey, int] = self._load()  # the agent before this one's

    def note(self, workload: str, name: str, address: str, expires_ns: int) -> bool:
        """Remembers an answer, or its later expiry; True when the name's address is new."""
        with self._lock:
            key = (workload, name, address)
            known = self._answers.get(key)
            if known is None or known < expires_ns:
                self._answers[key] = expires_ns
                self._changed = True
            return known is None

    def take_earlier(self, workload: str) -> list[tuple[str, str, int]]:
        """The earlier agent's answers for `workload` as (name, address, expires_ns), once."""
        with self._lock:
            mine = {key: expires for key, expires in self._earlier.items() if key[0] == workload}
            for key in mine:
                del self._earlier[key]
        return [(name, address, expires) for (_, name, address), expires in mine.items()]

    def forget(self, workload: str, now_ns: int, still_allowed: set[str]) -> None:
        """Drop the workload's expired answers whose address the kernel no longer allows by a name
        (an expired entry stays there while an established socket uses it, and so does its answer)."""
        with self._lock:
            gone = [key for key, expires in self._answers.items()
                    if key[0] == workload and expires <= now_ns and key[2] not in still_allowed]
            for key in gone:
                del self._answers[key]
            self._changed |= bool(gone)

    def forget_workload(self, workload: str) -> None:
        with self._lock:
            gone = [key for key in self._answers if key[0] == workload]
            for key in gone:
                del self._answers[key]
            self._changed |= bool(gone)

    def save_if_changed(self) -> None:
        with self._save_lock:
            with self._lock:
                if not self._changed:
                    return
                self._changed = False
                wall_minus_monotonic = time.time() - time.monotonic_ns() / 1e9
                rows = [[workload, name, address, round(expires / 1e9 + wall_minus_monotonic, 3)]
                        for (workload, name, address), expires in sorted(self._answers.items())]
            replace_file(self.path, json.dumps({"answers": rows}))

    def _load(self) -> dict[AnswerKey, int]:
        """An unreadable file costs connections, not safety (nothing is allowed that the policy in
        force does not allow): it is reported and the agent starts without it."""
        try:
            rows = json.loads(self.path.read_text())["answers"]
            monotonic_minus_wall = time.monotonic_ns() - time.time() * 1e9
            # Never 0: an entry expiring at 0 would be static, allowed for good.
            return {(str(workload), str(name), str(address)): max(1, int(float(until) * 1e9 + monotonic_minus_wall))
                    for workload, name, address, until in rows}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: cannot read the DNS answers the agent before this one allowed (%s: %s); starting "
                        "without them: connections to addresses they allowed are refused until their names "
                        "are asked again", self.path, e.__class__.__name__, e)
            return {}
