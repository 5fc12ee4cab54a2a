"""A keep-alive pool of connections to the one origin the proxy talks to.

`Pool.send()` writes a request (headers as name/value pairs; Host and framing set here) and
returns a `Response` once its head is in, or raises one of `proxy.wire.errors`' OriginErrors
(or what the request body's own reader raised, such as BodyTimeout).

Invariants:
- at most `limit` connections are in use; further requests wait for one, first come first
  served, and one that gives up waiting takes no slot with it;
- a connection goes back to the pool only after its response was read to the end, the
  request body was written whole, and neither side asked to close; anything else is closed;
- a body write that the origin does not take for `read_timeout` fails with WriteTimeout;
- a request whose pooled connection turns out to be closed by the origin before any answer
  (a keep-alive race) is sent again once, on a new connection, if its body can be re-sent
  and either it was not written at all or its method is idempotent.

TLS to an https origin is the pool's own layer (`proxy.wire.tls`), not the event loop's.
Through an egress proxy (`via`): an https origin is reached through a CONNECT tunnel
(`proxy.wire.tunnel`), TLS inside it with the origin's name; an http origin gets its requests
in absolute form, with Proxy-Authorization, on keep-alive connections to the proxy. Either
way the origin's name is resolved by the proxy, never here, and a 407 (which only a proxy
sends) fails with ConnectFailed rather than reaching the app as the origin's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

from proxy.wire.errors import ConnectFailed, ConnectTimeout, Disconnected, NotSent, WriteTimeout
from proxy.wire.http import IDEMPOTENT, Headers, content_length, find, render
from proxy.wire.origin import Answer, OriginConnection
from proxy.wire.stream import Body
from proxy.wire.tls import TLSLayer
from proxy.wire.tunnel import Via, authority, open_tunnel, printable, reason_of

#: seconds an idle connection is kept (origins commonly close theirs after 60-75 s)
KEEPALIVE_TIMEOUT = 15.0

#: seconds `close()` waits for its connections to be closed
CLOSE_WAIT = 1.0

RequestBody = bytes | AsyncIterator[bytes] | None


class Response:
    """One response: status, reason, headers (pairs, as received, no trailers) and the body
    as a stream (None when it has none). `release()` or `close()` when done with it."""

    __slots__ = ("status", "reason", "headers", "body", "_pool", "_proto", "_keep", "_done", "_writer")

    def __init__(self, pool: Pool, proto: OriginConnection, answer: Answer, writer: asyncio.Task[None] | None) -> None:
        self.status = answer.status
        self.reason = answer.reason
        self.headers = answer.headers
        self.body: Body | None = answer.body
        self._pool = pool
        self._proto = proto
        self._keep = answer.keep_alive
        self._done = False
        self._writer = writer

    def get(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case)."""
        return find(self.headers, name)

    @property
    def content_length(self) -> int | None:
        return content_length(self.get(b"content-length"))

    def release(self) -> None:
        """Done with the response: the connection is kept if it was read to the end."""
        if self._done:
            return
        self._done = True
        # kept only when read to the end (a body left unread may hold its socket's reading
        # paused) and the request went out whole
        # An answer without a body (HEAD, 204, 304) ends at its head: a body its origin sends
        # anyway would be read as the next request's answer, another client's, so that
        # connection is not reused.
        writer = self._writer
        reusable = (self._keep and self._proto.finished and self.body is not None and self.body.at_eof
                    and (writer is None or _wrote_whole(writer)))
        if writer is not None and not writer.done():
            writer.cancel()  # answered before the upload ended: the rest is not sent
        self._pool._give_back(self._proto, reusable)

    def close(self) -> None:
        """Done, and the connection is not to be reused (the answer was not read to the end)."""
        if self._done:
            return
        self._done = True
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._pool._give_back(self._proto, False)



class Pool:
    def __init__(self, url: str, *, tls: ssl.SSLContext | bool, limit: int,
                 connect_timeout: float, read_timeout: float, via: Via | None = None) -> None:
        """`via`: the egress proxy to reach `url` through (None: directly)."""
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme == "https" and self._port == 443) or (parts.scheme == "http" and self._port == 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if default_port else f"{host}:{self._port}"
        self._host_line = self.host_header.encode()
        self._base_path = parts.path.rstrip("/").encode()  # upstream.url's base path, kept before every target
        self.via = via
        self._via_name = str(via) if via is not None else None  # no credentials in it (Via's contract)
        self._via_where = authority(via.host, via.port) if via is not None else ""  # for error messages
        # an http origin through a proxy: absolute-form targets, each request authorised to the proxy
        self._forwarded = via is not None and parts.scheme == "http"
        self._target_prefix = (b"http://" + self._host_line if self._forwarded else b"") + self._base_path
        self._proxy_line = (b"Proxy-Authorization: %s\r\n" % via.authorization
                            if self._forwarded and via is not None and via.authorization is not None else b"")
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
        #: connections opened so far (over https, each one TLS handshake): keep-alive at work
        #: shows as few of these for many requests
        self.opened = 0

    # --- connections --------------------------------------------------------------------

    async def _connect(self) -> OriginConnection:
        loop = asyncio.get_running_loop()
        via = self.via
        through = f" through the egress proxy {self._via_where}" if via is not None else ""

        def factory() -> OriginConnection:
            return OriginConnection(loop, self._read_timeout, via=self._via_name)

        def tls_factory() -> TLSLayer:
            assert self._ssl is not None
            return TLSLayer(loop, factory(), self._ssl, self._host)

        try:
            async with asyncio.timeout(self._connect_timeout):  # connect, CONNECT and TLS, all of it
                if via is None:
                    if self._ssl is None:
                        _, proto = await loop.create_connection(factory, self._host, self._port)
                    else:
                        _, layer = await loop.create_connection(tls_factory, self._host, self._port)
                        proto = await _handshake(layer)
                elif self._ssl is None:  # http: requests go to the proxy in absolute form
                    try:
                        _, proto = await loop.create_connection(factory, via.host, via.port)
                    except OSError as exc:
                        raise ConnectFailed(
                            f"cannot connect to the egress proxy {self._via_where}: {reason_of(exc)}") from exc
                else:  # https: TLS with the origin, inside a tunnel through the proxy
                    sock = await open_tunnel(loop, via, self._host, self._port)
                    try:
                        _, layer = await loop.create_connection(tls_factory, sock=sock)
                    except BaseException:
                        sock.close()
                        raise
                    proto = await _handshake(layer)
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {self.host_header}{through} within {self._connect_timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, no such host, TLS verification failed
            raise ConnectFailed(f"cannot connect to {self.host_header}{through}: {reason_of(exc)}") from exc
        self.opened += 1
        return proto  # TCP_NODELAY is set by asyncio and uvloop alike

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
        """Close the idle connections, and return once they are closed (their
        upstream_connection_closed logged), at most CLOSE_WAIT later. Connections in use close
        when their responses are done."""
        self._closed = True
        closing = []
        while self._idle:
            proto = self._idle.pop()[0]
            proto.close()
            closing.append(proto.lost)
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_WAIT)

    # --- one request --------------------------------------------------------------------

    async def send(self, method: str, target: str, headers: Headers, body: RequestBody,
                   length: int | None = None) -> Response:
        """Send a request and return its response once the status line and headers are in.
        `headers` carry neither Host nor framing: both are set here, from the body (a
        streamed one goes with `length` when it is known, else chunked)."""
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
            except Disconnected as exc:
                # The origin closed a pooled connection as we reused it, before any byte of an
                # answer (a keep-alive race): once more, on a new one, when the request was not
                # written at all, or when it was and its method may be received twice (Go's
                # http.Transport: a POST the origin may have taken is never sent again).
                if not reused or proto.answered or not (body is None or isinstance(body, bytes)):
                    raise
                if not isinstance(exc, NotSent) and method not in IDEMPOTENT:
                    raise
                proto = await self._connect()
                return await self._exchange(proto, method, head, body, chunked)
        except BaseException:
            self._release_slot()
            raise

    def _head(self, method: str, target: str, headers: Headers, body: RequestBody, length: int | None,
              chunked: bool) -> bytes:
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
        return b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s%s%s\r\n" % (
            method.encode("ascii"), self._target_prefix, target.encode("ascii", "surrogateescape"),
            self._host_line, self._proxy_line, render(headers), framing,
        )

    async def _exchange(self, proto: OriginConnection, method: str, head: bytes, body: RequestBody,
                        chunked: bool) -> Response:
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise NotSent("the origin closed the connection before the request was written")
        answer = proto.expect(method)
        writer: asyncio.Task[None] | None = None
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
                proto.start_timeout()
            else:
                transport.write(head)
                writer = asyncio.ensure_future(self._write_body(proto, body, chunked=chunked))
                writer.add_done_callback(_retrieve)  # its failure is told through the protocol
            result = await answer
            if result.status == 407 and self._forwarded:
                # only a proxy asks a client to authenticate to it (RFC 9110 §15.5.8): the
                # origin never saw this request, and its app must not take this for its answer
                raise ConnectFailed(f"the egress proxy {self._via_where} refused the request to "
                                    f"{self.host_header}: 407 {printable(result.reason)}".rstrip())
            if writer is not None and writer.done() and not writer.cancelled():
                failure = writer.exception()
                if failure is not None:
                    raise failure
        except BaseException:
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
            proto.close()
            raise
        return Response(self, proto, result, writer)

    async def _write_body(self, proto: OriginConnection, body: AsyncIterator[bytes], *, chunked: bool) -> None:
        transport = proto.transport
        assert transport is not None
        drain = proto.drain
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if chunked:
                    # one write: writelines does not pause the protocol on some CPython
                    # releases (gh-127655), and the write timeout would never start
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    transport.write(chunk)
                if drain.paused:
                    try:
                        await drain.wait(self._read_timeout or None)
                    except TimeoutError:
                        raise WriteTimeout(
                            f"the origin took no byte of the body for {self._read_timeout:g} s") from None
            if chunked:
                transport.write(b"0\r\n\r\n")
            proto.start_timeout()
        except BaseException as exc:
            # the body failed (too large, the client left, a stall): the origin must not take
            # a short body for a whole one, so the connection goes, and the reader hears why
            proto.fail(exc if isinstance(exc, Exception) else Disconnected("the request body was aborted"))
            proto.abort()
            raise


async def _handshake(layer: TLSLayer) -> OriginConnection:
    """The origin's protocol once TLS is up; on a failure or a timeout the socket goes."""
    try:
        await layer.ready
    except BaseException:
        layer.ready.cancel()  # given up on (a timeout): a failure after this is nobody's to hear
        layer.abort()
        raise
    return cast(OriginConnection, layer.app)


def _wrote_whole(writer: asyncio.Task[None]) -> bool:
    """The body writer ended, having sent the whole body."""
    return writer.done() and not writer.cancelled() and writer.exception() is None


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
