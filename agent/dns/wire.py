"""The DNS wire format (RFC 1035), as much as the proxy needs: read a query's question, read
an answer's records, build refusals, cap TTLs. Every packet here comes from an untrusted
router or resolver, so reading is bounded: names are at most 255 bytes, compression pointers
may only point backwards (no loops), a name follows at most MAX_POINTERS of them, and every
read is checked against the packet's end."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
MAX_UDP_PAYLOAD = 65535
MAX_NAME = 255
MAX_LABEL = 63
# 127 one-byte labels (255 bytes with the root), each reached through a pointer, and one more
# pointer to the root: the most a legal name takes. Pointing backwards alone bounds a name only
# by the 14-bit offsets (8,190 hops), and every record of a response may point at such a chain.
MAX_POINTERS = MAX_NAME // 2 + 1

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1

RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_REFUSED = 5

_QR = 0x8000
_OPCODE = 0x7800
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_RCODE = 0x000F


class DnsFormatError(ValueError):
    """The packet is not a DNS message the proxy can read."""


@dataclass(frozen=True)
class Question:
    name: str  # lowercase, no trailing dot; "" is the root
    qtype: int
    qclass: int


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    question: Question
    question_end: int  # offset just past the question section


@dataclass(frozen=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl: int
    ttl_offset: int
    value: str | None  # A/AAAA: the address; CNAME: the target name; else None


@dataclass(frozen=True)
class Response:
    id: int
    flags: int
    question: Question | None
    answers: tuple[Record, ...]

    @property
    def rcode(self) -> int:
        return self.flags & _RCODE

    @property
    def truncated(self) -> bool:
        return bool(self.flags & _TC)


def _header(packet: bytes) -> tuple[int, int, int, int, int, int]:
    if len(packet) < HEADER.size:
        raise DnsFormatError(f"{len(packet)} bytes: shorter than a DNS header")
    return HEADER.unpack_from(packet)


def read_name(packet: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` and the offset just past it (past the first pointer, if any)."""
    labels: list[str] = []
    length = 1  # the root's zero byte, which ends every name
    pointers = 0
    end = None
    lowest_pointer_target = offset
    while True:
        if offset >= len(packet):
            raise DnsFormatError("name runs past the end of the packet")
        size = packet[offset]
        if size & 0xC0 == 0xC0:
            if offset + 1 >= len(packet):
                raise DnsFormatError("compression pointer cut short")
            target = ((size & 0x3F) << 8) | packet[offset + 1]
            # Strictly backwards, and before everything visited so far: a loop is impossible.
            if target >= lowest_pointer_target:
                raise DnsFormatError("compression pointer does not point backwards (a loop)")
            if target < HEADER.size:
                raise DnsFormatError("compression pointer into the header")
            pointers += 1
            if pointers > MAX_POINTERS:
                raise DnsFormatError(f"name follows more than {MAX_POINTERS} compression pointers")
            if end is None:
                end = offset + 2
            lowest_pointer_target = target
            offset = target
            continue
        if size & 0xC0:
            raise DnsFormatError(f"label type {size >> 6:#x} is not supported")
        offset += 1
        if size == 0:
            break
        if offset + size > len(packet):
            raise DnsFormatError("label runs past the end of the packet")
        length += size + 1
        if length > MAX_NAME:
            raise DnsFormatError("name longer than 255 bytes")
        label = packet[offset:offset + size]
        if b"." in label:
            # "api.openai" + "com" would read as an allowed name it is not.
            raise DnsFormatError("a label contains a dot")
        labels.append(label.decode("latin-1").lower())
        offset += size
    return ".".join(labels), end if end is not None else offset


def _question(packet: bytes, offset: int) -> tuple[Question, int]:
    name, offset = read_name(packet, offset)
    if offset + 4 > len(packet):
        raise DnsFormatError("question cut short")
    qtype, qclass = struct.unpack_from("!HH", packet, offset)
    return Question(name, qtype, qclass), offset + 4


def parse_query(packet: bytes) -> Query:
    """A standard query with exactly one question; anything else is a DnsFormatError."""
    ident, flags, qdcount, _an, _ns, _ar = _header(packet)
    if flags & _QR:
        raise DnsFormatError("a response, not a query")
    if flags & _OPCODE:
        raise DnsFormatError(f"opcode {(flags & _OPCODE) >> 11} is not a standard query")
    if qdcount != 1:
        raise DnsFormatError(f"{qdcount} questions: exactly one is supported")
    question, end = _question(packet, HEADER.size)
    return Query(ident, flags, question, end)


def parse_response(packet: bytes) -> Response:
    ident, flags, qdcount, ancount, _ns, _ar = _header(packet)
    if not flags & _QR:
        raise DnsFormatError("a query, not a response")
    if qdcount > 1:
        raise DnsFormatError(f"{qdcount} questions in a response")
    offset = HEADER.size
    question = None
    if qdcount:
        question, offset = _question(packet, offset)
    answers = []
    for _ in range(ancount):
        record, offset = _record(packet, offset)
        answers.append(record)
    return Response(ident, flags, question, tuple(answers))


def _record(packet: bytes, offset: int) -> tuple[Record, int]:
    name, offset = read_name(packet, offset)
    if offset + 10 > len(packet):
        raise DnsFormatError("resource record cut short")
    rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", packet, offset)
    ttl_offset = offset + 4
    start = offset + 10
    end = start + rdlength
    if end > len(packet):
        raise DnsFormatError("record data runs past the end of the packet")
    value = None
    if rtype == TYPE_A and rclass == CLASS_IN:
        if rdlength != 4:
            raise DnsFormatError(f"A record of {rdlength} bytes")
        value = socket.inet_ntop(socket.AF_INET, packet[start:end])
    elif rtype == TYPE_AAAA and rclass == CLASS_IN:
        if rdlength != 16:
            raise DnsFormatError(f"AAAA record of {rdlength} bytes")
        value = socket.inet_ntop(socket.AF_INET6, packet[start:end])
    elif rtype == TYPE_CNAME:
        value, name_end = read_name(packet, start)
        if name_end > end:
            raise DnsFormatError("CNAME target runs past its record")
    # RFC 2181: a TTL with the top bit set is read as 0.
    return Record(name, rtype, rclass, 0 if ttl & 0x80000000 else ttl, ttl_offset, value), end


def addresses_for(response: Response, name: str) -> list[Record]:
    """The A/AAAA records that answer `name`, following its CNAME chain in the answer. Only
    class IN: other classes name no internet host, and their A/AAAA records have no address."""
    internet = [record for record in response.answers if record.rclass == CLASS_IN]
    names = {name}
    grew = True
    while grew:
        grew = False
        for record in internet:
            if record.rtype == TYPE_CNAME and record.name in names and record.value not in names:
                names.add(record.value)
                grew = True
    return [r for r in internet if r.rtype in (TYPE_A, TYPE_AAAA) and r.name in names]


def cap_ttls(packet: bytes, response: Response, ttl: int) -> bytes:
    """The packet with every answer's TTL lowered to at most `ttl`. Every TTL is written as it
    was read: one with the top bit set goes out as the 0 the agent reads it as (and allows its
    addresses for, plus grace), not as a number a router could take for 68 years."""
    out = bytearray(packet)
    for record in response.answers:
        struct.pack_into("!I", out, record.ttl_offset, min(record.ttl, ttl))
    return bytes(out)


def with_id(packet: bytes, ident: int) -> bytes:
    return struct.pack("!H", ident) + packet[2:]


def error_reply(packet: bytes, rcode: int, question_end: int | None) -> bytes | None:
    """An answer with `rcode` to the query `packet`, echoing its question when it was read.
    None when not even a query's header is there (nothing to answer to)."""
    try:
        ident, flags, *_ = _header(packet)
    except DnsFormatError:
        return None
    if flags & _QR:
        return None  # never answer a response: two proxies could ping-pong forever
    reply_flags = _QR | (flags & (_OPCODE | _RD)) | _RA | rcode
    qdcount = 1 if question_end is not None else 0
    body = packet[HEADER.size:question_end] if question_end is not None else b""
    return HEADER.pack(ident, reply_flags, qdcount, 0, 0, 0) + body


def build_query(ident: int, name: str, qtype: int) -> bytes:
    """A recursive query for `name` (used to resolve allowed names ahead of time)."""
    encoded = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".") if label)
    return HEADER.pack(ident, _RD, 1, 0, 0, 0) + encoded + b"\0" + struct.pack("!HH", qtype, CLASS_IN)
