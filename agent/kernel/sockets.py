"""A process's inet sockets, read from /proc in the process's own network namespace, and
SOCK_DESTROY through sock_diag (CONFIG_INET_DIAG_DESTROY) to cut the ones it may not keep."""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.kernel.netns import in_netns_of

_NETLINK_SOCK_DIAG = 4
_SOCK_DESTROY = 21
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2
_TCP_LISTEN = 0x0A
_TABLES = (("tcp", socket.AF_INET, socket.IPPROTO_TCP), ("tcp6", socket.AF_INET6, socket.IPPROTO_TCP),
           ("udp", socket.AF_INET, socket.IPPROTO_UDP), ("udp6", socket.AF_INET6, socket.IPPROTO_UDP))



@dataclass(frozen=True)
class InetSocket:
    family: int
    protocol: int
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    state: int
    inode: int

    @property
    def connected(self) -> bool:
        return self.remote_port != 0 and self.state != _TCP_LISTEN

    @property
    def remote_ip_unmapped(self) -> str:
        addr = ipaddress.ip_address(self.remote_ip)
        return str(addr.ipv4_mapped) if getattr(addr, "ipv4_mapped", None) else self.remote_ip

    @property
    def protocol_name(self) -> str:
        return "tcp" if self.protocol == socket.IPPROTO_TCP else "udp"


def _parse_hex_address(text: str, family: int) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    # /proc prints each 32-bit word in host byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words), int(port, 16)


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def process_sockets(pid: int) -> list[InetSocket]:
    """The TCP and UDP sockets `pid` holds open, as its own network namespace sees them."""
    owned = _socket_inodes(pid)
    found = []
    for table, family, protocol in _TABLES:
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            inode = int(fields[9])
            if inode not in owned:
                continue
            local_ip, local_port = _parse_hex_address(fields[1], family)
            remote_ip, remote_port = _parse_hex_address(fields[2], family)
            found.append(InetSocket(family, protocol, local_ip, local_port, remote_ip, remote_port,
                                    int(fields[3], 16), inode))
    return found


def _destroy_request(sock: InetSocket) -> bytes:
    src = socket.inet_pton(sock.family, sock.local_ip).ljust(16, b"\0")
    dst = socket.inet_pton(sock.family, sock.remote_ip).ljust(16, b"\0")
    sockid = struct.pack("!HH", sock.local_port, sock.remote_port) + src + dst
    sockid += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    req = struct.pack("=BBBxI", sock.family, sock.protocol, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(req), _SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
    return header + req


def _destroy_in_current_netns(sock: InetSocket) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.send(_destroy_request(sock))
        reply = nl.recv(4096)
    _length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
    if msg_type == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, 16)[0]
        if error:
            raise OSError(error, f"SOCK_DESTROY {sock}: {os.strerror(error)}")


def destroy_socket(pid: int, sock: InetSocket) -> None:
    """Destroy `sock` of process `pid`. sock_diag answers per network namespace, so the
    request is sent from inside the process's namespace."""
    in_netns_of(pid, lambda: _destroy_in_current_netns(sock))
