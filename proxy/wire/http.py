"""The HTTP/1.1 vocabulary both sides of the wire share: constants and pure helpers."""

from __future__ import annotations

from collections.abc import Sequence

#: headers as name/value byte pairs, in order, repeats kept, bytes as received
Headers = Sequence[tuple[bytes, bytes]]

HTTP_10 = "1.0"
HTTP_11 = "1.1"
#: statuses whose responses never have a body (RFC 9110 §6.4.1, §15.4.5)
NO_BODY = frozenset({204, 304})
#: methods a server may safely receive twice (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: a body stream pauses reading from its socket past this many buffered bytes, and resumes
#: once its reader has taken it below LOW_WATER
HIGH_WATER = 2**18
LOW_WATER = 2**16
#: a writer waits for the socket to drain past this many unsent bytes
WRITE_HIGH_WATER = 2**16
#: the largest response head (status line and headers) the pool accepts (nginx: 4-8 KiB each
#: buffer; partner APIs send far less)
MAX_RESPONSE_HEAD = 2**16
#: where a head ends (RFC 9112 §2.1; the parser takes no bare LF, so this is exact)
HEAD_END = b"\r\n\r\n"


def content_length(value: bytes | None) -> int | None:
    """A Content-Length value the parser already checked, as an int (None when absent)."""
    return int(value) if value is not None and value.isdigit() else None


def render(headers: Headers) -> bytes:
    """`Name: value\\r\\n` lines, bytes as they are."""
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


def find(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


def _percent(byte: int) -> bytes:
    return b"%%%02X" % byte


def encode_target(line: bytes) -> bytes:
    """A request line with the bytes 0x80-0xFF of its target percent-encoded (RFC 3986 §2.1):
    clients such as curl send a UTF-8 query as they got it, and the parser takes only
    ASCII targets. The method and version are left for the parser to judge."""
    first = line.find(b" ")
    last = line.rfind(b" ")
    if first < 0 or last <= first:
        return line  # not a request line the parser will take anyway
    target = line[first + 1:last]
    encoded = b"".join([bytes((c,)) if c < 0x80 else _percent(c) for c in target])
    return line[:first + 1] + encoded + line[last:]
