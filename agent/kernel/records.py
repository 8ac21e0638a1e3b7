"""What the BPF programs put on the ring buffer (bpf/warden.bpf.c, `struct event`)."""
from __future__ import annotations

import ctypes
import enum
import socket
import struct
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
    DNS_PENDING = 8  # a DNS query where the workload's proxy is not open yet (refused)


class Verdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2
    OBSERVE = 3


# struct event, field by field: ktime_ns, cgroup_id, cookie (u64); kind, workload, pid, tgid,
# uid, aux (u32); family, dport, sport (u16); proto, verdict (u8); daddr[16], comm[16],
# path[128]. No padding: 216 bytes. struct.unpack, not a ctypes.Structure: it runs for
# every record, and reading a ctypes structure field by field costs 30 times as much.
_LAYOUT = struct.Struct("=QQQIIIIIIHHHBB16s16s128s")


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


_CARRIES_DESTINATION = {Kind.CONNECT, Kind.SENDMSG, Kind.BACKSTOP, Kind.DNS_PENDING}
_KINDS = {k.value: k for k in Kind}  # dict lookups: calling an enum class is slow, and this is per record
_VERDICTS = {v.value: v for v in Verdict}


def decode(data: int, size: int) -> KernelRecord:
    (ktime_ns, cgroup_id, cookie, kind, workload, pid, tgid, uid, aux, family, dport, sport, proto, verdict,
     daddr, comm, path) = _LAYOUT.unpack(ctypes.string_at(data, _LAYOUT.size))
    kind = _KINDS[kind]
    return KernelRecord(
        kind=kind,
        ktime_ns=ktime_ns,
        workload=None if workload == NO_WORKLOAD else workload,
        pid=pid,
        tgid=tgid,
        uid=uid,
        comm=_c_string(comm),
        cgroup_id=cgroup_id,
        cookie=cookie,
        verdict=_VERDICTS[verdict] if verdict else None,
        family=family,
        protocol=proto,
        address=_address(daddr, family) if kind in _CARRIES_DESTINATION else None,
        dport=dport,
        sport=sport,
        aux=aux,
        path=_c_string(path),
    )


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")
