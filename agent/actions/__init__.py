"""What the agent does to a workload that broke its policy: kill every process of it, or
quarantine it (deny-all in the kernel, freeze, keep evidence) and later release it."""
from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil

from agent import cgroups
from agent.events.redact import publishable_cmdline
from agent.kernel.sockets import process_sockets


# A cgroup that does not empty or freeze in time (a process stuck in the kernel, on a hung
# NFS mount say) is named in the action's outcome rather than raised: an agent that died of it
# would die again at every restart, and act on no workload.


def kill(cgroup_dirs: Iterable[Path]) -> dict[str, Any]:
    """SIGKILL every process of the workload and wait until none is left."""
    started = time.monotonic()
    killed, unfinished = [], []
    for cgroup in cgroup_dirs:
        killed.extend(cgroups.pids(cgroup))
        _attempt(cgroups.kill_all, cgroup, unfinished)
    return _outcome({"pids": sorted(killed), "seconds": round(time.monotonic() - started, 6)}, unfinished)


def freeze(cgroup_dirs: Iterable[Path]) -> dict[str, Any]:
    """Freeze the workload's cgroups; `frozen_pids` are the processes in them."""
    frozen, unfinished = [], []
    for cgroup in cgroup_dirs:
        _attempt(cgroups.freeze, cgroup, unfinished)
        frozen.extend(cgroups.pids(cgroup))
    return _outcome({"frozen_pids": sorted(frozen)}, unfinished)


def _outcome(outcome: dict[str, Any], unfinished: list[str]) -> dict[str, Any]:
    return {**outcome, "unfinished": unfinished} if unfinished else outcome


def _attempt(action: Callable[[Path], None], cgroup: Path, unfinished: list[str]) -> None:
    try:
        action(cgroup)
    except FileNotFoundError:
        pass  # removed meanwhile (its unit stopped): no process is left there to act on
    except cgroups.CgroupError as e:
        unfinished.append(str(e))


def thaw(cgroup_dirs: Iterable[Path]) -> None:
    for cgroup in cgroup_dirs:
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing is frozen there
            cgroups.thaw(cgroup)


def _sha256(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


# Evidence travels in one event: a process with a million sockets or a megabyte of environment
# must not make it too large to stream (the rest is counted, not listed).
MAX_LISTED = 256
MAX_NAME_CHARS = 256


def _environment_names(pid: int) -> set[str]:
    # Names only: values hold the very provider keys we guard, and evidence travels far.
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return set()
    return {entry.split(b"=", 1)[0].decode(errors="replace")[:MAX_NAME_CHARS] for entry in raw.split(b"\0") if entry}


def _listed(record: dict[str, Any], key: str, items: list) -> None:
    record[key] = items[:MAX_LISTED]
    if len(items) > MAX_LISTED:
        record[f"{key}_not_listed"] = len(items) - MAX_LISTED


def evidence(pid: int) -> dict[str, Any]:
    """What an investigator needs of a quarantined process, without any secret value."""
    record: dict[str, Any] = {"pid": pid}
    try:
        proc = psutil.Process(pid)
        record["cmdline"] = publishable_cmdline(proc.cmdline())
        record["exe"] = proc.exe()
        record["uid"] = proc.uids().real
        record["start_time"] = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        record["gone"] = True
        return record
    record["exe_sha256"] = _sha256(f"/proc/{pid}/exe")
    _listed(record, "sockets", [
        {"protocol": s.protocol_name, "local": f"{s.local_ip}:{s.local_port}",
         "remote": f"{s.remote_ip_unmapped}:{s.remote_port}", "state": s.state}
        for s in process_sockets(pid)
    ])
    _listed(record, "environment_names", sorted(_environment_names(pid)))
    return record
