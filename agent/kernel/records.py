"""What the BPF programs put on the ring buffer (bpf/warden.bpf.c, `struct event`)."""
from __future__ import annotations

import ctypes
import enum
import socket
from dataclasses import dataclass

NO_WORKLOAD = 0xFFFFFFFF


class Kind(enum.IntEnum):
    CONNECT = 1
    SENDMSG = 2
    SOCK_CREATE = 3
    BACKSTOP = 4
    EXEC = 5
    EXIT = 6
    CGROUP_ATTACH = 7


class Verdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2
    OBSERVE = 3


class _Event(ctypes.Structure):
    _fields_ = [
        ("ktime_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("kind", ctypes.c_uint32),
        ("workload", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("aux", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
        ("path", ctypes.c_char * 128),
    ]


@dataclass(frozen=True)
class KernelRecord:
    """One ring-buffer record, decoded. `workload` is the kernel's workload index."""

    kind: Kind
    ktime_ns: int
    workload: int | None
    pid: int
    tgid: int
    uid: int
    comm: str
    cgroup_id: int
    cookie: int
    verdict: Verdict | None
    family: int
    protocol: int
    address: str | None
    dport: int
    sport: int
    aux: int
    path: str


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _address(raw: bytes, family: int) -> str | None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    # IPv4 and IPv4-mapped IPv6 are stored alike; report what the kernel judged.
    # inet_ntop, not ipaddress: this runs for every record, and ipaddress is slow.
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


_CARRIES_DESTINATION = {Kind.CONNECT, Kind.SENDMSG, Kind.BACKSTOP}


def decode(data: int, size: int) -> KernelRecord:
    ev = ctypes.cast(data, ctypes.POINTER(_Event)).contents
    kind = Kind(ev.kind)
    return KernelRecord(
        kind=kind,
        ktime_ns=ev.ktime_ns,
        workload=None if ev.workload == NO_WORKLOAD else ev.workload,
        pid=ev.pid,
        tgid=ev.tgid,
        uid=ev.uid,
        comm=ev.comm.decode(errors="replace"),
        cgroup_id=ev.cgroup_id,
        cookie=ev.cookie,
        verdict=Verdict(ev.verdict) if ev.verdict else None,
        family=ev.family,
        protocol=ev.proto,
        address=_address(bytes(ev.daddr), ev.family) if kind in _CARRIES_DESTINATION else None,
        dport=ev.dport,
        sport=ev.sport,
        aux=ev.aux,
        path=ev.path.decode(errors="replace"),
    )
