"""Posture: what a workload process could do to get around the agent.

The kernel programs cannot refuse packet sockets, and a process that can write to a
cgroup.procs outside its cgroup can leave (reported, but only after the fact). These
checks say which workload processes keep such ways open, so an operator can close them
(the systemd drop-in in systemd/examples, or `warden run`, which drops them)."""
from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from agent.cgroups import pids
from agent.cgroups.launch import ESCAPE_CAPABILITIES


@dataclass(frozen=True)
class PostureWarning:
    pid: int
    code: str  # runs_as_root | escape_capabilities | can_leave_cgroup
    detail: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.detail}"


@dataclass(frozen=True)
class _Credentials:
    uid: int
    gids: frozenset[int]
    permitted: int
    bounding: int
    no_new_privs: bool


def _credentials(pid: int) -> _Credentials:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return _Credentials(
        uid=int(fields["Uid"][1]),  # effective
        gids=frozenset(int(g) for g in [fields["Gid"][1], *fields.get("Groups", [])]),
        permitted=int(fields["CapPrm"][0], 16),
        bounding=int(fields["CapBnd"][0], 16),
        no_new_privs=fields.get("NoNewPrivs", ["0"])[0] == "1",
    )


def _obtainable_capabilities(creds: _Credentials) -> list[str]:
    """Held now, or obtainable by exec of a file-capability or setuid binary (e.g. ping's
    cap_net_raw), which the bounding set allows unless no_new_privs is set."""
    reachable = creds.permitted if creds.no_new_privs else creds.permitted | creds.bounding
    return sorted(name for name, bit in ESCAPE_CAPABILITIES.items() if reachable >> bit & 1)


def _writable_by(path: Path, creds: _Credentials) -> bool:
    if creds.uid == 0:
        return True
    st = path.stat()
    if st.st_uid == creds.uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in creds.gids:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def process_posture(pid: int, cgroup: Path) -> list[PostureWarning]:
    """Warnings for one process of the workload whose cgroup is `cgroup`."""
    creds = _credentials(pid)
    warnings = []
    if creds.uid == 0:
        warnings.append(PostureWarning(pid, "runs_as_root", "runs as root"))
    capabilities = _obtainable_capabilities(creds)
    if capabilities:
        warnings.append(PostureWarning(pid, "escape_capabilities",
                                       f"holds or can obtain {', '.join(capabilities)}"))
    # Moving a process needs write access to cgroup.procs of the common ancestor of the
    # two cgroups; the workload cgroup's parent is the nearest one a way out passes.
    procs = cgroup.parent / "cgroup.procs"
    if _writable_by(procs, creds):
        warnings.append(PostureWarning(pid, "can_leave_cgroup", f"can write {procs}, so it can leave its cgroup"))
    return warnings


def workload_posture(cgroup_dirs: list[Path]) -> list[PostureWarning]:
    """Warnings for every process in the workload's cgroups, skipping those that exit meanwhile."""
    warnings = []
    for cgroup in cgroup_dirs:
        for pid in pids(cgroup):
            try:
                warnings.extend(process_posture(pid, cgroup))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return warnings
