"""Why a TLS connection to an agent failed, in words an operator can act on.

gRPC reports a refused client certificate only as "Socket closed": the agent's TLS stack
closes the connection without an alert. One handshake of our own tells the cases apart:
a server certificate that does not verify fails the handshake here; a client certificate
the agent does not trust lets the handshake finish and then the agent hangs up before its
first HTTP/2 frame, which a gRPC server that accepted us always sends."""
from __future__ import annotations

import socket
import ssl

from agent.collector.config import TlsFiles

_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def diagnose(address: str, tls: TlsFiles, server_name: str | None, timeout: float = 5.0) -> str | None:
    """A one-line reason when TLS is what stops us; None when TLS is not the problem (or unknown)."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as e:
        return f"cannot use the client certificate {tls.cert} with key {tls.key}: {e}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=server_name or host) as tls_socket:
                tls_socket.sendall(_HTTP2_PREFACE)
                answered = tls_socket.recv(9)
        except ssl.SSLCertVerificationError as e:
            return (f"TLS: the agent's server certificate does not verify against {tls.ca}: {e.verify_message} "
                    "(check --tls-ca, or the agent's server_name)")
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
            answered = b""
        except ssl.SSLError as e:
            return f"TLS handshake failed: {e.reason or e}"
        except OSError:
            return None
    if answered:
        return None
    return (f"TLS refused by the agent: it does not trust this collector's client certificate {tls.cert} "
            "(the agent's --tls-client-ca must be the CA that signed it)")
