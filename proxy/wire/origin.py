"""One keep-alive connection to the origin, on httptools' response parser (llhttp).

The parser cannot be told that a response answers HEAD, and has no end-of-input call: so
the answer to a HEAD is fed up to its head's end and no further (it ends there, and the
parser is replaced for the next exchange), and a body with neither length nor chunks ends
when the connection closes cleanly.

Invariants:
- one exchange at a time; bytes nobody asked for, or a head over MAX_RESPONSE_HEAD, make
  the connection unusable (`should_close`) and fail the exchange with BadResponse;
- trailers are dropped: they never become headers of this response or of the next;
- interim answers (1xx but 101) are skipped; 101 is an error, since no upgrade was asked;
- from `start_timeout()` until the response has ended, `read_timeout` without a byte from
  the origin fails the exchange with ReadTimeout, unless the proxy itself paused reading.
"""

from __future__ import annotations

import asyncio
import enum
from typing import cast

import httptools
import structlog

from proxy.wire.errors import BadResponse, Disconnected, OriginError, ReadTimeout
from proxy.wire.http import MAX_RESPONSE_HEAD, NO_BODY, Headers, cut_at_head_end
from proxy.wire.stream import Body, Drain

log = structlog.get_logger("proxy.wire")


class Phase(enum.Enum):
    IDLE = "idle"  # no exchange: any byte is one nobody asked for
    HEAD = "head"  # waiting for the response's head
    BODY = "body"  # the body is coming in
    DONE = "done"  # the response has ended


# The members under module-level names, for the hot path: on Python 3.11 reading an Enum
# member through its class costs about 90 ns, a global about 10 (3.12 made it 25).
_IDLE, _HEAD, _BODY, _DONE = Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.DONE


class Answer:
    """A response's head as parsed: status, reason, headers, body (None for none), and
    whether the origin keeps the connection open after it."""

    __slots__ = ("status", "reason", "headers", "body", "keep_alive")

    def __init__(self, status: int, reason: bytes, headers: Headers, body: Body | None, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class OriginConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float, *, via: str | None = None) -> None:
        """`via`: the egress proxy the connection goes through, as logs show it (no credentials)."""
        self._loop = loop
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self._peer: str | None = None
        # through an egress proxy, `peer` is the proxy: the debug events say so
        self._log_via: dict[str, str] = {"via": via} if via is not None else {}
        self.lost: asyncio.Future[None] = loop.create_future()  # done once the connection is closed
        self.drain = Drain(loop)
        self.should_close = False
        self.answered = False  # a byte of the current exchange's answer has arrived
        self._ours = False  # the proxy closed the connection, not the origin
        self.phase = _IDLE
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False  # the request was HEAD
        self._answer: asyncio.Future[Answer] | None = None
        self._body: Body | None = None
        self._tail = b""
        self._head_fed = 0  # bytes fed while the head was unfinished
        self._feeding = 0  # the size of the piece being fed
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._paused = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False

    def is_connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.should_close = True
        self._ours = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.should_close = True
        self._ours = True
        if self.transport is not None:
            self.transport.abort()

    # --- one exchange -----------------------------------------------------------------------

    def expect(self, method: str) -> asyncio.Future[Answer]:
        """Before a request is written: the future of its response's head."""
        self._head_only = method == "HEAD"
        self.answered = False
        self.phase = _HEAD
        self._tail = b""
        self._head_fed = 0
        self._body = None
        self._answer = self._loop.create_future()
        return self._answer

    @property
    def finished(self) -> bool:
        """The response was read to its end."""
        return self.phase is _DONE

    def start_timeout(self) -> None:
        """The request is sent: from now on, `read_timeout` without a byte is a failure."""
        self._last_read = self._loop.time()
        self._timing = True
        if self._timer is None and self._read_timeout:
            self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._on_timer)

    def fail(self, exc: BaseException) -> None:
        """The exchange failed: whoever waits for the answer or its body hears why."""
        self.should_close = True
        self._timing = False
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(exc)
        if self._body is not None:
            self._body.fail(exc)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._timing or self.transport is None or self.phase not in (_HEAD, _BODY):
            self._timing = False
            return
        now = self._loop.time()
        if self._paused:  # the app reads slowly: not the origin's silence
            self._last_read = now
        elif now - self._last_read >= self._read_timeout:
            self.fail(ReadTimeout(f"no byte from the origin for {self._read_timeout:g} s"))
            self.close()
            return
        self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._on_timer)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None
        log.debug("upstream_connection_opened", peer=self._peer, **self._log_via)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self.answered = True
        try:
            while data:
                phase = self.phase
                if phase is _HEAD and self._head_only:
                    # fed up to the head's end and no further: a HEAD's answer ends there
                    piece, data, self._tail = cut_at_head_end(self._tail, data)
                    self._guard_head(len(piece))
                    self._feeding = len(piece)
                    self._parser.feed_data(piece)
                    if self.finished:
                        self._parser = httptools.HttpResponseParser(self)
                elif phase is _HEAD or phase is _BODY:
                    self._feeding = len(data)
                    self._parser.feed_data(data)
                    if self.phase is _HEAD:
                        self._guard_head(len(data))  # all of it was head: bounded
                    data = b""
                else:
                    raise BadResponse("bytes from the origin that answer no request")
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._broken(cause if isinstance(cause, OriginError) else BadResponse("the response is not valid HTTP/1.1"))
        except httptools.HttpParserError:
            self._broken(BadResponse("the response is not valid HTTP/1.1"))
        except OriginError as exc:
            self._broken(exc)

    def _until_close(self) -> bool:
        """The response's body has neither length nor chunks: it ends when the connection does."""
        return self._answer is not None and self._answer.done() and not self._answer.cancelled() and not any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._headers)

    def _guard_head(self, fed: int) -> None:
        """Bytes fed while the head is unfinished: an endless head must not grow without
        bound inside the parser (completed lines are counted exactly as they come)."""
        self._head_fed += fed
        if self._head_fed > 2 * MAX_RESPONSE_HEAD:
            raise BadResponse(f"the response head is over {MAX_RESPONSE_HEAD} bytes")

    def _broken(self, exc: OriginError) -> None:
        self.fail(exc)
        self.close()

    def pause_writing(self) -> None:
        self.drain.pause()

    def resume_writing(self) -> None:
        self.drain.resume()

    def connection_lost(self, exc: BaseException | None) -> None:
        log.debug("upstream_connection_closed", peer=self._peer, by="proxy" if self._ours else "upstream",
                  error=type(exc).__name__ if exc is not None else None, **self._log_via)
        self.should_close = True
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if exc is None and not self._ours and self.phase is _BODY and self._body is not None \
                and self._until_close():
            self._body.end()  # a body with neither length nor chunks ends at a clean close
            self.phase = _DONE
        error = Disconnected("the origin closed the connection" if exc is None else
                             f"the connection to the origin failed: {exc}", reset=isinstance(exc, OSError))
        self.drain.lost(error)
        if self.phase in (_HEAD, _BODY):
            self.fail(error)

    # --- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.phase is not _HEAD:
            raise BadResponse("bytes from the origin that answer no request")
        self._reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase is _HEAD:
            self._headers.append((name, value))
        # else a trailer: dropped, so that it never becomes a header of any message

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BadResponse("the origin switched protocols, which no request asked for")
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        headers = self._headers
        if self._head_fed + self._feeding > MAX_RESPONSE_HEAD:  # it may be over: measured
            size = 15 + len(self._reason) + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > MAX_RESPONSE_HEAD:
                raise BadResponse(f"the response head is over {MAX_RESPONSE_HEAD} bytes")
        self._head_fed = 0
        keep_alive = parser.should_keep_alive()
        body = None
        if not self._head_only and status not in NO_BODY:
            body = self._body = Body(self._loop, self._pause, self._resume)
            self.phase = _BODY
        else:
            self.phase = _DONE
            self._timing = False
        if not keep_alive:
            self.should_close = True
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_result(Answer(status, self._reason, headers, body, keep_alive))

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        if self.phase is _HEAD:
            self._head_fed = 0
            return  # an interim answer ended
        if self._body is not None:
            self._body.end()
        self.phase = _DONE
        self._timing = False

    # --- reading pauses ---------------------------------------------------------------------

    def _pause(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume(self) -> None:
        self._paused = False
        self._last_read = self._loop.time()
        if self.transport is not None:
            self.transport.resume_reading()
