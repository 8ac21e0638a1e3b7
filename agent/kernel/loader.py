"""Compiles bpf/warden.bpf.c with bcc, attaches it to workload cgroups and keeps its maps
in step with the policy. The one place that speaks to the BPF programs."""
from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
import os
import socket
import struct
import threading
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
# An "any" rule goes in as tcp, udp and any: the programs look up tcp and udp under their
# own protocol and everything else under "any", two lookups per judgement instead of four.
_TRIE_PROTOCOLS = {"any": ("any", "tcp", "udp"), "tcp": ("tcp",), "udp": ("udp",)}
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/egress-warden")
_BPF_MAP_TYPE_ARRAY = 2
_BPF_MAP_TYPE_LRU_HASH = 9
_BPF_F_MMAPABLE = 1 << 10
SOCK_SLOTS = 262144  # bpf/warden.bpf.c
_FOLD_REGIONS = SOCK_SLOTS // 64  # bpf/warden.bpf.c (FOLD_REGION_SLOTS): one run of ew_fold each
# The layout bpf/warden.bpf.c gives its pinned maps. bcc reuses a pinned map whatever its
# layout and the verifier then refuses the programs with a bare EACCES, so it is checked first.
PINNED_MAPS = {
    "traffic": bpfsys.MapLayout(_BPF_MAP_TYPE_LRU_HASH, 32, 16, 65536),
    "sock_slots": bpfsys.MapLayout(_BPF_MAP_TYPE_ARRAY, 4, 64, SOCK_SLOTS, _BPF_F_MMAPABLE),
    "sock_owners": bpfsys.MapLayout(_BPF_MAP_TYPE_LRU_HASH, 8, 4, 65536),
}
# Layouts of earlier versions that are replaced, not refused: their loss costs only the owners
# of sockets opened before the upgrade (counted under pid 0 from then on), no counted byte.
REPLACED_LAYOUTS = {
    "sock_slots": bpfsys.MapLayout(_BPF_MAP_TYPE_ARRAY, 4, 48, SOCK_SLOTS),  # 0.1: no counters in slots
}
_GUARD_KEY = struct.Struct("=Q")  # struct guard is keyed by cgroup id alone
_GUARD_SIZE = 184  # sizeof(struct guard): workload_plus_one, then what only the programs write
_GUARD_SETTLE_SECONDS = 0.05  # for a program that read the old workload to finish


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
        Hook("ew_recvmsg4", P.CGROUP_SOCK_ADDR, A.CGROUP_UDP4_RECVMSG),
        Hook("ew_recvmsg6", P.CGROUP_SOCK_ADDR, A.CGROUP_UDP6_RECVMSG),
        Hook("ew_getpeername4", P.CGROUP_SOCK_ADDR, A.CGROUP_INET4_GETPEERNAME),
        Hook("ew_getpeername6", P.CGROUP_SOCK_ADDR, A.CGROUP_INET6_GETPEERNAME),
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

    def __init__(self, source: Path = BPF_SOURCE, pin_dir: Path = DEFAULT_PIN_DIR) -> None:
        from bcc import BPF, lib
        from bcc.utils import get_possible_cpus

        started = time.monotonic()
        self.pin_dir = Path(pin_dir)
        pin_dir_is_new = not self.pin_dir.exists()
        self.pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_pinned_maps(self.pin_dir)
        self._hooks = _hooks()
        try:
            self._bpf = BPF(src_file=str(source).encode(),
                            cflags=["-Wno-macro-redefined", f'-DEW_PIN_DIR="{self.pin_dir}"'])
            self._functions = {
                h.function: self._bpf.load_func(h.function.encode(), h.prog_type, attach_type=h.attach_type)
                for h in self._hooks
            }
            self._fold = self._bpf.load_func(b"ew_fold", BPF.SOCKET_FILTER)
        except Exception:
            # bcc pins each map as it creates it (before any program is verified), so the
            # directory must exist first; one this load made holds nobody's counters when the
            # compile or a program's verification fails.
            if pin_dir_is_new:
                remove_pins(self.pin_dir)
            raise
        self._own_ids = {bpfsys.program_id(f.fd) for f in self._functions.values()}
        self._guard_fd = lib.bpf_table_fd(self._bpf.module, b"guard")
        self._cpus = len(get_possible_cpus())  # a per-CPU value holds one copy for each
        self._allow = self._bpf[b"allow"]
        self._allowed: dict[int, set[tuple[bytes, int]]] = {}
        # DNS answers' entries by workload: (key bytes, prefixlen) -> expires_ns. Written by
        # the DNS proxy's thread, so the allow map's bookkeeping takes a lock.
        self._dynamic: dict[int, dict[tuple[bytes, int], int]] = {}
        self._allow_lock = threading.Lock()
        # Sockets cache verdicts by generation in a pinned map, so generations must never
        # repeat across agent restarts: start from the clock, which only moves forward.
        self._generation = time.monotonic_ns()
        # traffic_changes (the agent's accounting thread) reads the map by fd; its last read:
        # raw key -> (raw value, the counter decoded from them)
        self._traffic_fd = self._bpf[b"traffic"].map_fd
        self._decoded_traffic: dict[bytes, tuple[bytes, TrafficCounter]] = {}
        self.load_seconds = time.monotonic() - started

    # --- attachment ---------------------------------------------------------------

    def guard(self, cgroup: Path, cgroup_id: int, index: int) -> int:
        """Enforce workload `index` on `cgroup`: bind its id, attach every hook, name the
        workload in the cgroup's storage, then detach what an earlier agent left there. Ours go
        on first, so there is no moment without enforcement (and until the storage is written,
        ours find the workload by the id bound before). Returns how many stale programs were
        replaced."""
        self._bpf[b"cgroup_workload"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint32(index)
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            stale = []
            for hook in self._hooks:
                attached = bpfsys.attached_programs(fd, hook.attach_type)
                if not any(p.id in self._own_ids for p in attached):
                    bpfsys.attach(self._functions[hook.function].fd, fd, hook.attach_type)
                stale += [(hook, p) for p in attached if p.name == hook.function and p.id not in self._own_ids]
            self._name_workload(cgroup_id, index)
            for hook, program in stale:
                bpfsys.detach_by_id(program.id, fd, hook.attach_type)
        finally:
            os.close(fd)
        return len(stale)

    def detach_left_behind(self, root: Path, guarded: set[Path]) -> list[Path]:
        """Detach what an earlier agent of this pin directory left on cgroups this one does not
        guard (a workload taken out of the policy while no agent ran), as a reload detaches a
        workload it drops; without it the old programs would go on enforcing the old policy
        there, with nobody reading their events. An earlier agent of this pin directory is
        told by its egress program, to which bcc gave the same pinned `traffic` map; its other
        programs go with it, as guard() replaces a set. Other agents' cgroups are not touched.
        Returns the cgroups it detached from."""
        traffic_id = bpfsys.program_map_names(self._functions["ew_egress"].fd)["traffic"]
        detached = []
        for directory, _, _ in os.walk(root):
            cgroup = Path(directory)
            if cgroup in guarded:
                continue
            try:
                programs = attached_warden_programs(cgroup)
                if any(p.name == "ew_egress" and traffic_id in _maps_of_program(p.id).values() for _, p in programs):
                    _detach_programs(cgroup, programs)
                    detached.append(cgroup)
            except FileNotFoundError:  # the cgroup, or a program, went while we looked
                continue
        return detached

    def _name_workload(self, cgroup_id: int, index: int) -> None:
        """Write the workload into the cgroup's storage (on every CPU), once: the programs own
        the rest of it from then on, and a write from here would race theirs. Only a cgroup that
        changes workload is written again, by way of 0 (no entry read or written) for a moment."""
        key = _GUARD_KEY.pack(cgroup_id)
        current = bpfsys.map_lookup_fd(self._guard_fd, key, _GUARD_SIZE * self._cpus)
        named = int.from_bytes(current[:4], "little") if current else 0
        if named == index + 1:
            return
        if named:
            bpfsys.map_update(self._guard_fd, key, bytes(_GUARD_SIZE * self._cpus))
            time.sleep(_GUARD_SETTLE_SECONDS)
        per_cpu = (index + 1).to_bytes(4, "little") + bytes(_GUARD_SIZE - 4)
        bpfsys.map_update(self._guard_fd, key, per_cpu * self._cpus)

    def detach(self, cgroup: Path) -> None:
        detach_all(cgroup)

    # --- maps ----------------------------------------------------------------------

    def set_workload(self, index: int, *, mode: str, quarantined: bool, dns: bool) -> None:
        """Activate or update a workload. Bumps its generation, so the egress backstop
        re-judges every established socket against the current allowlist."""
        table = self._bpf[b"workloads"]
        state = table.Leaf()
        self._generation += 1
        state.active = 1
        state.mode = MODES[mode]
        state.quarantined = int(quarantined)
        state.dns = int(dns)
        state.generation = self._generation
        table[ctypes.c_int(index)] = state

    def deactivate_workload(self, index: int) -> None:
        self._bpf[b"workloads"][ctypes.c_int(index)] = self._bpf[b"workloads"].Leaf()
        self.replace_allowlist(index, [])
        self.forget_dns_entries(index)
        self.set_listen_ports(index, [])

    def unbind_cgroup(self, cgroup_id: int) -> None:
        table = self._bpf[b"cgroup_workload"]
        key = ctypes.c_uint64(cgroup_id)
        if key in table:
            del table[key]

    def member_of(self, pid: int) -> int | None:
        """The workload index the kernel counts `pid` a member of, if any."""
        value = self._bpf[b"members"].get(ctypes.c_uint32(pid))
        return None if value is None else value.value

    def add_members(self, index: int, pids: Iterable[int]) -> None:
        table = self._bpf[b"members"]
        for pid in pids:
            table[ctypes.c_uint32(pid)] = ctypes.c_uint32(index)

    def set_discovery(self, enabled: bool) -> None:
        self._bpf[b"config"][ctypes.c_int(0)] = ctypes.c_uint32(int(enabled))

    def set_listen_ports(self, index: int, ports: Iterable[int]) -> None:
        """Only what changed is written: a port deleted and added again by a reload would drop
        the replies of a connection accepted in between (judged as egress, and refused)."""
        table = self._bpf[b"listen_ports"]
        wanted = set(ports)
        held = {k.port: k for k in table.keys() if k.workload == index}
        for port in held.keys() - wanted:
            del table[held[port]]
        for port in wanted - held.keys():
            key = table.Key()
            key.workload = index
            key.port = port
            table[key] = ctypes.c_uint8(1)

    def replace_allowlist(self, index: int, entries: Iterable[AllowEntry]) -> None:
        """Make the workload's static allowlist exactly `entries`: new ones go in before old
        ones go out, so a destination kept by both policies is never refused in between.
        Entries from DNS answers stay (a policy reload does not forget what was resolved)."""
        wanted = {}
        for entry in entries:
            for key in self._allow_keys(index, entry):
                wanted[(bytes(key), key.prefixlen)] = (key, entry)
        with self._allow_lock:
            for key, entry in wanted.values():
                self._write_allow(key, entry.expires_ns, entry.rule)
            dynamic = self._dynamic.get(index, {})
            for stale in self._allowed.get(index, set()) - wanted.keys():
                key = self._allow.Key.from_buffer_copy(stale[0])
                if stale in dynamic:
                    self._write_allow(key, dynamic[stale], 0)  # a DNS answer still holds it
                else:
                    self._delete_allow(key)
            self._allowed[index] = set(wanted.keys())

    def allow_until(self, index: int, entries: Iterable[AllowEntry], slack_ns: int = 0) -> None:
        """Allow DNS answers' addresses until each entry's expires_ns (CLOCK_MONOTONIC). An
        entry never shortens a later expiry already written. An address the static list also
        allows is only remembered, so that it stays allowed if a reload drops the static rule.
        An entry already lasting until `slack_ns` before the new expiry is left as it is
        (saves a map write per answer of a busy name)."""
        with self._allow_lock:
            static = self._allowed.get(index, set())
            dynamic = self._dynamic.setdefault(index, {})
            for entry in entries:
                for key in self._allow_keys(index, entry):
                    ident = (bytes(key), key.prefixlen)
                    if dynamic.get(ident, 0) >= entry.expires_ns - slack_ns:
                        continue
                    dynamic[ident] = entry.expires_ns
                    if ident not in static:
                        self._write_allow(key, entry.expires_ns, entry.rule)

    def replace_dns_entries(self, index: int, entries: Iterable[AllowEntry]) -> None:
        """Make the workload's entries from DNS answers exactly `entries`: new ones go in before
        the others go out, so what both allow is never refused in between."""
        with self._allow_lock:
            static = self._allowed.get(index, set())
            dynamic = self._dynamic.setdefault(index, {})
            wanted = set()
            for entry in entries:
                for key in self._allow_keys(index, entry):
                    ident = (bytes(key), key.prefixlen)
                    wanted.add(ident)
                    if dynamic.get(ident) != entry.expires_ns:
                        dynamic[ident] = entry.expires_ns
                        if ident not in static:
                            self._write_allow(key, entry.expires_ns, entry.rule)
            for ident in dynamic.keys() - wanted:
                del dynamic[ident]
                if ident not in static:
                    self._delete_allow(self._allow.Key.from_buffer_copy(ident[0]))

    def remove_dns_entries(self, index: int, now_ns: int, keep: Callable[[str, int, int], bool]) -> int:
        """Delete expired DNS entries of the workload unless `keep(address, protocol, port)`
        (an established socket still uses it). Returns how many went."""
        removed = 0
        with self._allow_lock:
            dynamic = self._dynamic.get(index, {})
            static = self._allowed.get(index, set())
            for ident, expires in list(dynamic.items()):
                if expires > now_ns or keep(*self._describe_key(ident[0])):
                    continue
                del dynamic[ident]
                if ident not in static:
                    self._delete_allow(self._allow.Key.from_buffer_copy(ident[0]))
                removed += 1
        return removed

    def dns_addresses(self, index: int) -> set[str]:
        """The addresses the workload's allow map holds because of DNS answers."""
        with self._allow_lock:
            return {self._describe_key(ident[0])[0] for ident in self._dynamic.get(index, {})}

    def forget_dns_entries(self, index: int) -> None:
        with self._allow_lock:
            static = self._allowed.get(index, set())
            for ident in self._dynamic.pop(index, {}):
                if ident not in static:
                    self._delete_allow(self._allow.Key.from_buffer_copy(ident[0]))

    def _describe_key(self, raw: bytes) -> tuple[str, int, int]:
        key = self._allow.Key.from_buffer_copy(raw)
        addr = ipaddress.IPv6Address(bytes(key.addr))
        return str(addr.ipv4_mapped or addr), key.proto, key.port

    def _write_allow(self, key, expires_ns: int, rule: int) -> None:
        value = self._allow.Leaf()
        value.expires_ns = expires_ns
        value.rule = rule
        self._allow[key] = value

    def _delete_allow(self, key) -> None:
        try:
            del self._allow[key]
        except KeyError:
            pass

    def set_dns_proxy(self, netns_cookie: int, index: int, port: int | None) -> None:
        """Point the workload's port 53 in that network namespace at the proxy's loopback
        port, or (None) refuse it again."""
        table = self._bpf[b"dns_proxy"]
        key = table.Key()
        key.netns = netns_cookie
        key.workload = index
        if port is not None:
            table[key] = ctypes.c_uint32(port)
        elif key in table:
            del table[key]

    def _allow_keys(self, index: int, entry: AllowEntry) -> list:
        """The trie keys of one entry: an "any protocol" entry is written for tcp, udp and
        any, so the kernel judges with two lookups instead of four."""
        addr, prefixlen = mapped_network(entry.network)
        keys = []
        for protocol in _TRIE_PROTOCOLS[entry.protocol]:
            key = self._allow.Key()
            key.prefixlen = _KEY_FIXED_BITS + prefixlen
            key.workload = index
            key.proto = PROTOCOLS[protocol]
            key.port = entry.port
            ctypes.memmove(key.addr, addr, 16)
            keys.append(key)
        return keys

    # --- traffic counters ----------------------------------------------------------------

    def traffic_changes(self) -> TrafficChanges:
        """The (workload, process, destination) counters that changed since the last call
        (all of them at the first), cumulative, and those evicted meanwhile: what the sockets
        counted since the last call is folded in first. The whole map is read every time (one
        system call per 4096 counters), but only what changed is decoded."""
        bpfsys.test_run(self._fold.fd, repeat=_FOLD_REGIONS)
        raw = bpfsys.map_items(self._traffic_fd, TRAFFIC_KEY.size, TRAFFIC_VALUE.size)
        known, decoded, changed = self._decoded_traffic, {}, []
        for raw_key, raw_value in raw:
            previous = known.get(raw_key)
            if previous and previous[0] == raw_value:
                decoded[raw_key] = previous
            else:
                decoded[raw_key] = (raw_value, _traffic_counter(raw_key, raw_value))
                changed.append(decoded[raw_key][1])
        gone = [known[raw_key][1] for raw_key in known.keys() - decoded.keys()]
        self._decoded_traffic = decoded
        return TrafficChanges(changed, gone)

    # --- events ----------------------------------------------------------------------

    def on_record(self, handler: Callable[[KernelRecord], None]) -> None:
        # ctypes prints an exception raised in a callback and carries on, so a bug in a handler
        # would lose its record (and the kill it should cause) with no more than a line on
        # stderr. It is kept, the read stops there (a negative return), and poll raises it.
        def call_handler(_ctx, data, size) -> int:
            try:
                handler(decode(data, size))
            except BaseException as e:
                self._handler_failure = e
                return -1
            return 0

        self._handler_failure: BaseException | None = None
        self._bpf[b"events"].open_ring_buffer(call_handler)

    def poll(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)
        failure, self._handler_failure = self._handler_failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Release the programs and maps held by this process. Attachments stay: the
        kernel keeps attached programs alive, which is what makes enforcement fail closed."""
        self._bpf.cleanup()

    @property
    def hook_programs(self) -> dict[str, int]:
        """The program attached at each hook, by function name -> its fd."""
        return {name: function.fd for name, function in self._functions.items()}

    @property
    def features(self) -> list[str]:
        """The hooks loaded, by program name: what this kernel let the agent use."""
        return [h.function for h in self._hooks] + ["ringbuf", "lpm_trie"]

    def lost_records(self) -> int:
        """Records the ring buffer had no room for since the programs were loaded."""
        return sum(self._bpf[b"lost_events"].getvalue(ctypes.c_int(0)))


@dataclass(frozen=True)
class TrafficCounter:
    """Bytes and packets sent by one process of a workload to one destination (or, with
    `listen`, replies to clients on one listen port), since the counter was created."""

    workload: int
    tgid: int  # 0: a socket whose process no hook saw (opened before enforcement began)
    address: str | None  # None for the listen bucket
    port: int
    protocol: int
    listen: bool
    bytes: int
    packets: int


@dataclass(frozen=True)
class TrafficChanges:
    changed: list[TrafficCounter]  # new or grown since the last read, with their totals
    gone: list[TrafficCounter]  # no longer in the kernel's map (LRU-evicted), as last read


# struct traffic_key: workload, tgid, addr, port, proto, listen, pad; struct traffic_value.
# Public for what writes counters as the kernel would (tests, bench/accounting.py).
TRAFFIC_KEY = struct.Struct("=II16sHBBI")
TRAFFIC_VALUE = struct.Struct("=QQ")


def _traffic_counter(raw_key: bytes, raw_value: bytes) -> TrafficCounter:
    workload, tgid, addr, port, proto, listen, _ = TRAFFIC_KEY.unpack(raw_key)
    byte_count, packets = TRAFFIC_VALUE.unpack(raw_value)
    return TrafficCounter(workload=workload, tgid=tgid, address=_address_text(addr), port=port, protocol=proto,
                          listen=bool(listen), bytes=byte_count, packets=packets)


# struct sock_info: cookie, generation, addr, tgid, workload, port, proto, listen, kept, pad,
# seen, packets, bytes (the last two not yet folded into `traffic`). Public like TRAFFIC_KEY.
SOCK_INFO = struct.Struct("=QQ16sIHHBBBBIQQ")
_SLOT_WORDS = SOCK_INFO.size // 8  # the slot as u64s: packets and bytes are the last two


def read_pinned_traffic(pin_dir: Path) -> list[TrafficCounter]:
    """The byte counters an agent pinned in `pin_dir`, read without the agent: `traffic`, plus
    what the sockets counted since the agent last folded their slots into it."""
    totals: dict[tuple, list[int]] = {}

    def add(key: tuple, byte_count: int, packet_count: int) -> None:
        total = totals.setdefault(key, [0, 0])
        total[0] += byte_count
        total[1] += packet_count

    for raw_key, raw_value in bpfsys.pinned_map_items(str(pin_dir / "traffic"), TRAFFIC_KEY.size,
                                                      TRAFFIC_VALUE.size):
        workload, tgid, addr, port, proto, listen, _ = TRAFFIC_KEY.unpack(raw_key)
        add((workload, tgid, addr, port, proto, bool(listen)), *TRAFFIC_VALUE.unpack(raw_value))
    for slot in _unfolded_slots(pin_dir / "sock_slots"):
        _, _, addr, tgid, workload, port, proto, listen, _, _, _, packets, byte_count = slot
        add((workload, tgid, bytes(16) if listen else addr, port, proto, bool(listen)), byte_count, packets)
    return [TrafficCounter(workload=w, tgid=t, address=_address_text(a), port=port, protocol=proto, listen=listen,
                           bytes=b, packets=n) for (w, t, a, port, proto, listen), (b, n) in totals.items()]


def _unfolded_slots(path: Path) -> list[tuple]:
    try:
        data = bpfsys.pinned_array_bytes(str(path), SOCK_SLOTS * SOCK_INFO.size)
    except FileNotFoundError:
        return []
    words = memoryview(data).cast("Q")
    packets, byte_counts = words[_SLOT_WORDS - 2::_SLOT_WORDS], words[_SLOT_WORDS - 1::_SLOT_WORDS]
    return [SOCK_INFO.unpack_from(data, i * SOCK_INFO.size) for i in range(SOCK_SLOTS) if packets[i] or byte_counts[i]]


@functools.lru_cache(maxsize=65536)  # a few addresses recur across many counters
def _address_text(packed: bytes) -> str | None:
    if packed == bytes(16):
        return None
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)


class PinnedMapError(RuntimeError):
    """A map pinned where the agent keeps its own has another layout: refused, never replaced
    silently, because replacing it loses the byte counters."""


def check_pinned_maps(pin_dir: Path) -> None:
    for name, expected in PINNED_MAPS.items():
        path = pin_dir / name
        try:
            found = bpfsys.pinned_map_layout(str(path))
        except FileNotFoundError:
            continue
        if found == expected:
            continue
        if found == REPLACED_LAYOUTS.get(name):
            # Unpinning leaves the map to the older agent's programs until this one takes over.
            path.unlink()
            log.warning("replaced %s, pinned by an earlier version with another layout (%s)", path, found)
            continue
        raise PinnedMapError(
            f"{path} is pinned with another layout ({found}) than this version of Egress Warden "
            f"uses ({expected}): an older or newer agent made it. Remove it (rm {path}; this resets "
            f"the byte counters) or start the agent with another --pin-dir")


def remove_pins(pin_dir: Path) -> list[str]:
    """Forget the pinned maps (byte counters and socket owners) and the directory if empty;
    returns the names of the maps that were there."""
    removed = []
    for name in PINNED_MAPS:
        try:
            (pin_dir / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    try:
        pin_dir.rmdir()
    except OSError:
        pass
    return removed


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
    _detach_programs(cgroup, programs)
    return len(programs)


def _detach_programs(cgroup: Path, programs: list[tuple[int, bpfsys.AttachedProgram]]) -> None:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type, program in programs:
            bpfsys.detach_by_id(program.id, fd, attach_type)
    finally:
        os.close(fd)


def _maps_of_program(prog_id: int) -> dict[str, int]:
    """The maps of a program found by its id (an earlier agent's), by name -> map id."""
    prog_fd = bpfsys.program_fd(prog_id)
    try:
        return bpfsys.program_map_names(prog_fd)
    finally:
        os.close(prog_fd)


def dns_proxy_ready(cgroup: Path, cgroup_id: int, netns_cookie: int) -> bool | None:
    """Read from the agent's own maps (found through the programs attached to `cgroup`)
    whether its DNS proxy listens in that network namespace for the workload. None: the
    workload has no DNS proxy (no fqdn rules), or no agent guards the cgroup."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        programs = [p for p in bpfsys.attached_programs(fd, _hooks()[0].attach_type) if p.name == "ew_connect4"]
    finally:
        os.close(fd)
    if not programs:
        return None
    maps = _maps_of_program(programs[0].id)
    index = bpfsys.map_lookup(maps["cgroup_workload"], cgroup_id.to_bytes(8, "little"), 4)
    if index is None or "dns_proxy" not in maps:
        return None  # not guarded, or an agent from before the DNS proxy
    state = bpfsys.map_lookup(maps["workloads"], bytes(index), 24)
    if state is None or not int.from_bytes(state[12:16], "little"):
        return None  # workload_state.dns
    key = netns_cookie.to_bytes(8, "little") + index + bytes(4)
    return bpfsys.map_lookup(maps["dns_proxy"], key, 4) is not None
