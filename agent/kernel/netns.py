"""Network namespaces of workload processes. A socket stays in the namespace it was created
in, so a thread that enters a process's namespace can open sockets there that the rest of the
agent then uses from its own namespace (sock_diag requests, the DNS proxy's listeners)."""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_SO_NETNS_COOKIE = 71

_libc = ctypes.CDLL(None, use_errno=True)


def netns_inode(pid: int) -> int:
    """Identifies the network namespace of `pid` while it lives (FileNotFoundError: gone)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def netns_cookie(sock: socket.socket) -> int:
    """The kernel's cookie of the socket's namespace: what bpf_get_netns_cookie returns."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0]


def in_netns_of(pid: int, work: Callable[[], T]) -> T:
    """Run `work` in a thread that has entered the network namespace of `pid`; the thread
    ends there, so no other thread of the agent moves."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        return in_netns(fd, work, f"the network namespace of {pid}")
    finally:
        os.close(fd)


def in_netns(netns_fd: int, work: Callable[[], T], what: str = "a network namespace") -> T:
    """Run `work` in a thread that has entered the namespace `netns_fd` refers to."""
    result: list[T] = []
    failure: list[BaseException] = []

    def enter_and_work() -> None:
        try:
            if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {what}: {os.strerror(err)}")
            result.append(work())
        except BaseException as e:  # carried to the caller's thread
            failure.append(e)

    worker = threading.Thread(target=enter_and_work, name="netns")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]
