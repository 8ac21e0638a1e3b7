"""Parsers for single policy values. Each returns the normalized value or
raises ValueError whose message is the reason shown to the user."""
from __future__ import annotations

import ipaddress
import re
from decimal import Decimal

# The kernel's workload table holds this many (MAX_WORKLOADS in bpf/warden.bpf.c).
MAX_WORKLOADS = 256
WORKLOAD_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
FQDN_LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$")
SIZE_UNITS = {
    "": 1, "B": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
SYSTEMD_UNIT_SUFFIXES = (".service", ".scope")


def workload_name(text: str) -> str:
    if not WORKLOAD_NAME.match(text):
        raise ValueError(
            f"{text!r} is not a valid workload name: use 1-32 lowercase letters, digits "
            "and '-', starting and ending with a letter or digit"
        )
    return text


def cidr(text: str) -> str:
    """A canonical network string; a bare address is a /32 or /128."""
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as error:
        if "has host bits set" not in str(error):
            raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or prefix") from None
        corrected = ipaddress.ip_network(text, strict=False)
        raise ValueError(f"{text!r} has host bits set: did you mean {corrected}?") from None


def fqdn(text: str) -> str:
    """A lowercase name without trailing dot; '*.' may stand for one whole leftmost label."""
    name = text.lower().removesuffix(".")
    if _is_ip_address(name):
        raise ValueError(f"{text!r} is an IP address, not a name: use 'cidr: {name}'")
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if any("*" in label for label in labels):
        raise ValueError(
            f"{text!r} has a wildcard that is not a whole leftmost label: "
            "only '*.example.com' is allowed ('*' stands for exactly one label)"
        )
    if len(name) > 253:
        raise ValueError(f"{text!r} is longer than 253 characters")
    bad = [label for label in labels if not FQDN_LABEL.match(label)]
    if bad:
        raise ValueError(
            f"{text!r} is not a valid host name: label {bad[0]!r} must be 1-63 "
            "characters of a-z, 0-9, '-' and '_'"
        )
    return name


def size(text: str) -> int:
    """Bytes from '1000', '50MB' (10**6), '1.5GB', '10MiB' (2**20); must be > 0."""
    found = SIZE.match(text.strip())
    if not found or found.group(2) not in SIZE_UNITS:
        units = ", ".join(unit for unit in SIZE_UNITS if unit)
        raise ValueError(f"{text!r} is not a size: write a number of bytes or a number with a unit ({units})")
    number, unit = found.groups()
    return positive_bytes(int(Decimal(number) * SIZE_UNITS[unit]))


def size_or_zero(text: str) -> int:
    """A size as `size` reads it, or 0, which a setting can take to mean "never"."""
    return 0 if text.strip() == "0" else size(text)


def positive_bytes(count: int) -> int:
    if count <= 0:
        raise ValueError(f"must be more than 0 bytes, got {count}")
    return count


def factor(text: str) -> float:
    number = float(text)
    if not 1 < number <= 1000:
        raise ValueError(f"must be above 1 and at most 1000 (a multiple of the baseline rate), got {text}")
    return number


def seconds(number: int) -> int:
    if not 1 <= number <= 86400:
        raise ValueError(f"must be 1-86400 seconds, got {number}")
    return number


def port(number: int) -> int:
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 1-65535")
    return number


def dns_upstream(text: str) -> str:
    """'system', or a resolver address with an optional port: 1.1.1.1, 1.1.1.1:53, 2001:db8::1, [2001:db8::1]:53."""
    if text == "system":
        return text
    if _is_ip_address(text):
        return str(ipaddress.ip_address(text))
    host, colon, port_text = text.rpartition(":")
    if colon and port_text.isdigit():
        if not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port {port_text} is out of range 1-65535")
        if host.startswith("[") and host.endswith("]") and _is_ipv6_address(host[1:-1]):
            return f"[{ipaddress.ip_address(host[1:-1])}]:{int(port_text)}"
        if _is_ipv4_address(host):
            return f"{ipaddress.ip_address(host)}:{int(port_text)}"
    raise ValueError(
        f"{text!r} is not 'system' or a resolver address "
        "(like 1.1.1.1, 1.1.1.1:53, 2001:db8::1 or [2001:db8::1]:53)"
    )


DNS_GRACE_FLOOR = 1


def dns_grace(seconds: int) -> int:
    """Seconds an answer's addresses stay allowed past its TTL; at least the floor, so a
    connection made right after the answer is never refused."""
    if seconds < DNS_GRACE_FLOOR:
        raise ValueError(f"must be at least {DNS_GRACE_FLOOR} s (a connection made right after an answer "
                         f"must find its address allowed), got {seconds}")
    return seconds


def systemd_unit(text: str) -> str:
    stem = text
    for suffix in SYSTEMD_UNIT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    if stem == text or not stem or "/" in text:
        raise ValueError(f"{text!r} is not a systemd unit name ending in .service or .scope")
    return text


def absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path (it must start with '/')")
    return text


def non_empty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _is_ip_address(text: str) -> bool:
    return _is_ipv4_address(text) or _is_ipv6_address(text)


def _is_ipv4_address(text: str) -> bool:
    return _parses_as(ipaddress.IPv4Address, text)


def _is_ipv6_address(text: str) -> bool:
    return _parses_as(ipaddress.IPv6Address, text)


def _parses_as(address_type: type, text: str) -> bool:
    try:
        address_type(text)
    except ValueError:
        return False
    return True
