"""Operators' hook executables (policy `hooks.on_violation`, `hooks.on_budget`): each gets
the event as one JSON object on stdin. They run on worker threads with a timeout, so a
slow or hanging hook never holds up enforcement; how each run ended is handed back to the
agent, which reports it as a hook_finished event. Their output is not kept: a hook that
rotates keys may well print them. They run as root, so one that anyone but root could change
is not run: the router could otherwise run code as root by making a refused connection."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from agent.permissions import executable_problems

DEFAULT_TIMEOUT_SECONDS = 10.0
WORKERS = 4


@dataclass(frozen=True)
class HookOutcome:
    command: str
    workload: str
    hook: str  # on_violation | on_budget
    cause_seq: int
    exit_status: int | None  # None when it timed out or could not start
    timed_out: bool
    seconds: float
    error: str | None = None
    skipped_while_running: int = 0  # events that found this hook still busy with an earlier one
    cancelled: bool = False  # never started: the agent stopped while it waited for a worker

    @property
    def outcome(self) -> str:
        if self.timed_out:
            return "timeout"
        if self.cancelled:
            return "cancelled"
        if self.error:
            return "error"
        return "ok" if self.exit_status == 0 else "failed"


class HookRunner:
    """At most one run of a given hook per workload at a time: an event that arrives while
    it runs is counted in the next outcome, not queued, so a burst of violations cannot
    start a burst of processes."""

    def __init__(self, on_finished: Callable[[HookOutcome], None],
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._on_finished = on_finished
        self.timeout_seconds = timeout_seconds
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="hook")
        self._lock = threading.Lock()
        self._running: set[tuple[str, str]] = set()
        self._skipped: dict[tuple[str, str], int] = {}
        self._submitted: dict[Future, tuple[str, str, str, int]] = {}  # (command, workload, hook, cause_seq)

    def run(self, commands: tuple[str, ...], *, workload: str, hook: str, event_json: str, cause_seq: int) -> None:
        for command in commands:
            key = (workload, command)
            with self._lock:
                if key in self._running:
                    self._skipped[key] = self._skipped.get(key, 0) + 1
                    continue
                self._running.add(key)
                future = self._pool.submit(self._run_one, command, workload, hook, event_json, cause_seq)
                self._submitted[future] = (command, workload, hook, cause_seq)
            future.add_done_callback(self._forget_submitted)

    def _forget_submitted(self, future: Future) -> None:
        with self._lock:
            self._submitted.pop(future, None)

    def _run_one(self, command: str, workload: str, hook: str, event_json: str, cause_seq: int) -> None:
        started = time.monotonic()
        status, timed_out, error = None, False, _refusal(command)
        if error is None:
            try:
                # Its own session, so a timeout kills what it started too, not only itself.
                process = subprocess.Popen([command], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, text=True, cwd="/", start_new_session=True)
            except OSError as e:
                error = f"could not run {command}: {e.strerror}"
            else:
                try:
                    process.communicate(event_json, timeout=self.timeout_seconds)
                    status = process.returncode
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_session(process)
        self._on_finished(HookOutcome(command, workload, hook, cause_seq, status, timed_out,
                                      round(time.monotonic() - started, 3), error, self._done(workload, command)))

    def _done(self, workload: str, command: str) -> int:
        """Frees the hook for the next event; returns how many found it busy."""
        with self._lock:
            self._running.discard((workload, command))
            return self._skipped.pop((workload, command), 0)

    def close(self) -> None:
        """Waits for the runs under way (each within its timeout) and hands back as cancelled
        those still waiting for a worker: a key rotation that never ran must not go unseen."""
        with self._lock:
            submitted = dict(self._submitted)
        for future, (command, workload, hook, cause_seq) in submitted.items():
            if future.cancel():
                self._on_finished(HookOutcome(command, workload, hook, cause_seq, None, False, 0.0,
                                              "not run: the agent stopped while it waited for a free worker",
                                              self._done(workload, command), cancelled=True))
        self._pool.shutdown(wait=True)


def _refusal(command: str) -> str | None:
    """Why the hook must not run now, as root: the policy's check was at its load, and files
    change."""
    try:
        problems = executable_problems(command)
    except OSError as e:
        return f"could not run {command}: {e.strerror}"
    return f"refused to run {command} as root: {'; '.join(problems)}" if problems else None


def _kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
