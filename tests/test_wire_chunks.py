"""The chunked-body scanner: it must find exactly where a body ends, however the bytes are
split into reads, whatever the chunk data holds (empty lines included)."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire.chunks import ChunkScanner, TooLong

NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"

_data = st.binary(max_size=40) | st.sampled_from([b"\r\n", b"\r\n\r\n", b"0\r\n\r\n", b"\n\n"])
_ext = st.sampled_from([b"", b";a=1", b';name="v;x"', b";x"])
_trailers = st.lists(st.sampled_from([b"X-T: 1", b"Expires: never", b"A:"]), max_size=3)


@st.composite
def chunked(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(_data.filter(bool), max_size=8)):
        out += b"%x%s\r\n%s\r\n" % (len(data), draw(_ext), data)
    out += b"0%s\r\n" % draw(_ext)
    for line in draw(_trailers):
        out += line + b"\r\n"
    return out + b"\r\n"


def scan_in_reads(stream: bytes, cuts: list[int]) -> int:
    """Feed `stream` in reads cut at `cuts`; the absolute offset where the scanner says the
    body ends (-1 if never)."""
    scanner = ChunkScanner(max_line=1024)
    start = 0
    for stop in [*sorted(set(cuts)), len(stream)]:
        if stop <= start:
            continue
        end = scanner.scan(stream[start:stop])
        if end >= 0:
            return start + end
        start = stop
    return -1


@given(chunked(), st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_the_end_is_found_exactly_however_the_reads_are_cut(body: bytes, cuts: list[int]) -> None:
    stream = body + NEXT
    assert scan_in_reads(stream, [c for c in cuts if c < len(stream)]) == len(body)


class _Parser:
    def __init__(self) -> None:
        self.done = 0

    def on_message_complete(self) -> None:
        self.done += 1


@given(chunked())
def test_the_parser_ends_the_body_where_the_scanner_does(body: bytes) -> None:
    protocol = _Parser()
    parser = httptools.HttpRequestParser(protocol)
    parser.feed_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body[:-1])
    assert protocol.done == 0  # one byte short: not over
    parser.feed_data(body[-1:])
    assert protocol.done == 1


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-5\r\n", b"0x5\r\n", b"\r\n", b"1_0\r\n", b"12345678901234567\r\n"])
def test_a_size_the_parser_refuses_ends_the_scan_at_that_line(bad: bytes) -> None:
    scanner = ChunkScanner(max_line=1024)
    assert scanner.scan(b"3\r\nabc\r\n" + bad + b"more") == len(b"3\r\nabc\r\n" + bad)


@pytest.mark.parametrize("endless", [b"5;" + b"e" * 2000, b"0\r\nX-Trailer: " + b"t" * 2000])
def test_a_size_or_trailer_line_that_goes_on_is_refused(endless: bytes) -> None:
    scanner = ChunkScanner(max_line=1024)
    with pytest.raises(TooLong):
        for i in range(0, len(endless), 100):  # in reads of 100 bytes
            assert scanner.scan(endless[i:i + 100]) == -1
