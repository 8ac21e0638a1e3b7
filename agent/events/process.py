"""Who did it: the process an event names, read from /proc while it still exists."""
from __future__ import annotations

import psutil

from agent.events.model import ProcessInfo


def describe_process(pid: int, *, comm: str | None = None, uid: int | None = None) -> ProcessInfo:
    """What /proc still says about `pid`; the kernel's own comm and uid where it says nothing
    (the process may be gone by the time the event is read)."""
    info = ProcessInfo(pid=pid, comm=comm or None, uid=uid)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            info.ppid = proc.ppid()
            info.uid = proc.uids().real
            info.comm = proc.name()
            info.start_time = proc.create_time()
            info.cmdline = proc.cmdline()
            info.exe = proc.exe() or None
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        pass
    return info
