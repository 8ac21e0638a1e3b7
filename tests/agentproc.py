"""A real `warden agent` process for tests, with its events file read back as dicts."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from agent import cgroups
from agent.kernel.loader import detach_all, remove_pins
from childproc import ChildProcess

REPO = Path(__file__).resolve().parents[1]
WARDEN = [sys.executable, "-m", "agent.cli"]
ROUTER = str(REPO / "tests" / "helpers" / "router.py")

Predicate = Callable[[dict[str, Any]], bool]


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def write_policy(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(textwrap.dedent(text))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def workload_policy(name: str, rules: str, **options: str) -> str:
    """A one-workload policy; see workload_entry."""
    return policy_of(workload_entry(name, rules, **options))


def policy_of(*entries: str) -> str:
    """A policy of the workloads workload_entry wrote."""
    return "\n    version: 1\n    workloads:\n" + "".join(entries)


def workload_entry(name: str, rules: str, *, on_violation: str = "deny", mode: str = "enforce",
                   match: str = "", extra: str = "") -> str:
    """One workload of a policy; `rules` is the YAML of its allow list (flow style), `match` its
    match mapping, `extra` more of the workload's keys (dns:, budgets:) indented by eight spaces."""
    match_line = f"        match: {match}" if match else ""
    return f"""      - name: {name}
        mode: {mode}
        on_violation: {on_violation}
{match_line}
        allow: [{rules}]
{extra}
"""


class AgentProcess(ChildProcess):
    def __init__(self, tmp: Path, policy_text: str, workloads: list[str], events_file: Path | None = None) -> None:
        self.tmp = tmp
        self.policy = write_policy(tmp / "policy.yaml", policy_text)
        self.events_file = events_file or tmp / "events.jsonl"
        self.state_dir = tmp / "state"
        self.log = tmp / "agent.log"
        self.workloads = workloads
        # Other engineers' agents run on this machine too: every test agent pins its own maps.
        self.pin_dir = Path("/sys/fs/bpf") / f"ew-test-{secrets.token_hex(4)}"
        self.process: subprocess.Popen | None = None
        # Short and unique (a Unix socket path has at most 107 bytes; other agents run beside ours).
        self.socket_dir = Path(tempfile.mkdtemp(prefix="ew-api-"))
        self.socket = self.socket_dir / "agent.sock"
        self.agent_args: list[str] = []  # extra `warden agent` options for the next start

    def start(self, timeout: float = 30.0, prefix: list[str] = (), env: dict[str, str] | None = None) -> None:
        """`prefix` runs the agent under another command (e.g. setpriv); `env` adds variables.
        Metrics are off (other agents on this machine may hold the default port) unless
        `agent_args` turns them on: the last --metrics-listen wins."""
        already = len(self.events())
        left = self._socket_identity()  # a killed agent's socket, which this one must replace
        self.process = subprocess.Popen(
            [*prefix, *WARDEN, "agent", "--policy", str(self.policy), "--events-file", str(self.events_file),
             "--state-dir", str(self.state_dir), "--pin-dir", str(self.pin_dir), "--agent-id", "test-agent",
             "--socket", str(self.socket), "--metrics-listen", "off", *self.agent_args],
            cwd=REPO, stderr=open(self.log, "a"), stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.wait_for(lambda e: e["kind"] == "agent_started", timeout=timeout, after=already)
        self._wait_for_api(timeout, left)

    def _wait_for_api(self, timeout: float, left: tuple | None) -> None:
        """The API is served right after agent_started, and every other server before it; an
        agent that cannot serve it exits. The socket a killed agent left does not count."""
        deadline = time.monotonic() + timeout
        while (found := self._socket_identity()) is None or found == left:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent serves no API at {self.socket}:\n{self.log.read_text()}")
            time.sleep(0.02)

    def _socket_identity(self) -> tuple | None:
        try:
            status = os.stat(self.socket)
        except FileNotFoundError:
            return None
        return (status.st_ino, status.st_ctime_ns) if stat.S_ISSOCK(status.st_mode) else None

    def events(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        return complete_lines(self.events_file)

    def wait_for(self, predicate: Predicate, timeout: float = 10.0, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events()[after:]:
                if predicate(event):
                    return event
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"no matching event within {timeout}s; events: {self.events()[after:]}\nlog:\n{self.log.read_text()}")

    def reload(self, policy_text: str) -> None:
        write_policy(self.policy, policy_text)
        self.process.send_signal(signal.SIGHUP)

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        parent = cgroups.warden_parent()
        for name in self.workloads:
            cgroup = parent / name
            if cgroup.exists():
                detach_all(cgroup)
                cgroups.remove(cgroup)
        remove_pins(self.pin_dir)

    def cgroup(self, workload: str) -> Path:
        return cgroups.warden_parent() / workload

    def run_cmd(self, workload: str, argv: list[str], *extra: str) -> list[str]:
        return [*WARDEN, "run", *extra, workload, "--", *argv]

    def router_cmd(self, workload: str, *args: str) -> list[str]:
        return self.run_cmd(workload, [sys.executable, ROUTER, *args])


@contextmanager
def warden_parent_removed_if_new() -> Iterator[None]:
    """The agents started inside make the `egress-warden` parent cgroup; if there was none
    before, none is left after. Each user removes its own workload cgroups (AgentProcess.cleanup),
    so one left here is a leak, and is reported rather than killed."""
    parent = cgroups.warden_parent()
    existed = parent.exists()
    yield
    if existed or not parent.exists():
        return
    leaked = [p.name for p in cgroups.workload_cgroups()]
    assert not leaked, f"workload cgroups left under {parent}: {', '.join(leaked)}"
    parent.rmdir()


def complete_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines the agent has finished writing (the last may still be in progress)."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def outcome(process: subprocess.Popen, timeout: float = 15) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"router printed nothing (exit {process.returncode}): {out}\n{err}"
    return json.loads(lines[-1])
