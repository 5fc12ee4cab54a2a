"""A request as it came in, and the one way to answer it: headers in as name/value pairs,
rendered here with the framing the answer needs.

Invariants: a response is either complete, or the connection is aborted (a client never
takes a short body for a whole one); it is kept alive only when the request allowed it, the
connection reads on (or has requests waiting for their answers) and the body the client held
back for `100 Continue` is not left hanging.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Protocol

from proxy.wire.errors import ClientGone
from proxy.wire.http import HTTP_10, HTTP_11, NO_BODY, Headers, render
from proxy.wire.stream import Body, Drain

_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def encode_high(line: bytes) -> bytes:
    """`line` with its bytes 0x80-0xFF percent-encoded (RFC 3986 §2.1). Used on request lines:
    clients such as curl send a UTF-8 query as they got it, and the parser takes only ASCII
    targets. In a method or version the parser refuses the result as it would the byte."""
    return b"".join([b"%%%02X" % c if c > 0x7F else bytes((c,)) for c in line])


class Link(Protocol):
    """What a request needs of its connection."""

    remote: str | None
    state: State
    drain: Drain

    @property
    def reading_on(self) -> bool: ...
    @property
    def queued(self) -> bool: ...
    @property
    def body_timeout(self) -> float: ...
    def date_line(self) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...


class State(enum.Enum):
    """The connection as a whole."""

    IDLE = "idle"  # no request being answered
    ACTIVE = "active"  # a request is being answered
    CLOSING = "closing"  # no request after the current one
    CLOSED = "closed"


# The members under module-level names, for the hot path: on Python 3.11 reading an Enum
# member through its class costs about 90 ns, a global about 10 (3.12 made it 25).
_ACTIVE = State.ACTIVE


class Request:
    """One request as it came in, and the one way to answer it."""

    __slots__ = ("method", "target", "version", "headers", "body", "remote", "keep_alive", "content_length",
                 "_index", "_conn", "_started", "_done", "_chunked", "_continued")

    def __init__(self, conn: Link, method: str, target: str, version: str, headers: Headers,
                 index: dict[bytes, bytes], body: Body | None, keep_alive: bool, length: int | None = None) -> None:
        self.method = method
        self.target = target  # as received, bytes 0x80-0xFF percent-encoded
        self.version = version  # "1.0", "1.1"
        self.headers = headers  # (name, value) bytes as received, in order; no trailers
        self.body = body  # None when the request has none
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self.content_length = length  # as declared; None when chunked or absent
        self._index = index
        self._conn = conn
        self._started = False
        self._done = False
        self._chunked = False
        self._continued = False

    def get(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case)."""
        return self._index.get(name)

    @property
    def answered(self) -> bool:
        """True once a response has started: from then on only `abort()` can signal a failure."""
        return self._started

    @property
    def body_withheld(self) -> bool:
        """The client waits for 100 Continue before it sends the body, and never got it."""
        return (not self._continued and self.body is not None and not self.body.received
                and self._index.get(b"expect", b"").lower() == b"100-continue")

    # --- answering ------------------------------------------------------------------------

    def send_continue(self) -> None:
        """`100 Continue`: the client may send the body it held back (RFC 9110 §10.1.1)."""
        self._continued = True
        self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def respond(self, status: int, headers: Headers, body: bytes = b"", *, reason: bytes | None = None,
                dated: bool = False) -> None:
        """The whole response in one write. `headers` carry no framing: Content-Length is set
        from `body`; Date too, unless `dated` (the headers have one)."""
        bodiless = status in NO_BODY
        head = self._head(status, reason, headers, None if bodiless else len(body), dated=dated)
        self._conn.write(head if bodiless or self.method == "HEAD" or not body else head + body)
        self._done = True

    def start(self, status: int, headers: Headers, length: int | None, first: bytes = b"", *,
              reason: bytes | None = None, dated: bool = False) -> None:
        """Status line, headers, and `first`, the body bytes already at hand, in one write;
        the rest follows with `write()` and `end()`. With no `length`, the body is chunked for
        HTTP/1.1 clients and ends at close for HTTP/1.0."""
        bodiless = self.method == "HEAD" or status in NO_BODY
        if length is None and not bodiless:
            if self.version == HTTP_11:
                self._chunked = True
            else:
                self.keep_alive = False  # the body ends when the connection does
        head = self._head(status, reason, headers, length, chunked=self._chunked, dated=dated)
        if first and not bodiless:
            head += b"%x\r\n%s\r\n" % (len(first), first) if self._chunked else first
        self._conn.write(head)

    async def write(self, chunk: bytes) -> None:
        """More of the body. Raises ClientGone when the client is gone or takes no byte for
        the body timeout (the connection is then cut)."""
        if not chunk:
            return
        conn = self._conn
        if self._chunked:
            # one write, not writelines: asyncio's writelines on 3.12.0-3.12.8 and 3.13.0-3.13.1
            # never pauses the protocol (CPython gh-127655), so a client that reads nothing
            # would never slow us down
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            conn.write(chunk)
        if conn.drain.paused:
            try:
                await conn.drain.wait(conn.body_timeout)
            except TimeoutError:
                conn.abort()
                raise ClientGone("the client took no byte of the answer in time") from None

    def end(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        self._done = True

    def abort(self) -> None:
        """Cut the connection: the client sees the response fail, not end."""
        self.keep_alive = False
        self._conn.abort()

    def _head(self, status: int, reason: bytes | None, headers: Headers, length: int | None, *,
              chunked: bool = False, dated: bool = False) -> bytes:
        self._started = True
        conn = self._conn
        if conn.state is not _ACTIVE or not (conn.reading_on or conn.queued):
            self.keep_alive = False  # nothing more will be read, and nothing waits for an answer
        elif self.body is not None and self.body_withheld:
            # answered before the body it held back: it will not come, so the connection
            # cannot be reused, and the client is told so (RFC 9110 §10.1.1)
            self.keep_alive = False
        if chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        else:
            framing = b""
        if not self.keep_alive:
            framing += b"Connection: close\r\n"
        elif self.version == HTTP_10:
            framing += b"Connection: keep-alive\r\n"
        # a response forwarded without a Date gets one (RFC 9110 §6.6.1)
        date = b"" if dated else conn.date_line()
        if reason is None:
            reason = _PHRASES.get(status, b"Unknown")
        return b"HTTP/1.1 %d %s\r\n%s%s%s\r\n" % (status, reason, render(headers), date, framing)
