"""The proxy's HTTP/1.1 listener: asyncio protocols and aiohttp's C request parser.

aiohttp's `web.Server` builds a request object, a handler task, a response object and its
header multidict for every request; with a trivial handler it serves about half the
requests a second that a bare protocol with the same C parser does (bench/README.md). A
proxy has no routes, middleware, cookies or forms, so this module keeps only the parts a
proxy needs: aiohttp's parser (`HttpRequestParser`, the same limits and the same 400s for
malformed requests), its `StreamReader` for request bodies with flow control, and a
response writer that sends status line, headers and a small body in one write.

Invariants:
- requests on one connection are answered one at a time, in order (pipelined requests wait
  in a short queue; reading pauses when it is full);
- a response is either complete, or the connection is aborted: a client never takes a short
  body for a whole one;
- a connection is kept only when both sides allow it, the request body came in to the end
  (read by the handler, or a short rest dropped after the answer) and the response's length
  was known; else it is closed after the response, lingering so the client reads the answer;
- a connection idle, or with a request's headers unfinished, for `idle_timeout` is closed;
- when the client goes away, the handler working for it is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from typing import Any

import structlog
from aiohttp import HttpVersion
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import RawHeaders

log = structlog.get_logger("proxy.listener")

#: pipelined requests held before reading from the client pauses
MAX_PIPELINE = 16
READ_BUFSIZE = 2**16
#: an unread request body up to this many bytes is read and dropped after the response, and
#: the connection kept; past it, the connection closes once the rest has been drained
DISCARD_LIMIT = 2**16
#: seconds a closing connection keeps reading an unread request body, so that the client reads
#: the answer rather than a reset (nginx's lingering close)
LINGER = 2.0
HTTP_10 = HttpVersion(1, 0)
HTTP_11 = HttpVersion(1, 1)
#: statuses whose responses never have a body (RFC 9110 §6.4.1)
NO_BODY = frozenset({204, 304})

Handler = Callable[["Request"], Awaitable[None]]
Refuser = Callable[["Request", HttpProcessingError], None]
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Request:
    """One request as it came in, and the one way to answer it."""

    __slots__ = ("method", "target", "version", "headers", "raw_headers", "content", "remote", "keep_alive", "_conn",
                 "_started", "_done", "_chunked", "_continued")

    def __init__(self, conn: Connection, method: str, target: str, version: HttpVersion,
                 headers: CIMultiDictProxy[str], raw_headers: RawHeaders, content: StreamReader,
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target  # the request target exactly as received
        self.version = version
        self.headers = headers
        self.raw_headers = raw_headers  # (name, value) bytes as received, in order
        self.content = content
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self._conn = conn
        self._started = False
        self._done = False
        self._chunked = False
        self._continued = False

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_PAYLOAD

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def answered(self) -> bool:
        """True once a response has started: from then on only `abort()` can signal a failure."""
        return self._started

    # --- answering ------------------------------------------------------------------------

    def send_continue(self) -> None:
        """`100 Continue`: the client may send the body it held back (RFC 9110 §10.1.1)."""
        self._continued = True
        self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    @property
    def body_withheld(self) -> bool:
        """The client waits for 100 Continue before it sends the body, and never got it."""
        return not self._continued and self.headers.get("Expect", "").lower() == "100-continue"

    def respond(self, status: int, reason: str, headers: bytes, body: bytes, *, dated: bool = False) -> None:
        """The whole response in one write. `headers` are header lines (`Name: value\r\n`)
        without framing: Content-Length is set from `body`; Date too, unless `dated`."""
        head = self._head(status, reason, headers, None if status in NO_BODY else len(body), dated=dated)
        self._conn.write(head if self.method == "HEAD" or status in NO_BODY or not body else head + body)
        self._done = True

    def start(self, status: int, reason: str, headers: bytes, length: int | None, first: bytes = b"",
              *, dated: bool = False) -> None:
        """Status line, headers, and `first`, the body bytes already at hand, in one write;
        the rest follows with `write()` and `end()`. With no `length`, the body is chunked for
        HTTP/1.1 clients and ends at close for HTTP/1.0."""
        bodiless = self.method == "HEAD" or status in NO_BODY
        if length is None and not bodiless:
            if self.version > HTTP_10:
                self._chunked = True
            else:
                self.keep_alive = False  # the body ends when the connection does
        head = self._head(status, reason, headers, length, chunked=self._chunked, dated=dated)
        if first and not bodiless:
            head += b"%x\r\n%s\r\n" % (len(first), first) if self._chunked else first
        self._conn.write(head)

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        conn = self._conn
        if self._chunked:
            conn.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            conn.write(chunk)
        if conn._paused:  # noqa: SLF001 - the protocol's own flow control
            await conn._drain_helper()  # noqa: SLF001

    def end(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        self._done = True

    def abort(self) -> None:
        """Cut the connection: the client sees the response fail, not end."""
        self.keep_alive = False
        self._conn.abort()

    def _head(self, status: int, reason: str, headers: bytes, length: int | None, *,
              chunked: bool = False, dated: bool = False) -> bytes:
        self._started = True
        conn = self._conn
        if conn.closing:
            self.keep_alive = False
        elif self.content is not EMPTY_PAYLOAD and not self.content.is_eof() and self.body_withheld:
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
        date = b"" if dated else conn.server.date_line()
        return b"HTTP/1.1 %d %s\r\n%s%s%s\r\n" % (status, reason.encode("utf-8", "surrogateescape"), headers, date, framing)


class Connection(BaseProtocol):
    """One client connection: parses requests, hands them to the handler in order."""

    __slots__ = ("server", "remote", "closing", "_reading", "_queue", "_waiter", "_task", "_idle",
                 "_idle_since", "_busy", "_request")

    def __init__(self, server: Listener) -> None:
        loop = server.loop
        super().__init__(loop, HttpRequestParser(
            self, loop, READ_BUFSIZE, max_msg_queue_size=MAX_PIPELINE, auto_decompress=False,
        ))
        self.server = server
        self.remote: str | None = None
        self.closing = False  # shutting down: no request after the current one
        self._reading = True  # False after a malformed or upgrade request: no more parsing
        self._queue: deque[tuple[Any, StreamReader] | HttpProcessingError] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # None while a request is being answered
        self._busy = False
        self._request: Request | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # sets TCP_NODELAY
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.server.connections.add(self)
        self._idle_since = self._loop.time()
        self._idle = self._loop.call_at(self._idle_since + self.server.idle_timeout, self._on_idle)
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        assert self._parser is not None
        try:
            messages, upgraded, _ = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._reading = False  # nothing after a malformed request can be trusted
            self._queue.append(exc)
            self._wake()
            return
        if upgraded:
            self._reading = False  # the bytes after an upgrade request are not HTTP/1.1
        if messages:
            if self.closing:  # shutting down: requests pipelined behind the current one go unanswered
                return
            self._queue.extend(messages)
            self._idle_since = None
            self._wake()
            if len(self._queue) >= MAX_PIPELINE and not self._buffer_paused:
                self._pause_reading_for_buffer()

    # No eof_received: a client's FIN closes the connection and cancels what it waits for, as
    # nginx takes it ("client prematurely closed connection"); a half-closed request is rare,
    # a client that gave up is not, and its place in the upstream queue must come back.

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._cut_bodies(ConnectionResetError("the client went away"))
        if self._task is not None and self._busy:
            self._task.cancel()  # whatever the handler waits for, nobody will read its answer
        self._wake()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # as in upstream.OriginConnection: a body read below its low-water mark calls this
        # whether or not reading was paused; only a pause needs undoing
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def _cut_bodies(self, exc: BaseException) -> None:
        """Request bodies still coming in will not end: their readers hear why."""
        payloads = [item[1] for item in self._queue if isinstance(item, tuple)]
        if self._request is not None:
            payloads.append(self._request.content)
        for payload in payloads:
            if not payload.is_eof():
                payload.set_exception(exc)

    # --- the connection's one task --------------------------------------------------------

    async def _serve(self) -> None:
        handler = self.server.handler
        queue = self._queue
        try:
            while not self.closing:
                if not queue:
                    if self.transport is None:
                        break
                    self._waiter = self._loop.create_future()
                    await self._waiter
                    continue
                item = queue.popleft()
                self._busy = True
                if isinstance(item, HttpProcessingError):
                    self.server.refuse(Request(self, "GET", "", HTTP_11, _NO_HEADERS, (), EMPTY_PAYLOAD, False), item)
                    await self._linger()
                    break
                message, payload = item
                self._resume_if_drained()
                request = Request(self, message.method, message.path, message.version, message.headers,
                                  message.raw_headers, payload, not message.should_close and self._reading)
                self._request = request
                await handler(request)
                self._request = None
                if not request._done or self.transport is None:  # noqa: SLF001 - cut short
                    break
                if not payload.is_eof() and not await self._finish_body(request):
                    break
                if not request.keep_alive:
                    break
                self._busy = False
                if not queue:
                    self._idle_since = self._loop.time()
        except asyncio.CancelledError:
            pass  # the client left, or shutdown ran out of time
        except Exception:  # a bug: the connection goes (cut, so no answer looks whole), the listener stays
            log.exception("request_failed", answered=self._request is not None and self._request.answered)
            self.abort()
        finally:
            self._busy = False
            self._request = None
            if self.transport is not None:
                self.transport.close()

    async def _finish_body(self, request: Request) -> bool:
        """The rest of a request body the handler did not read (it was refused, say). A short
        rest is read and dropped and the connection kept; past DISCARD_LIMIT our side is shut
        for writing and the rest drained for at most LINGER seconds, so the client reads the
        answer rather than a reset. True if the connection can be kept."""
        if request.body_withheld:
            return False  # the client will not send it: nothing to wait for
        payload = request.content
        transport = self.transport
        dropped, keep = 0, True
        try:
            async with asyncio.timeout(LINGER):
                while not payload.is_eof():
                    dropped += len(await payload.readany())
                    if keep and dropped > DISCARD_LIMIT and transport is not None and transport.can_write_eof():
                        keep = False
                        transport.write_eof()
        except (Exception, TimeoutError):
            return False
        return keep

    async def _linger(self) -> None:
        """Before closing on a client that may still be sending: shut our side for writing and
        let what it sends be read and dropped, for at most LINGER seconds, so that it reads the
        answer rather than a reset (closing with unread bytes makes the kernel send one)."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            return
        transport.write_eof()
        self._waiter = self._loop.create_future()  # woken when the client closes too
        try:
            async with asyncio.timeout(LINGER):
                await self._waiter
        except TimeoutError:
            pass

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _resume_if_drained(self) -> None:
        assert self._parser is not None
        self._parser.message_consumed()
        if self._buffer_paused and len(self._queue) < MAX_PIPELINE // 2:
            self.data_received(b"")  # parse what waited while the queue was full
            if len(self._queue) < MAX_PIPELINE:
                self._resume_reading_for_buffer()

    # --- timers and writes ----------------------------------------------------------------

    def _on_idle(self) -> None:
        """The idle timer, checked when it fires rather than re-armed for every request."""
        if self.transport is None:
            self._idle = None
            return
        now, timeout, since = self._loop.time(), self.server.idle_timeout, self._idle_since
        if since is not None and now - since >= timeout and not self._busy:
            self._idle = None
            self.transport.close()
            return
        self._idle = self._loop.call_at((now if since is None else since) + timeout, self._on_idle)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        if self.transport is not None:
            self.transport.writelines(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shut(self) -> None:
        """Shutdown: an idle connection closes now, a busy one after its current response."""
        self.closing = True
        if not self._busy and self.transport is not None:
            self.transport.close()
        self._wake()


class Listener:
    """The proxy's listening socket and its connections."""

    def __init__(self, handler: Handler, refuse: Refuser, *, idle_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.refuse = refuse
        self.idle_timeout = idle_timeout
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._date = b""
        self._date_at = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, backlog=1024,
        )
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    def close(self) -> None:
        """Refuse new connections; idle ones close now, busy ones after their response."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shut()

    async def drain(self, timeout: float) -> bool:
        """Wait for open connections to finish, up to `timeout`; then cut what is left.
        True if everything finished in time."""
        tasks = {c._task for c in self.connections if c._task is not None}  # noqa: SLF001
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return not pending

    def date_line(self) -> bytes:
        """`Date: ...\\r\\n`, formatted once a second (RFC 9110 §6.6.1)."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return self._date
