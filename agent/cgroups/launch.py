"""`warden run`: start a command inside a workload's cgroup, before exec, so it never runs
a moment unguarded and holds no socket from outside."""
from __future__ import annotations

import ctypes
import os
import pwd
import socket
import time
from pathlib import Path

from agent import cgroups
from agent.kernel.loader import attached_warden_programs, dns_proxy_ready
from agent.kernel.netns import netns_cookie

DNS_PROXY_WAIT = 10.0

# Capabilities that open a way around the agent: raw and packet sockets (NET_RAW),
# interfaces, routes and namespaces (NET_ADMIN, SYS_ADMIN), other processes' sockets
# (SYS_PTRACE), BPF programs and kernel modules that could detach ours (BPF, SYS_MODULE).
ESCAPE_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_MODULE": 16,
                       "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_RUN_OPTIONS_WITH_VALUE = {"--user"}  # `warden run`'s options that take the next argument


def launched_into(cmdline: list[str]) -> str | None:
    """The workload a `warden run` launcher is about to join, read from its command line (it
    names its COMMAND too, which another workload's match.cmdline may fit); None for any other
    process."""
    for at, arg in enumerate(cmdline[:-1]):
        if arg == "run" and _is_warden(cmdline[:at]):
            rest = iter(cmdline[at + 1:])
            for option in rest:
                if option in _RUN_OPTIONS_WITH_VALUE:
                    next(rest, None)
                elif not option.startswith("--"):
                    return option
            return None
    return None


def _is_warden(argv: list[str]) -> bool:
    """Whether `argv` (what comes before `run`) ends in the warden CLI: its console script, or
    `python -m agent.cli`."""
    return (bool(argv) and Path(argv[-1]).name == "warden") or argv[-2:] == ["-m", "agent.cli"]


class LaunchError(RuntimeError):
    pass


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")


def drop_escape_capabilities() -> None:
    """Remove the escape capabilities from the bounding, inheritable and ambient sets, so
    that neither exec (even of a setuid-root or file-capability binary) nor root can
    bring them back."""
    for name, cap in ESCAPE_CAPABILITIES.items():
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping {name} from the bounding set")
    _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient capabilities")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "reading capabilities")
    for cap in ESCAPE_CAPABILITIES.values():
        data[cap // 32].inheritable &= ~(1 << (cap % 32))
    _check(_libc.capset(ctypes.byref(header), data), "clearing inheritable capabilities")


def enforced_cgroup(workload: str, root: Path | None = None) -> Path:
    """The workload's cgroup, only if the agent guards it: starting a router in an
    unguarded cgroup would silently run it without a leash."""
    cgroup = cgroups.warden_parent(root) / workload
    if not cgroup.is_dir() or not attached_warden_programs(cgroup):
        raise LaunchError(
            f"workload {workload!r} is not enforced ({cgroup} has no Egress Warden programs): "
            "start the agent with a policy that names it (warden agent --policy FILE)")
    return cgroup


def switch_user(user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LaunchError(f"no such user: {user}") from None
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)


def wait_for_dns_proxy(cgroup: Path, timeout: float = DNS_PROXY_WAIT) -> None:
    """A DNS workload's queries are refused until the agent's DNS proxy listens in this
    network namespace (it opens it when it sees us join): wait for that, so the command's
    first lookup is answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        cookie = netns_cookie(probe)
    cgroup_id = cgroups.cgroup_id(cgroup)
    deadline = time.monotonic() + timeout
    while dns_proxy_ready(cgroup, cgroup_id, cookie) is False:
        if time.monotonic() > deadline:
            raise LaunchError(f"the agent's DNS proxy did not open in this network namespace within {timeout:.0f} s: "
                              "is the agent running? (its log says why)")
        time.sleep(0.01)


def exec_in_workload(workload: str, argv: list[str], *, user: str | None, keep_capabilities: bool) -> None:
    """Never returns: the current process becomes `argv`, inside the workload."""
    cgroup = enforced_cgroup(workload)
    cgroups.move_pid(cgroup, os.getpid())
    wait_for_dns_proxy(cgroup)
    if not keep_capabilities:
        drop_escape_capabilities()
    if user:
        switch_user(user)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise LaunchError(f"cannot run {argv[0]}: {e.strerror}") from None
