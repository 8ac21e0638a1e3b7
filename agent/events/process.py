"""Who did it: the process an event names, read from /proc while it still exists.

Every event names its process, so this runs for every refusal: read straight from /proc
(psutil's general-purpose reads cost about 400 us a process here) and kept per pid until
the process execs or exits (the agent's tracepoints say when: `forget_process`). A kept
entry is checked against the process's start time, so a reused pid is never described
as its predecessor."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import psutil

from agent.events.model import ProcessInfo
from agent.events.redact import publishable_cmdline

_CAPACITY = 4096
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_BOOT_TIME = psutil.boot_time()
_known: dict[int, tuple[int, ProcessInfo]] = {}  # pid -> (start time in ticks, what it was)


def describe_process(pid: int, *, comm: str | None = None, uid: int | None = None) -> ProcessInfo:
    """What /proc says about `pid`; the kernel's own comm and uid where it says nothing
    (the process may be gone by the time the event is read)."""
    try:
        ppid, started, proc_comm = _stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return ProcessInfo(pid=pid, comm=comm or None, uid=uid)
    known = _known.get(pid)
    if known is None or known[0] != started:
        known = (started, _read(pid, ppid, started, proc_comm))
        _remember(pid, known)
    return dataclasses.replace(known[1])


def forget_process(pid: int) -> None:
    """The process exec'd (new cmdline and exe) or exited."""
    _known.pop(pid, None)


def _remember(pid: int, known: tuple[int, ProcessInfo]) -> None:
    if len(_known) >= _CAPACITY:
        del _known[next(iter(_known))]
    _known[pid] = known


def _stat(pid: int) -> tuple[int, int, str]:
    """(ppid, start time in clock ticks since boot, comm) from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    comm_end = raw.rindex(b")")  # comm may hold spaces and parentheses itself
    comm = raw[raw.index(b"(") + 1:comm_end].decode(errors="replace")
    fields = raw[comm_end + 2:].split()  # from field 3 (state) on
    return int(fields[1]), int(fields[19]), comm


def _read(pid: int, ppid: int, started: int, comm: str) -> ProcessInfo:
    info = ProcessInfo(pid=pid, ppid=ppid, comm=comm, start_time=_BOOT_TIME + started / _TICKS_PER_SECOND)
    try:
        info.uid = _real_uid(pid)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        info.cmdline = publishable_cmdline(argv) or None
        info.exe = os.readlink(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass  # gone meanwhile, a zombie, or a kernel thread: what was read stays
    return info


def _real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise FileNotFoundError(f"/proc/{pid}/status has no Uid line")
