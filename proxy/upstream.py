"""A lean HTTP/1.1 client for the one origin the proxy talks to.

aiohttp's `ClientSession` builds a request object, a URL, timers, traces, a cookie jar
lookup and a connector transaction for every call: about a third of the proxy's CPU per
request (see bench/README.md). The forwarder needs none of it: the origin is fixed, the
headers are already shaped. This module keeps a keep-alive pool of connections to
`upstream.url` and speaks HTTP/1.1 on them with aiohttp's own protocol and C parser
(`aiohttp.client_proto.ResponseHandler`), so parsing, payload streams, read timeouts and
connection errors are exactly aiohttp's, and so are the exceptions
(`aiohttp.ClientError` subclasses, `TimeoutError`).

Invariants:
- at most `limit` connections are in use; further requests wait for one;
- a connection goes back to the pool only after its response was read to the end and
  neither side asked to close; anything else is closed;
- a request whose pooled connection turns out to be closed by the origin before any answer
  (a keep-alive race) is sent again once, on a new connection, if its body can be re-sent.
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

from aiohttp import ServerDisconnectedError, StreamReader
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy

#: seconds an idle connection is kept (origins commonly close theirs after 60-75 s)
KEEPALIVE_TIMEOUT = 15.0
READ_BUFSIZE = 2**16
#: write-buffer size past which the body writer waits for the socket to drain
WRITE_HIGH_WATER = 2**16

Body = bytes | AsyncIterator[bytes] | None


class ConnectFailed(ConnectionError):
    """No connection to the origin could be opened (a timeout stays a TimeoutError)."""


class Exchange:
    """One response: status, headers, and the body as a stream (`content`)."""

    __slots__ = ("status", "reason", "headers", "content", "_pool", "_proto", "_keep", "_done", "_writer")

    def __init__(self, pool: Upstream, proto: ResponseHandler, status: int, reason: str,
                 headers: CIMultiDictProxy[str], content: StreamReader, keep: bool,
                 writer: asyncio.Task[None] | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._pool = pool
        self._proto = proto
        self._keep = keep
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
        self._base_path = parts.path.rstrip("/")  # upstream.url's base path, kept before every target
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
            if tls is False:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._slots = asyncio.Semaphore(limit)
        self._idle: deque[tuple[ResponseHandler, float]] = deque()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._closed = False

    # --- connections --------------------------------------------------------------------

    async def _connect(self) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, proto = await loop.create_connection(
                    lambda: ResponseHandler(loop), self._host, self._port,
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

    def _take_idle(self) -> ResponseHandler | None:
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()
            if now - since < KEEPALIVE_TIMEOUT and proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    def _give_back(self, proto: ResponseHandler, reusable: bool) -> None:
        if reusable and not self._closed and proto.is_connected() and not proto.should_close:
            self._idle.append((proto, time.monotonic()))
        else:
            proto.close()
        self._slots.release()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop()[0].close()

    # --- one request --------------------------------------------------------------------

    async def send(self, method: str, target: str, headers: CIMultiDict[str], body: Body) -> Exchange:
        """Send a request (headers already shaped; Host is set here) and return its response
        once the status line and headers are in."""
        head = self._head(method, target, headers, body)
        await self._slots.acquire()
        try:
            proto = self._take_idle()
            reused = proto is not None
            if proto is None:
                proto = await self._connect()
            try:
                return await self._exchange(proto, method, head, body)
            except ServerDisconnectedError:
                # the origin closed a pooled connection as we reused it: once more, on a new one
                if not reused or not (body is None or isinstance(body, bytes)):
                    raise
                proto = await self._connect()
                return await self._exchange(proto, method, head, body)
        except BaseException:
            self._slots.release()
            raise

    def _head(self, method: str, target: str, headers: CIMultiDict[str], body: Body) -> bytes:
        lines = [f"{method} {self._base_path}{target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:  # the parser in front already refuses these
                raise ValueError("a header value holds a line break")
            lines.append(f"{name}: {value}\r\n")
        if isinstance(body, bytes):
            if "Content-Length" not in headers:
                lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None and "Content-Length" not in headers:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif body is None and method in ("POST", "PUT", "PATCH") and "Content-Length" not in headers:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def _exchange(self, proto: ResponseHandler, method: str, head: bytes, body: Body) -> Exchange:
        proto.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,  # a response with neither length nor chunks ends at close
            auto_decompress=False,
            read_timeout=self._read_timeout,
            read_bufsize=READ_BUFSIZE,
        )
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise ServerDisconnectedError()
        writer: asyncio.Task[None] | None = None
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
                proto.start_timeout()
            else:
                transport.write(head)
                writer = asyncio.ensure_future(self._write_body(proto, body, chunked=b"Transfer-Encoding: chunked" in head))
                writer.add_done_callback(_retrieve)  # its failure is told through the protocol
            while True:
                message, payload = await proto.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break  # interim answers (100 Continue) are skipped
            if writer is not None and writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise writer.exception()  # type: ignore[misc]
        except BaseException:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
            proto.close()
            raise
        return Exchange(self, proto, message.code, message.reason, message.headers, payload,
                        not message.should_close, writer)

    @staticmethod
    async def _write_body(proto: ResponseHandler, body: AsyncIterator[bytes], *, chunked: bool) -> None:
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
