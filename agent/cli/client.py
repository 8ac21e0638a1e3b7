"""How the SRE commands reach an agent: the local Unix socket, or a remote agent over
mutual TLS; gRPC failures become one line saying what to do, with a documented exit code."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from agent.cli.values import PEM_FILE, PRIVATE_KEY_FILE

DEFAULT_SOCKET = "/run/egress-warden/agent.sock"
SOCKET_ENV = "WARDEN_SOCKET"
CALL_SECONDS = 15.0  # deadline of every call but an event stream
MAX_REPLY_BYTES = 16 << 20  # as the agent's own send limit: a long `warden ps` fits

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4

EXIT_CODES_HELP = """\b
Exit status:
  0  success
  1  the agent said no (unknown workload, policy refused, ...)
  2  usage error
  3  no agent answers (not running, wrong --socket, no permission on the socket)
  4  refused over TCP: control calls are served on the Unix socket only"""

START_HINT = "start it (as root) with `warden agent --policy FILE`, or point at another with --socket / $" + SOCKET_ENV


class CallFailed(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"warden: {self.message}", err=True)


@dataclass(frozen=True)
class Target:
    socket: str
    server: str | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None

    @property
    def where(self) -> str:
        return self.server or f"unix:{self.socket}"

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", MAX_REPLY_BYTES)]
        if not self.server:
            return grpc.insecure_channel(f"unix:{self.socket}", options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes(),
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None)
        return grpc.secure_channel(self.server, credentials, options=options)


def target_options(command: Callable) -> Callable:
    """--socket / --server and the TLS files, turned into one `target` argument."""

    @click.option("--socket", "socket_path", metavar="PATH", envvar=SOCKET_ENV, default=DEFAULT_SOCKET, show_default=True,
                  help=f"The agent's Unix socket (or ${SOCKET_ENV}).")
    @click.option("--server", metavar="HOST:PORT", help="A remote agent's TCP address (mutual TLS; read-only calls).")
    @click.option("--tls-ca", type=PEM_FILE,
                  help="With --server: the CA that signed the agent's certificate.")
    @click.option("--tls-cert", type=PEM_FILE,
                  help="With --server: this client's certificate.")
    @click.option("--tls-key", type=PRIVATE_KEY_FILE,
                  help="With --server: this client's private key.")
    @functools.wraps(command)
    def wrapped(socket_path: str, server: str | None, tls_ca: Path | None, tls_cert: Path | None,
                tls_key: Path | None, **kwargs: Any) -> Any:
        if server and not tls_ca:
            raise click.UsageError("--server needs --tls-ca (and --tls-cert/--tls-key: the agent requires a client certificate)")
        if not server and (tls_ca or tls_cert or tls_key):
            raise click.UsageError("--tls-ca, --tls-cert and --tls-key go with --server HOST:PORT")
        return command(target=Target(socket_path, server, tls_ca, tls_cert, tls_key), **kwargs)

    return wrapped


def output_option(command: Callable) -> Callable:
    return click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
                        help="table for people, json for scripts.")(command)


class Client:
    """One connection to an agent; every call maps gRPC failures to CallFailed."""

    def __init__(self, target: Target) -> None:
        from agent.api.gen.egress_warden.v1 import agent_pb2_grpc

        self.target = target
        self._channel = target.channel()
        self.stub = agent_pb2_grpc.AgentStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self._channel.close()

    def call(self, method: str, request: Message) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=CALL_SECONDS)
        except grpc.RpcError as error:
            raise self._failure(error) from None

    def stream(self, method: str, request: Message) -> Iterator[Any]:
        try:
            yield from getattr(self.stub, method)(request)
        except grpc.RpcError as error:
            raise self._failure(error) from None

    def _failure(self, error: grpc.RpcError) -> CallFailed:
        code, details = error.code(), error.details() or ""
        where = self.target.where
        if code == grpc.StatusCode.UNAVAILABLE:
            if "Permission denied" in details:
                return CallFailed(f"no permission to use {where}: run as root or as a member of the socket's "
                                  "group (warden agent --socket-group)", EXIT_UNREACHABLE)
            if self.target.server:
                return CallFailed(f"no agent answers at {where} ({_first_line(details)}); check the address and "
                                  "the TLS files", EXIT_UNREACHABLE)
            return CallFailed(f"no agent answers at {where}: {START_HINT}", EXIT_UNREACHABLE)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CallFailed(f"the agent at {where} did not answer within {CALL_SECONDS:.0f} s", EXIT_UNREACHABLE)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return CallFailed(details, EXIT_REFUSED)
        return CallFailed(f"{_first_line(details)} ({code.name.lower()})", EXIT_FAILED)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def echo_table(headers: list[str], rows: Iterable[list[Any]]) -> None:
    """Columns as wide as their widest cell; the last column is not padded."""
    cells = [headers, *([("-" if c is None or c == "" else str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + ("  " if len(row) > 1 else "") + row[-1])

