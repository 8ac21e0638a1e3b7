"""What the agent does to a workload that broke its policy: kill every process of it, or
quarantine it (deny-all in the kernel, freeze, keep evidence) and later release it."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Iterable

import psutil

from agent import cgroups
from agent.kernel.sockets import process_sockets


def kill(cgroup_dirs: Iterable[Path]) -> dict[str, Any]:
    """SIGKILL every process of the workload and wait until none is left."""
    started = time.monotonic()
    killed = []
    for cgroup in cgroup_dirs:
        killed.extend(cgroups.pids(cgroup))
        cgroups.kill_all(cgroup)
    return {"pids": sorted(killed), "seconds": round(time.monotonic() - started, 6)}


def freeze(cgroup_dirs: Iterable[Path]) -> list[int]:
    frozen = []
    for cgroup in cgroup_dirs:
        cgroups.freeze(cgroup)
        frozen.extend(cgroups.pids(cgroup))
    return sorted(frozen)


def thaw(cgroup_dirs: Iterable[Path]) -> None:
    for cgroup in cgroup_dirs:
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


def _environment_names(pid: int) -> list[str]:
    # Names only: values hold the very provider keys we guard, and evidence travels far.
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return []
    return sorted({entry.split(b"=", 1)[0].decode(errors="replace") for entry in raw.split(b"\0") if entry})


def evidence(pid: int) -> dict[str, Any]:
    """What an investigator needs of a quarantined process, without any secret value."""
    record: dict[str, Any] = {"pid": pid}
    try:
        proc = psutil.Process(pid)
        record["cmdline"] = proc.cmdline()
        record["exe"] = proc.exe()
        record["uid"] = proc.uids().real
        record["start_time"] = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        record["gone"] = True
        return record
    record["exe_sha256"] = _sha256(f"/proc/{pid}/exe")
    record["sockets"] = [
        {"protocol": s.protocol_name, "local": f"{s.local_ip}:{s.local_port}",
         "remote": f"{s.remote_ip_unmapped}:{s.remote_port}", "state": s.state}
        for s in process_sockets(pid)
    ]
    record["environment_names"] = _environment_names(pid)
    return record
