"""The DNS wire parser on untrusted input: every malformed packet is a DnsFormatError, never
another exception, a hang or an unbounded read."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from agent.dns import wire
from agent.dns.names import NameMatcher
from agent.policy import AllowRule

HEADER_QUERY = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)


def answer(name: str, records: list[bytes]) -> bytes:
    """A response to `name` whose answer section is `records` (already encoded)."""
    query = wire.build_query(7, name, wire.TYPE_A)
    return struct.pack("!HHHHHH", 7, 0x8180, 1, len(records), 0, 0) + query[12:] + b"".join(records)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, wire.CLASS_IN, ttl, len(rdata)) + rdata


QNAME_POINTER = b"\xc0\x0c"  # the question's name, at offset 12


def test_query_question_is_read_lowercase():
    query = wire.parse_query(wire.build_query(1, "API.OpenAI.com", wire.TYPE_AAAA))
    assert query.question == wire.Question("api.openai.com", wire.TYPE_AAAA, wire.CLASS_IN)


@pytest.mark.parametrize("packet", [
    HEADER_QUERY + b"\xc0\x0c" + b"\0\1\0\1",  # a pointer to itself
    HEADER_QUERY + b"\x01a\xc0\x0c" + b"\0\1\0\1",  # a label, then back to its start
    HEADER_QUERY + b"\xc0\x10\x00\x00\xc0\x0c",  # forwards, then back: a two-step loop
    HEADER_QUERY + b"\xc0\x02\0\1\0\1",  # a pointer into the header
    HEADER_QUERY + b"\x3fabc",  # label longer than the packet
    HEADER_QUERY + (b"\x3f" + b"a" * 63) * 5 + b"\0\0\1\0\1",  # name over 255 bytes
    HEADER_QUERY + b"\x03a.b\x03com\0\0\1\0\1",  # a dot inside a label
    HEADER_QUERY[:11],
    struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + b"\0\0\1\0\1" * 2,  # two questions
])
def test_malformed_queries_are_format_errors(packet):
    with pytest.raises(wire.DnsFormatError):
        wire.parse_query(packet)


def test_cname_chain_is_followed_from_the_asked_name_only():
    packet = answer("alias.example", [
        rr(QNAME_POINTER, wire.TYPE_CNAME, 30, b"\x03cdn\x05other\0"),
        rr(b"\x03cdn\x05other\0", wire.TYPE_A, 20, bytes([192, 0, 2, 1])),
        rr(b"\x07unasked\x05other\0", wire.TYPE_A, 20, bytes([192, 0, 2, 9])),
    ])
    response = wire.parse_response(packet)
    assert [r.value for r in wire.addresses_for(response, "alias.example")] == ["192.0.2.1"]
    capped = wire.parse_response(wire.cap_ttls(packet, response, 10))
    assert [r.ttl for r in capped.answers] == [10, 10, 10]


def test_refusal_echoes_id_and_question_and_a_response_is_never_answered():
    packet = wire.build_query(0xBEEF, "evil.example", 16)  # TXT, the tunneller's favourite
    query = wire.parse_query(packet)
    refusal = wire.error_reply(packet, wire.RCODE_REFUSED, query.question_end)
    reply = wire.parse_response(refusal)
    assert (reply.id, reply.rcode, reply.question) == (0xBEEF, wire.RCODE_REFUSED, query.question)
    assert wire.error_reply(refusal, wire.RCODE_FORMERR, None) is None  # two proxies never ping-pong


def test_wildcard_is_exactly_one_label():
    matcher = NameMatcher((AllowRule("fqdn", "*.azure.example", (443,), "tcp", 1),
                           AllowRule("fqdn", "api.example", (), "any", 2)))
    assert [g.pattern for g in matcher.grants("eastus.azure.example")] == ["*.azure.example"]
    assert matcher.grants("a.b.azure.example") == [] and matcher.grants("azure.example") == []
    assert [g.rule_line for g in matcher.grants("api.example")] == [2]
    assert matcher.grants("x.api.example") == []


def mutations(valid: bytes):
    return st.one_of(
        st.binary(max_size=700),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda change: valid[:change[0]] + bytes([change[1]]) + valid[change[0] + 1:]),  # one byte changed
        st.binary(max_size=400).map(lambda tail: valid[:12] + tail),  # a header, then garbage
        st.integers(0, 0x3FFF).map(lambda target: valid[:12] + struct.pack("!H", 0xC000 | target) + valid[-4:]),
    )


VALID_RESPONSE = answer("alias.example", [
    rr(QNAME_POINTER, wire.TYPE_CNAME, 30, b"\x03cdn\xc0\x12"),
    rr(b"\x03cdn\xc0\x12", wire.TYPE_A, 20, bytes([192, 0, 2, 1])),
    rr(QNAME_POINTER, wire.TYPE_AAAA, 20, bytes(16)),
])


@settings(max_examples=2000, deadline=None)
@given(packet=mutations(VALID_RESPONSE))
def test_fuzzed_responses_parse_or_fail_cleanly(packet):
    try:
        response = wire.parse_response(packet)
    except wire.DnsFormatError:
        return
    wire.addresses_for(response, "alias.example")
    wire.cap_ttls(packet, response, 5)


@settings(max_examples=2000, deadline=None)
@given(packet=mutations(wire.build_query(9, "api.provider.example", wire.TYPE_A)))
def test_fuzzed_queries_parse_or_fail_cleanly(packet):
    try:
        query = wire.parse_query(packet)
    except wire.DnsFormatError:
        assert wire.error_reply(packet, wire.RCODE_FORMERR, None) is None or len(packet) >= 12
        return
    assert len(query.question.name) <= 255
