"""Counting sink for agent/lab/network.py: listens on one address and counts every byte.

The running totals live in a JSON state file, {"bytes": N, "connections": N}
("connections" counts datagrams for UDP), rewritten atomically after every
receive. The file first appears, with zeros, once the socket is bound (and, for
TCP, listening), so its existence is the ready signal.

Usage: sink_server.py --proto tcp|udp --host IP --port N --state FILE [--reply]
"""

import argparse
import contextlib
import ipaddress
import json
import os
import selectors
import socket

RECEIVE_SIZE = 65536
REPLY = b"ok\n"


class Totals:
    def __init__(self, state_path: str) -> None:
        self.state_path = state_path
        self.bytes = 0
        self.connections = 0

    def save(self) -> None:
        # Readers poll the file: a rename means they never see a half-written one.
        temporary_path = self.state_path + ".tmp"
        with open(temporary_path, "w") as state:
            json.dump({"bytes": self.bytes, "connections": self.connections}, state)
        os.replace(temporary_path, self.state_path)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto", choices=("tcp", "udp"), required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--reply", action="store_true", help="TCP: answer each connection's first chunk with ok")
    return parser.parse_args()


def bound_socket(proto: str, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve_udp(sock: socket.socket, totals: Totals) -> None:
    while True:
        datagram = sock.recv(RECEIVE_SIZE)
        totals.bytes += len(datagram)
        totals.connections += 1
        totals.save()


class TcpSink:
    """Accepts any number of connections on one listener and counts what they send."""

    def __init__(self, listener: socket.socket, totals: Totals, reply: bool) -> None:
        self.listener = listener
        self.totals = totals
        self.reply = reply
        self.owe_reply: set[socket.socket] = set()
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.receive(key.fileobj)

    def accept(self) -> None:
        connection, _ = self.listener.accept()
        self.selector.register(connection, selectors.EVENT_READ)
        if self.reply:
            self.owe_reply.add(connection)
        self.totals.connections += 1
        self.totals.save()

    def receive(self, connection: socket.socket) -> None:
        try:
            chunk = connection.recv(RECEIVE_SIZE)
        except ConnectionError:
            chunk = b""
        if not chunk:
            self.drop(connection)
            return
        self.totals.bytes += len(chunk)
        self.totals.save()
        if connection in self.owe_reply:
            self.owe_reply.discard(connection)
            # A client that already hung up must not take the whole sink down.
            with contextlib.suppress(ConnectionError):
                connection.sendall(REPLY)

    def drop(self, connection: socket.socket) -> None:
        self.selector.unregister(connection)
        self.owe_reply.discard(connection)
        connection.close()


def main() -> None:
    arguments = parse_arguments()
    sock = bound_socket(arguments.proto, arguments.host, arguments.port)
    totals = Totals(arguments.state)
    if arguments.proto == "udp":
        totals.save()
        serve_udp(sock, totals)
    else:
        sock.listen(128)
        totals.save()
        TcpSink(sock, totals, arguments.reply).serve()


if __name__ == "__main__":
    main()
