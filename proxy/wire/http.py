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
#: once its reader has taken what is buffered (a read takes all of it)
HIGH_WATER = 2**18
#: the largest response head (status line and headers) the pool accepts (nginx: 4-8 KiB each
#: buffer; partner APIs send far less)
MAX_RESPONSE_HEAD = 2**16
#: where a head ends (RFC 9112 §2.1; the parser takes no bare LF, so this is exact)
HEAD_END = b"\r\n\r\n"


def cut_at_head_end(tail: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """`data` split just after the first end of a head (`\r\n\r\n`), which may begin in
    `tail`, the last bytes before it: (the piece up to it, or all of `data`; the rest; the new
    tail, the piece's last three bytes)."""
    probe = tail + data
    end = probe.find(HEAD_END)
    stop = len(probe) if end < 0 else end + 4
    cut = stop - len(tail)
    return data[:cut], data[cut:], probe[max(0, stop - 3):stop]


def content_length(value: bytes | None) -> int | None:
    """A Content-Length value as an int: digits, with the optional white space around them
    that the parser lets through (RFC 9110 §5.5); None when absent or anything else."""
    if value is None:
        return None
    value = value.strip(b" \t")
    return int(value) if value.isdigit() and value.isascii() else None


def render(headers: Headers) -> bytes:
    """`Name: value\\r\\n` lines, bytes as they are."""
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


def find(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None
