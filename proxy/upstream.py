"""A lean HTTP/1.1 client for the one origin the proxy talks to.

aiohttp's `ClientSession` builds a request object, a URL, timers, traces, a cookie jar
lookup and a connector transaction for every call: about a third of the proxy's CPU per
request (see bench/README.md). The forwarder needs none of it: the origin is fixed, the
headers are already shaped. This module keeps a keep-alive pool of connections to
`upstream.url` and speaks HTTP/1.1 on them with aiohttp's C response parser and payload
streams, raising aiohttp's exceptions (`aiohttp.ClientError` subclasses, `TimeoutError`).
Unlike aiohttp's own client protocol, a connection keeps one parser for all its responses
and one lazy read timer (checked when it fires, not re-armed on every read).

Invariants:
- at most `limit` connections are in use; further requests wait for one, first come first
  served, and one that gives up waiting takes no slot with it;
- a connection goes back to the pool only after its response was read to the end and
  neither side asked to close; anything else is closed;
- a request whose pooled connection turns out to be closed by the origin before any answer
  (a keep-alive race) is sent again once, on a new connection, if its body can be re-sent
  (after a reset rather than a clean close, only if its method is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from typing import Any

from aiohttp import ClientOSError, ClientPayloadError, ServerDisconnectedError, ServerTimeoutError, StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDictProxy

#: seconds an idle connection is kept (origins commonly close theirs after 60-75 s)
KEEPALIVE_TIMEOUT = 15.0
READ_BUFSIZE = 2**16
#: write-buffer size past which the body writer waits for the socket to drain
WRITE_HIGH_WATER = 2**16

Body = bytes | AsyncIterator[bytes] | None
#: methods a server may safely receive twice (RFC 9110 §9.2.2)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: statuses whose responses never have a body (RFC 9110 §6.4.1)
NO_BODY = frozenset({204, 304})


class OriginConnection(BaseProtocol):
    """One keep-alive connection to the origin: a response parser for its whole life, the
    response of the request in flight as a future, its body as a StreamReader."""

    __slots__ = ("should_close", "_read_timeout", "_response", "_payload", "_last_read", "_timer",
                 "_timing", "_fresh_parser")

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        super().__init__(loop)
        self._parser = self._new_parser(with_body=True)
        self.should_close = False
        self._read_timeout = read_timeout
        self._response: asyncio.Future[tuple[Any, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False
        self._fresh_parser = False  # a HEAD's parser was swapped in: swap back before the next

    def _new_parser(self, *, with_body: bool) -> HttpResponseParser:
        return HttpResponseParser(
            self, self._loop, READ_BUFSIZE, payload_exception=ClientPayloadError,
            response_with_body=with_body,
            read_until_eof=True,  # a response with neither length nor chunks ends at close
            auto_decompress=False,
        )

    def is_connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's StreamReader calls this after every read below its low-water mark, paused
        # or not, and BaseProtocol then feeds the parser an empty chunk: only a pause needs it
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- one exchange -----------------------------------------------------------------------

    def expect(self, method: str) -> asyncio.Future[tuple[Any, StreamReader]]:
        """Before a request is written: the future of its response's status line and headers."""
        if method == "HEAD":  # the answer has headers only, whatever its Content-Length says
            self._parser = self._new_parser(with_body=False)
            self._fresh_parser = True
        elif self._fresh_parser:
            self._parser = self._new_parser(with_body=True)
            self._fresh_parser = False
        self._payload = None
        self._response = self._loop.create_future()
        return self._response

    def start_timeout(self) -> None:
        """The request is sent: from now on, `read_timeout` without a byte is a failure."""
        self._last_read = self._loop.time()
        self._timing = True
        if self._timer is None and self._read_timeout:
            self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._on_timer)

    def set_exception(self, exc: BaseException) -> None:
        """The exchange failed: whoever waits for the response or its body hears why."""
        self.should_close = True
        self._timing = False
        response = self._response
        if response is not None and not response.done():
            response.set_exception(exc)
        payload = self._payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(exc)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._timing or self.transport is None:
            return
        response, payload = self._response, self._payload
        waiting = (response is not None and not response.done()) or (payload is not None and not payload.is_eof())
        if not waiting:
            self._timing = False
            return
        now = self._loop.time()
        if self._reading_paused:  # the app reads slowly: not the origin's silence
            self._last_read = now
        elif now - self._last_read >= self._read_timeout:
            self.set_exception(ServerTimeoutError("Timeout on reading data from socket"))
            self.close()
            return
        self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._on_timer)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_read = self._loop.time()
        parser = self._parser
        assert parser is not None
        try:
            messages, upgraded, _ = parser.feed_data(data)
        except HttpProcessingError as exc:
            self.set_exception(exc)
            self.close()
            return
        for message, payload in messages:
            if message.should_close:
                self.should_close = True
            code = message.code
            if 100 <= code < 200 and code != 101:
                continue  # interim answers (100 Continue) are skipped
            response = self._response
            if response is None or response.done():  # an answer nobody asked for
                self.should_close = True
                self.close()
                return
            if code in NO_BODY:
                payload = EMPTY_PAYLOAD
            self._payload = payload
            response.set_result((message, payload))
        if upgraded:
            self.should_close = True  # no upgrades: Upgrade is hop-by-hop, never forwarded

    def connection_lost(self, exc: BaseException | None) -> None:
        self.should_close = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        payload = self._payload
        if self._parser is not None:
            try:
                self._parser.feed_eof()  # ends a body that runs to the close
            except Exception as underlying:  # noqa: BLE001 - a body cut short, whatever the parser says
                if payload is not None and not payload.is_eof():
                    payload.set_exception(ClientPayloadError(f"Response payload is not completed: {underlying!r}"))
        if isinstance(exc, OSError):
            self.set_exception(ClientOSError(*exc.args))
        else:
            self.set_exception(ServerDisconnectedError())
        super().connection_lost(exc)


class ConnectFailed(ConnectionError):
    """No connection to the origin could be opened (a timeout stays a TimeoutError)."""


class Exchange:
    """One response: status, headers, and the body as a stream (`content`)."""

    __slots__ = ("status", "reason", "headers", "raw_headers", "content", "_pool", "_proto", "_keep", "_done",
                 "_writer")

    def __init__(self, pool: Upstream, proto: OriginConnection, message: Any, content: StreamReader,
                 writer: asyncio.Task[None] | None) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers  # as received
        self.content = content
        self._pool = pool
        self._proto = proto
        self._keep = not message.should_close
        self._done = False
        self._writer = writer

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        """Done with the response: the connection is kept if it was read to the end."""
        if self._done:
            return
        self._done = True
        reusable = self._keep and self.content.is_eof() and self._writer_done()
        self._pool._give_back(self._proto, reusable)

    def close(self) -> None:
        """Done, and the connection is not to be reused (the answer was not read to the end)."""
        if self._done:
            return
        self._done = True
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._pool._give_back(self._proto, False)

    def _writer_done(self) -> bool:
        return self._writer is None or (self._writer.done() and not self._writer.cancelled()
                                        and self._writer.exception() is None)


class Upstream:
    def __init__(self, url: str, *, tls: ssl.SSLContext | bool, limit: int,
                 connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme == "https" and self._port == 443) or (parts.scheme == "http" and self._port == 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if default_port else f"{host}:{self._port}"
        self._host_line = self.host_header.encode()
        self._base_path = parts.path.rstrip("/")  # upstream.url's base path, kept before every target
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
            if tls is False:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        # connection slots: a counter, and the requests waiting for one in arrival order
        # (asyncio.Semaphore costs a coroutine and a scan of its waiters on every acquire)
        self._limit = limit
        self._in_use = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._idle: deque[tuple[OriginConnection, float]] = deque()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._closed = False

    # --- connections --------------------------------------------------------------------

    async def _connect(self) -> OriginConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, proto = await loop.create_connection(
                    lambda: OriginConnection(loop, self._read_timeout), self._host, self._port,
                    ssl=self._ssl, server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            raise
        except OSError as exc:  # refused, unreachable, no such host, TLS verification failed
            raise ConnectFailed(f"cannot connect to {self.host_header}: {exc.strerror or type(exc).__name__}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return proto

    def _take_idle(self) -> OriginConnection | None:
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()
            if now - since < KEEPALIVE_TIMEOUT and proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    def _give_back(self, proto: OriginConnection, reusable: bool) -> None:
        if reusable and not self._closed and proto.is_connected() and not proto.should_close:
            self._idle.append((proto, time.monotonic()))
        else:
            proto.close()
        self._release_slot()

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # a slot is handed over by _release_slot
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed over as we were cancelled: pass it on
            raise

    def _release_slot(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next in line
                return
        self._in_use -= 1

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop()[0].close()

    # --- one request --------------------------------------------------------------------

    async def send(self, method: str, target: str, headers: bytes, body: Body, length: int | None = None) -> Exchange:
        """Send a request and return its response once the status line and headers are in.
        `headers` are the shaped header lines; Host and framing are set here, from the body:
        a streamed body goes with `length` when it is known, else chunked."""
        chunked = body is not None and not isinstance(body, bytes) and length is None
        head = self._head(method, target, headers, body, length, chunked)
        if self._in_use < self._limit and not self._waiting:
            self._in_use += 1
        else:
            await self._wait_for_slot()
        try:
            proto = self._take_idle()
            reused = proto is not None
            if proto is None:
                proto = await self._connect()
            try:
                return await self._exchange(proto, method, head, body, chunked)
            except (ServerDisconnectedError, ClientOSError) as exc:
                # The origin closed a pooled connection as we reused it, before any answer: once
                # more, on a new one. A clean close means it never took the request; a reset
                # may come after it did, so only idempotent methods are sent again then
                # (as Go's http.Transport does).
                if not reused or not (body is None or isinstance(body, bytes)):
                    raise
                if isinstance(exc, ClientOSError) and method not in IDEMPOTENT:
                    raise
                proto = await self._connect()
                return await self._exchange(proto, method, head, body, chunked)
        except BaseException:
            self._release_slot()
            raise

    def _head(self, method: str, target: str, headers: bytes, body: Body, length: int | None, chunked: bool) -> bytes:
        if isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
        elif chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif body is not None and length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif method in ("POST", "PUT", "PATCH"):
            framing = b"Content-Length: 0\r\n"  # RFC 9110 §8.6: a request that would carry content
        else:
            framing = b""
        line = f"{method} {self._base_path}{target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
        return b"%sHost: %s\r\n%s%s\r\n" % (line, self._host_line, headers, framing)

    async def _exchange(self, proto: OriginConnection, method: str, head: bytes, body: Body, chunked: bool) -> Exchange:
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise ServerDisconnectedError()
        response = proto.expect(method)
        writer: asyncio.Task[None] | None = None
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
                proto.start_timeout()
            else:
                transport.write(head)
                writer = asyncio.ensure_future(self._write_body(proto, body, chunked=chunked))
                writer.add_done_callback(_retrieve)  # its failure is told through the protocol
            message, payload = await response
            if writer is not None and writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise writer.exception()  # type: ignore[misc]
        except BaseException:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
            proto.close()
            raise
        return Exchange(self, proto, message, payload, writer)

    @staticmethod
    async def _write_body(proto: OriginConnection, body: AsyncIterator[bytes], *, chunked: bool) -> None:
        transport = proto.transport
        assert transport is not None
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    await proto._drain_helper()  # noqa: SLF001 - aiohttp's flow control
            if chunked:
                transport.write(b"0\r\n\r\n")
            proto.start_timeout()
        except BaseException as exc:
            # the body failed (too large, the client left): the upstream must not take a short
            # body for a whole one, so the connection goes, and the reader hears why
            proto.set_exception(exc if isinstance(exc, Exception) else ConnectionError("body aborted"))
            transport.abort()
            raise


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
