"""The few bpf(2) commands bcc does not offer: listing, attaching and detaching the
programs on a cgroup by id (what lets a restarted agent find and replace the attachments
of the one before it), writing cgroup storage, running a program once from user space, and
reading pinned maps without loading any program."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from dataclasses import dataclass

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_OBJ_GET = 7
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_TEST_RUN = 10
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_MAP_GET_FD_BY_ID = 14
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16
_BPF_MAP_LOOKUP_BATCH = 24

BPF_F_ALLOW_MULTI = 2
_ATTR_SIZE = 128  # larger than every bpf_attr member used here; the kernel wants the tail zeroed
_PROG_INFO_SIZE = 232
_PROG_INFO_ID = 4
_PROG_INFO_NAME = slice(64, 80)
_PROG_INFO_NR_MAP_IDS = 52
_PROG_INFO_MAP_IDS = 56
_PROG_INFO_RUN_TIME_NS = 192  # then run_cnt: counted while kernel.bpf_stats_enabled is 1
_MAP_INFO_SIZE = 96
_MAP_INFO_NAME = slice(24, 40)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(2), made again when a signal interrupts it, as Python makes its own system calls
    (PEP 475): the kernel stops a repeated BPF_PROG_TEST_RUN at any pending signal (the agent's
    SIGHUP or SIGTERM, a profiler attaching), and the agent folds its counts that way."""
    while True:
        ret = _libc.syscall(_BPF_SYSCALL, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")


def _attr(fmt: str, *values: int) -> ctypes.Array:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


@dataclass(frozen=True)
class AttachedProgram:
    id: int
    name: str


def attach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    # ALLOW_MULTI: a child cgroup's own programs cannot replace ours, only add to them.
    _bpf(_BPF_PROG_ATTACH, _attr("IIII", cgroup_fd, prog_fd, attach_type, BPF_F_ALLOW_MULTI))


def detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _bpf(_BPF_PROG_DETACH, _attr("IIII", cgroup_fd, prog_fd, attach_type, 0))


def attached_program_ids(cgroup_fd: int, attach_type: int, capacity: int = 64) -> list[int]:
    ids = (ctypes.c_uint32 * capacity)()
    attr = _attr("IIIIQI", cgroup_fd, attach_type, 0, 0, ctypes.addressof(ids), capacity)
    _bpf(_BPF_PROG_QUERY, attr)
    count = struct.unpack_from("I", attr, 24)[0]
    return list(ids[:count])


def program_fd(prog_id: int) -> int:
    return _bpf(_BPF_PROG_GET_FD_BY_ID, _attr("I", prog_id))


def _program_info(prog_fd: int) -> bytes:
    """The program's struct bpf_prog_info, without the arrays it can point to."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, _attr("IIQ", prog_fd, _PROG_INFO_SIZE, ctypes.addressof(info)))
    return info.raw


def program_name(prog_fd: int) -> str:
    return _program_info(prog_fd)[_PROG_INFO_NAME].split(b"\0", 1)[0].decode()


def attached_programs(cgroup_fd: int, attach_type: int) -> list[AttachedProgram]:
    programs = []
    for prog_id in attached_program_ids(cgroup_fd, attach_type):
        try:
            fd = program_fd(prog_id)
        except FileNotFoundError:
            continue  # detached and freed since the query
        try:
            programs.append(AttachedProgram(prog_id, program_name(fd)))
        finally:
            os.close(fd)
    return programs


def detach_by_id(prog_id: int, cgroup_fd: int, attach_type: int) -> None:
    fd = program_fd(prog_id)
    try:
        detach(fd, cgroup_fd, attach_type)
    finally:
        os.close(fd)


def program_id(prog_fd: int) -> int:
    return struct.unpack_from("I", _program_info(prog_fd), _PROG_INFO_ID)[0]


def program_run_totals(prog_fd: int) -> tuple[int, int]:
    """Nanoseconds the program ran and how many runs, counted while kernel.bpf_stats_enabled is 1."""
    return struct.unpack_from("QQ", _program_info(prog_fd), _PROG_INFO_RUN_TIME_NS)


def program_map_names(prog_fd: int, capacity: int = 64) -> dict[str, int]:
    """The maps a program uses, by name (bcc truncates names to 15 characters) -> map id."""
    ids = (ctypes.c_uint32 * capacity)()
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    struct.pack_into("I", info, _PROG_INFO_NR_MAP_IDS, capacity)
    struct.pack_into("Q", info, _PROG_INFO_MAP_IDS, ctypes.addressof(ids))
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, _attr("IIQ", prog_fd, _PROG_INFO_SIZE, ctypes.addressof(info)))
    count = min(struct.unpack_from("I", info, _PROG_INFO_NR_MAP_IDS)[0], capacity)
    names = {}
    for map_id in ids[:count]:
        fd = _bpf(_BPF_MAP_GET_FD_BY_ID, _attr("I", map_id))
        try:
            map_info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
            _bpf(_BPF_OBJ_GET_INFO_BY_FD, _attr("IIQ", fd, _MAP_INFO_SIZE, ctypes.addressof(map_info)))
            names[map_info.raw[_MAP_INFO_NAME].split(b"\0", 1)[0].decode()] = map_id
        finally:
            os.close(fd)
    return names


def map_lookup(map_id: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key` in the map with id `map_id`, or None when there is none."""
    fd = _bpf(_BPF_MAP_GET_FD_BY_ID, _attr("I", map_id))
    try:
        return map_lookup_fd(fd, key, value_size)
    finally:
        os.close(fd)


def map_lookup_fd(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    try:
        _bpf(_BPF_MAP_LOOKUP_ELEM, _attr("IIQQ", map_fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value)))
    except FileNotFoundError:
        return None
    return value.raw


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    _bpf(_BPF_MAP_UPDATE_ELEM, _attr("IIQQQ", map_fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value_buf), 0))


def test_run(prog_fd: int, repeat: int, data: bytes = bytes(64)) -> int:
    """Run the program `repeat` times on a made-up packet (`data`, from its Ethernet header on)
    and return what its last run returned."""
    data_buf = ctypes.create_string_buffer(data, len(data))
    # prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration
    attr = _attr("IIIIQQII", prog_fd, 0, len(data), 0, ctypes.addressof(data_buf), 0, repeat, 0)
    _bpf(_BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("I", attr, 4)[0]


@dataclass(frozen=True)
class MapLayout:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


def open_pinned(path: str) -> int:
    name = ctypes.create_string_buffer(path.encode())
    return _bpf(_BPF_OBJ_GET, _attr("QII", ctypes.addressof(name), 0, 0))


def pinned_map_items(path: str, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the hash map pinned at `path`, read without loading any program:
    how tools and tests read the counters an agent keeps."""
    fd = open_pinned(path)
    try:
        return map_items(fd, key_size, value_size)
    finally:
        os.close(fd)


_BATCH_ENTRIES = 4096


def map_items(map_fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, _BATCH_ENTRIES to a system call (BPF_MAP_LOOKUP_BATCH).
    The agent reads its byte counters so once a second: entry by entry (bcc's items(), a
    get-next-key and a lookup each) took 23 us an entry here, 1.2 s for a full map; in batches
    the kernel takes 0.5 us an entry."""
    keys = ctypes.create_string_buffer(_BATCH_ENTRIES * key_size)
    values = ctypes.create_string_buffer(_BATCH_ENTRIES * value_size)
    token = ctypes.c_uint64(0)  # where the next batch starts: the kernel's, opaque to us
    items: list[tuple[bytes, bytes]] = []
    first = True
    while True:
        # in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
        attr = _attr("QQQQIIQQ", 0 if first else ctypes.addressof(token), ctypes.addressof(token),
                     ctypes.addressof(keys), ctypes.addressof(values), _BATCH_ENTRIES, map_fd, 0, 0)
        try:
            _bpf(_BPF_MAP_LOOKUP_BATCH, attr)
            done = False
        except FileNotFoundError:
            done = True  # ENOENT: this batch (perhaps empty) was the last
        count = struct.unpack_from("I", attr, 32)[0]
        items += zip(_split(keys.raw, key_size, count), _split(values.raw, value_size, count))
        if done:
            return items
        first = False


def _split(data: bytes, size: int, count: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, count * size, size)]


def pinned_array_bytes(path: str, size: int) -> bytes:
    """The values of the mmapable array pinned at `path`, `size` bytes of them, read in one go."""
    fd = open_pinned(path)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            return mapped[:]
    finally:
        os.close(fd)


def pinned_map_layout(path: str) -> MapLayout:
    """Type, key and value sizes and capacity of the map pinned at `path` (FileNotFoundError if none)."""
    fd = open_pinned(path)
    try:
        info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
        _bpf(_BPF_OBJ_GET_INFO_BY_FD, _attr("IIQ", fd, _MAP_INFO_SIZE, ctypes.addressof(info)))
        map_type, _id, key_size, value_size, max_entries, flags = struct.unpack_from("IIIIII", info, 0)
        return MapLayout(map_type, key_size, value_size, max_entries, flags)
    finally:
        os.close(fd)
