"""Compiles bpf/warden.bpf.c with bcc, attaches it to workload cgroups and keeps its maps
in step with the policy. The one place that speaks to the BPF programs."""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from agent.kernel import bpfsys
from agent.kernel.records import KernelRecord, decode

log = logging.getLogger(__name__)

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "warden.bpf.c"
PROGRAM_PREFIX = "ew_"
PORT_ANY = 0
PROTOCOLS = {"any": 0, "tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
MODES = {"enforce": 0, "monitor": 1}
_KEY_FIXED_BITS = 64  # workload, protocol, pad and port precede the address in the LPM key


@dataclass(frozen=True)
class Hook:
    function: str
    prog_type: int
    attach_type: int


def _hooks() -> tuple[Hook, ...]:
    from bcc import BPFAttachType as A, BPFProgType as P

    return (
        Hook("ew_connect4", P.CGROUP_SOCK_ADDR, A.CGROUP_INET4_CONNECT),
        Hook("ew_connect6", P.CGROUP_SOCK_ADDR, A.CGROUP_INET6_CONNECT),
        Hook("ew_sendmsg4", P.CGROUP_SOCK_ADDR, A.CGROUP_UDP4_SENDMSG),
        Hook("ew_sendmsg6", P.CGROUP_SOCK_ADDR, A.CGROUP_UDP6_SENDMSG),
        Hook("ew_sock_create", P.CGROUP_SOCK, A.CGROUP_INET_SOCK_CREATE),
        Hook("ew_egress", P.CGROUP_SKB, A.CGROUP_INET_EGRESS),
    )


@dataclass(frozen=True)
class AllowEntry:
    """One destination a workload may reach: a prefix, a protocol and a port (0 = any)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    protocol: str
    port: int
    expires_ns: int = 0
    rule: int = 0


def mapped_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[bytes, int]:
    """IPv4 prefixes live in the trie as ::ffff:0:0/96 prefixes, so IPv4-mapped IPv6
    destinations meet the same entries."""
    if network.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + network.network_address.packed)
        return mapped.packed, 96 + network.prefixlen
    return network.network_address.packed, network.prefixlen


class KernelPrograms:
    """The loaded program set. One instance per agent; attach it to any number of cgroups."""

    def __init__(self, source: Path = BPF_SOURCE) -> None:
        from bcc import BPF

        started = time.monotonic()
        self._bpf = BPF(src_file=str(source).encode(), cflags=["-Wno-macro-redefined"])
        self._hooks = _hooks()
        self._functions = {
            h.function: self._bpf.load_func(h.function.encode(), h.prog_type, attach_type=h.attach_type)
            for h in self._hooks
        }
        self._own_ids = {bpfsys.program_id(f.fd) for f in self._functions.values()}
        self._allow = self._bpf[b"allow"]
        self._allowed: dict[int, set[tuple[bytes, int]]] = {}
        self._generation = 0
        self.load_seconds = time.monotonic() - started

    # --- attachment ---------------------------------------------------------------

    def attach(self, cgroup: Path) -> int:
        """Attach every hook to `cgroup`, then detach what an earlier agent left there.
        Ours go on first, so there is no moment without enforcement. Returns how many
        stale programs were replaced."""
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        replaced = 0
        try:
            for hook in self._hooks:
                attached = bpfsys.attached_programs(fd, hook.attach_type)
                if not any(p.id in self._own_ids for p in attached):
                    bpfsys.attach(self._functions[hook.function].fd, fd, hook.attach_type)
                for stale in attached:
                    if stale.name == hook.function and stale.id not in self._own_ids:
                        bpfsys.detach_by_id(stale.id, fd, hook.attach_type)
                        replaced += 1
        finally:
            os.close(fd)
        return replaced

    def detach(self, cgroup: Path) -> None:
        detach_all(cgroup)

    # --- maps ----------------------------------------------------------------------

    def set_workload(self, index: int, *, mode: str, quarantined: bool) -> None:
        """Activate or update a workload. Bumps its generation, so the egress backstop
        re-judges every established socket against the current allowlist."""
        table = self._bpf[b"workloads"]
        state = table.Leaf()
        self._generation += 1
        state.active = 1
        state.mode = MODES[mode]
        state.quarantined = int(quarantined)
        state.generation = self._generation
        table[ctypes.c_int(index)] = state

    def deactivate_workload(self, index: int) -> None:
        self._bpf[b"workloads"][ctypes.c_int(index)] = self._bpf[b"workloads"].Leaf()
        self.replace_allowlist(index, [])
        self.set_listen_ports(index, [])

    def bind_cgroup(self, cgroup_id: int, index: int) -> None:
        self._bpf[b"cgroup_workload"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint32(index)

    def unbind_cgroup(self, cgroup_id: int) -> None:
        table = self._bpf[b"cgroup_workload"]
        key = ctypes.c_uint64(cgroup_id)
        if key in table:
            del table[key]

    def add_members(self, index: int, pids: Iterable[int]) -> None:
        table = self._bpf[b"members"]
        for pid in pids:
            table[ctypes.c_uint32(pid)] = ctypes.c_uint32(index)

    def set_discovery(self, enabled: bool) -> None:
        self._bpf[b"config"][ctypes.c_int(0)] = ctypes.c_uint32(int(enabled))

    def set_listen_ports(self, index: int, ports: Iterable[int]) -> None:
        table = self._bpf[b"listen_ports"]
        for key in [k for k in table.keys() if k.workload == index]:
            del table[key]
        for port in ports:
            key = table.Key()
            key.workload = index
            key.port = port
            table[key] = ctypes.c_uint8(1)

    def replace_allowlist(self, index: int, entries: Iterable[AllowEntry]) -> None:
        """Make the workload's allowlist exactly `entries`: new ones go in before old ones
        go out, so a destination kept by both policies is never refused in between."""
        wanted = {}
        for entry in entries:
            key = self._allow_key(index, entry)
            wanted[(bytes(key), key.prefixlen)] = (key, entry)
        for key, entry in wanted.values():
            value = self._allow.Leaf()
            value.expires_ns = entry.expires_ns
            value.rule = entry.rule
            self._allow[key] = value
        current = self._allowed.get(index, set())
        for stale in current - wanted.keys():
            key = self._allow.Key.from_buffer_copy(stale[0])
            try:
                del self._allow[key]
            except KeyError:
                pass
        self._allowed[index] = set(wanted.keys())

    def _allow_key(self, index: int, entry: AllowEntry):
        addr, prefixlen = mapped_network(entry.network)
        key = self._allow.Key()
        key.prefixlen = _KEY_FIXED_BITS + prefixlen
        key.workload = index
        key.proto = PROTOCOLS[entry.protocol]
        key.port = entry.port
        ctypes.memmove(key.addr, addr, 16)
        return key

    # --- events ----------------------------------------------------------------------

    def on_record(self, handler: Callable[[KernelRecord], None]) -> None:
        self._bpf[b"events"].open_ring_buffer(lambda _ctx, data, size: handler(decode(data, size)))

    def poll(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def close(self) -> None:
        """Release the programs and maps held by this process. Attachments stay: the
        kernel keeps attached programs alive, which is what makes enforcement fail closed."""
        self._bpf.cleanup()

    @property
    def features(self) -> list[str]:
        """The hooks loaded, by program name: what this kernel let the agent use."""
        return [h.function for h in self._hooks] + ["ringbuf", "lpm_trie"]

    def lost_records(self) -> int:
        """Records the ring buffer had no room for since the programs were loaded."""
        return sum(self._bpf[b"lost_events"].getvalue(ctypes.c_int(0)))


def attached_warden_programs(cgroup: Path) -> list[tuple[int, bpfsys.AttachedProgram]]:
    """(attach type, program) for every Egress Warden program attached to `cgroup`."""
    found = []
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook in _hooks():
            found.extend(
                (hook.attach_type, p)
                for p in bpfsys.attached_programs(fd, hook.attach_type)
                if p.name.startswith(PROGRAM_PREFIX)
            )
    finally:
        os.close(fd)
    return found


def detach_all(cgroup: Path) -> int:
    """Detach every Egress Warden program from `cgroup` (this agent's and earlier ones')."""
    programs = attached_warden_programs(cgroup)
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type, program in programs:
            bpfsys.detach_by_id(program.id, fd, attach_type)
    finally:
        os.close(fd)
    return len(programs)
