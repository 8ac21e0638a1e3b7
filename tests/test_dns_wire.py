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


def pointer_chain_response(chain: int, records: int) -> bytes:
    """A response whose first record's data holds `chain` compression pointers, each to the one
    before it (the first to the question's name), followed by `records` records whose owner
    names point at the chain's end: each such name takes chain + 1 pointer hops."""
    question = b"\x01a\x00" + struct.pack("!HH", wire.TYPE_A, wire.CLASS_IN)
    chain_start = 12 + len(question) + len(QNAME_POINTER) + 10
    pointers = [0xC000 | 12] + [0xC000 | (chain_start + 2 * i) for i in range(chain - 1)]
    chain_end = chain_start + 2 * (chain - 1)
    carrier = rr(QNAME_POINTER, 16, 30, b"".join(struct.pack("!H", p) for p in pointers))  # TXT: data not read
    owners = [rr(struct.pack("!H", 0xC000 | chain_end), 16, 30, b"")] * records
    return struct.pack("!HHHHHH", 7, 0x8180, 1, 1 + records, 0, 0) + question + carrier + b"".join(owners)


def test_a_long_chain_of_compression_pointers_is_refused():
    # The reviewer's packet: 8,150 pointers, each backwards, and 4,100 records at the chain's
    # end. Every pointer was legal, so each record walked the whole chain (5.4 s on the proxy's
    # one thread); no legal name needs more than 128 hops.
    packet = pointer_chain_response(chain=8150, records=4100)
    assert len(packet) <= wire.MAX_UDP_PAYLOAD
    with pytest.raises(wire.DnsFormatError, match="compression pointers"):
        wire.parse_response(packet)


@pytest.mark.parametrize("chain, refused", [(127, False), (128, True)])
def test_a_name_takes_at_most_128_pointer_hops(chain, refused):
    # 127 one-byte labels (255 bytes with the root), each reached through a pointer, and one
    # more pointer to the root: the most hops a legal name takes.
    packet = pointer_chain_response(chain=chain, records=1)
    if refused:
        with pytest.raises(wire.DnsFormatError, match="compression pointers"):
            wire.parse_response(packet)
    else:
        assert wire.parse_response(packet).answers[-1].name == "a"


@pytest.mark.parametrize("labels, refused", [((63, 63, 63, 61), False), ((63, 63, 63, 62), True)])
def test_a_name_is_at_most_255_bytes_on_the_wire(labels, refused):
    encoded = b"".join(bytes([size]) + b"a" * size for size in labels) + b"\0"
    assert len(encoded) == (256 if refused else 255)
    packet = HEADER_QUERY + encoded + struct.pack("!HH", wire.TYPE_A, wire.CLASS_IN)
    if refused:
        with pytest.raises(wire.DnsFormatError, match="longer than 255 bytes"):
            wire.parse_query(packet)
    else:
        assert wire.parse_query(packet).question.name == ".".join("a" * size for size in labels)


CLASS_CHAOS = 3


def chaos_rr(rtype: int, rdata: bytes) -> bytes:
    """A record of the question's name in class CHAOS, not IN."""
    return QNAME_POINTER + struct.pack("!HHIH", rtype, CLASS_CHAOS, 20, len(rdata)) + rdata


def test_addresses_of_another_class_than_internet_are_never_answers():
    packet = answer("alias.example", [
        rr(QNAME_POINTER, wire.TYPE_A, 20, bytes([192, 0, 2, 1])),
        chaos_rr(wire.TYPE_A, bytes([192, 0, 2, 2])),
        chaos_rr(wire.TYPE_AAAA, bytes(16)),
        chaos_rr(wire.TYPE_CNAME, b"\x03cdn\x05other\0"),
        rr(b"\x03cdn\x05other\0", wire.TYPE_A, 20, bytes([192, 0, 2, 3])),
    ])
    response = wire.parse_response(packet)
    assert [r.value for r in wire.addresses_for(response, "alias.example")] == ["192.0.2.1"]


def test_a_ttl_with_the_top_bit_set_is_handed_out_as_the_zero_it_is_read_as():
    packet = answer("alias.example", [rr(QNAME_POINTER, wire.TYPE_A, 0x80000001, bytes([192, 0, 2, 1]))])
    response = wire.parse_response(packet)
    assert response.answers[0].ttl == 0
    capped = wire.cap_ttls(packet, response, 3600)
    assert struct.unpack_from("!I", capped, response.answers[0].ttl_offset) == (0,)
