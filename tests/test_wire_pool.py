"""`proxy.wire.Pool` driven directly against a scripted origin.

The origin is a raw asyncio server on 127.0.0.1 whose behaviour on each connection a test
scripts (read a request, answer given bytes, close, reset, stall, never read); it records
every byte it reads and every connection it accepts. No proxy sits around the pool.

Every test runs twice: against a plain-HTTP origin, and against the same origin behind TLS
(a certificate from a trustme CA the pool trusts), so the pool's own TLS layer
(`proxy.wire.tls`) meets every framing, close, reset and stall the plain one does.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import pytest
import trustme

from proxy.wire import Pool, Response
from proxy.wire.errors import (
    BadResponse,
    BodyTimeout,
    ClientGone,
    ConnectFailed,
    Disconnected,
    ReadTimeout,
    WriteTimeout,
)

READ_TIMEOUT = 0.3
#: a generous upper bound for anything expected at once, or within READ_TIMEOUT
WAIT = 5.0
MiB = 1024 * 1024


# --- the scripted origin ---------------------------------------------------------------------


class Peer:
    """The origin's side of one accepted connection."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.received = bytearray()  # every byte read from the pool, in order
        self._buffer = bytearray()  # read, not yet taken by the script
        self.ended = asyncio.Event()  # the pool's side closed or reset the connection (seen on a read)
        self.reset_seen = False
        self.done = asyncio.Event()  # the script is over (and the connection closed)

    async def _fill(self) -> bool:
        if self.ended.is_set():
            return False
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            self.reset_seen = True
            data = b""
        if not data:
            self.ended.set()
            return False
        self.received += data
        self._buffer += data
        return True

    async def read_head(self) -> bytes:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if not await self._fill():
                raise EOFError("the connection ended before a request head")
        head = bytes(self._buffer[:end + 4])
        del self._buffer[:end + 4]
        return head

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                raise EOFError("the connection ended mid-body")
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if not await self._fill():
                raise EOFError("the connection ended mid-chunk")
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    async def read_request(self) -> tuple[bytes, bytes]:
        """One request: its head, and its body (de-chunked)."""
        head = await self.read_head()
        lines = head.lower().split(b"\r\n")
        if b"transfer-encoding: chunked" in lines:
            body = bytearray()
            while size := int(await self._read_line(), 16):
                body += await self.read_exactly(size)
                await self.read_exactly(2)
            while await self._read_line():  # trailers, then the empty line
                pass
            return head, bytes(body)
        length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
        return head, await self.read_exactly(length)

    async def read_to_end(self) -> None:
        """Read (and record) until the pool's side closes or resets the connection."""
        while await self._fill():
            pass

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def send_drained(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def dribble(self, data: bytes) -> None:
        """One byte a write, the loop turning in between (the pool gets it in small pieces)."""
        for i in range(len(data)):
            self.writer.write(data[i:i + 1])
            await self.writer.drain()
            await asyncio.sleep(0)

    def close(self) -> None:
        """A clean close (FIN; over TLS, close_notify first)."""
        self.writer.close()

    def truncate(self) -> None:
        """FIN with no TLS close_notify before it (over plain HTTP, a clean close)."""
        # through a duplicate of the descriptor: uvloop's transport sockets refuse shutdown()
        fd = self.writer.get_extra_info("socket").fileno()
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
            dup.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """A reset (RST): SO_LINGER 0, then close."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Peer], Awaitable[None]]


_CA = trustme.CA()
_CERT = _CA.issue_cert("127.0.0.1", "localhost")


class Origin:
    def __init__(self, tls: bool = False) -> None:
        #: over https: the context the pool trusts the origin's certificate with
        self.client_tls: ssl.SSLContext | bool = False
        self._server_tls: ssl.SSLContext | None = None
        if tls:
            self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            _CERT.configure_cert(self._server_tls)
            self.client_tls = ssl.create_default_context()
            _CA.configure_trust(self.client_tls)
        self.scripts: list[Script] = []  # for the connections in the order they are accepted
        self.default: Script = answer(ok(b"default"))  # for connections beyond the list
        self.peers: list[Peer] = []
        self._arrivals: dict[int, asyncio.Future[Peer]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def accepted(self) -> int:
        return len(self.peers)

    def url(self, path: str = "") -> str:
        return f"{'https' if self._server_tls else 'http'}://127.0.0.1:{self.port}{path}"

    @property
    def host(self) -> bytes:
        return f"127.0.0.1:{self.port}".encode()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._server_tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def _arrival(self, index: int) -> asyncio.Future[Peer]:
        if index not in self._arrivals:
            self._arrivals[index] = asyncio.get_running_loop().create_future()
        return self._arrivals[index]

    async def peer(self, index: int) -> Peer:
        """The index-th connection accepted, once it is."""
        return await asyncio.wait_for(asyncio.shield(self._arrival(index)), WAIT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        self._arrival(peer.index).set_result(peer)
        script = self.scripts[peer.index] if peer.index < len(self.scripts) else self.default
        try:
            await script(peer)
        except (EOFError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the test is over (a cancelled handler task would be logged as an error)
        finally:
            if not writer.transport.is_closing():
                writer.close()
            peer.done.set()
            self._tasks.discard(task)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in self.peers:
            peer.writer.transport.abort()
        await self._server.wait_closed()


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body) + b"".join(h + b"\r\n" for h in extra)
    return head + b"\r\n" + body


def answer(*responses: bytes, then: str = "wait") -> Script:
    """Read a request and send the next response, for each response; then `wait` for the
    pool to end the connection, or `close` it, or `reset` it."""

    async def script(peer: Peer) -> None:
        for response in responses:
            await peer.read_request()
            await peer.send_drained(response)
        if then == "close":
            peer.close()
        elif then == "reset":
            peer.reset()
        else:
            await peer.read_to_end()

    return script


async def never_read(peer: Peer) -> None:
    """Take the head's first bytes, then never read again (the test's end cancels this)."""
    await peer._fill()  # noqa: SLF001
    await asyncio.Event().wait()


# --- the pool's side ---------------------------------------------------------------------------


MakePool = Callable[..., Pool]


@pytest.fixture(params=["plain", "tls"])
async def origin(request: pytest.FixtureRequest) -> AsyncIterator[Origin]:
    server = Origin(tls=request.param == "tls")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make_pool(origin: Origin) -> AsyncIterator[MakePool]:
    """make_pool(path="", limit=10, read_timeout=READ_TIMEOUT, url=None) -> a Pool to the origin."""
    made: list[Pool] = []

    def make(path: str = "", *, limit: int = 10, read_timeout: float = READ_TIMEOUT, url: str | None = None) -> Pool:
        pool = Pool(url or origin.url(path), tls=origin.client_tls, limit=limit, connect_timeout=WAIT, read_timeout=read_timeout)
        made.append(pool)
        return pool

    yield make
    while _responses:  # a test that failed midway may hold some: close their connections
        _responses.pop().close()  # a no-op once released
    for pool in made:
        await pool.close()


_responses: list[Response] = []


async def send(pool: Pool, method: str = "GET", target: str = "/x", headers: Sequence[tuple[bytes, bytes]] = (),
               body: bytes | AsyncIterator[bytes] | None = None, length: int | None = None) -> Response:
    response = await asyncio.wait_for(pool.send(method, target, list(headers), body, length), WAIT)
    _responses.append(response)
    return response


async def read_body(response: Response) -> bytes:
    """The whole body, chunk by chunk (b"" for none)."""
    if response.body is None:
        return b""
    data = bytearray()
    while chunk := await asyncio.wait_for(response.body.read_chunk(), WAIT):
        data += chunk
    return bytes(data)


async def exchange(pool: Pool, method: str = "GET", target: str = "/x", **kw: object) -> tuple[Response, bytes]:
    """Send, read the body to its end, release."""
    response = await send(pool, method, target, **kw)  # type: ignore[arg-type]
    data = await read_body(response)
    response.release()
    return response, data


async def chunks(*pieces: bytes, fail: BaseException | None = None) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    if fail is not None:
        raise fail


def request(method: str, target: str, host: bytes, *lines: bytes) -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), target.encode(), host) + b"".join(
        line + b"\r\n" for line in lines) + b"\r\n"


# --- keep-alive, framing, what the origin receives --------------------------------------------


async def test_two_sequential_gets_share_one_connection(origin: Origin, make_pool: MakePool) -> None:
    origin.default = answer(ok(b"one"), ok(b"two"))
    pool = make_pool("/base/")
    r1, b1 = await exchange(pool, "GET", "/a?x=1", headers=[(b"X-Test", b"1"), (b"Accept", b"*/*")])
    r2, b2 = await exchange(pool, "GET", "/b")
    assert (r1.status, b1, r2.status, b2) == (200, b"one", 200, b"two")
    assert origin.accepted == 1
    assert bytes(origin.peers[0].received) == (
        request("GET", "/base/a?x=1", origin.host, b"X-Test: 1", b"Accept: */*")
        + request("GET", "/base/b", origin.host)
    )


@pytest.mark.parametrize(("method", "make_body", "length", "framing", "raw"), [
    ("GET", lambda: None, None, (), b""),
    ("DELETE", lambda: None, None, (), b""),
    ("POST", lambda: None, None, (b"Content-Length: 0",), b""),
    ("POST", lambda: b"hello", None, (b"Content-Length: 5",), b"hello"),
    ("PUT", lambda: chunks(b"hel", b"lo"), 5, (b"Content-Length: 5",), b"hello"),
    ("POST", lambda: chunks(b"hel", b"", b"lo"), None, (b"Transfer-Encoding: chunked",),
     b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"),
], ids=["get", "delete", "post-empty", "bytes", "stream-with-length", "stream-chunked"])
async def test_request_bytes_on_the_wire(origin: Origin, make_pool: MakePool, method: str,
                                         make_body: Callable[[], object], length: int | None,
                                         framing: tuple[bytes, ...], raw: bytes) -> None:
    origin.default = answer(ok())
    pool = make_pool("/gateway/v1/")
    _, data = await exchange(pool, method, "/api/v3/partners/x?q=%20", headers=[(b"X-Request-ID", b"r1")],
                             body=make_body(), length=length)
    assert data == b"ok"
    assert bytes(origin.peers[0].received) == request(
        method, "/gateway/v1/api/v3/partners/x?q=%20", origin.host, b"X-Request-ID: r1", *framing) + raw


@pytest.mark.parametrize("closing", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection-close", "http-1.0"])
async def test_an_answer_that_asks_to_close_gets_a_new_connection_next_time(
        origin: Origin, make_pool: MakePool, closing: bytes) -> None:
    # the origin keeps the connection open: only the answer says it is not to be reused
    origin.scripts = [answer(closing), answer(ok(b"second"))]
    pool = make_pool()
    _, first = await exchange(pool, "GET", "/one")
    _, second = await exchange(pool, "GET", "/two")
    assert (first, second) == (b"ok", b"second")
    assert origin.accepted == 2
    peer = origin.peers[0]
    await asyncio.wait_for(peer.ended.wait(), WAIT)  # the pool closed it
    assert bytes(peer.received) == request("GET", "/one", origin.host)


@pytest.mark.parametrize("framing", [b"Content-Length: 10", b"Transfer-Encoding: chunked"])
async def test_head_then_get_on_one_connection(origin: Origin, make_pool: MakePool, framing: bytes) -> None:
    """The HEAD's answer ends at its head, whatever its framing says; its connection is then
    not reused (a body a broken origin sent anyway would be taken for the next answer), and
    the GET reads its own answer on a new one."""
    origin.scripts = [answer(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n"), answer(ok(b"0123456789", b"X-Get: 1"))]
    pool = make_pool()
    head = await send(pool, "HEAD", "/h")
    assert head.status == 200 and head.body is None
    assert head.headers == [tuple(framing.split(b": "))]
    head.release()
    get, data = await exchange(pool, "GET", "/g")
    assert get.status == 200 and data == b"0123456789"
    assert get.headers == [(b"Content-Length", b"10"), (b"X-Get", b"1")]
    assert origin.accepted == 2
    assert bytes(origin.peers[0].received) == request("HEAD", "/h", origin.host)
    assert bytes(origin.peers[1].received) == request("GET", "/g", origin.host)


async def test_a_body_sent_after_a_head_answer_never_reaches_the_next_request(origin: Origin, make_pool: MakePool) -> None:
    """A broken origin answers HEAD with a Content-Length and then sends that many bytes
    anyway, a moment later, shaped like an answer: the next request must not take them."""
    stray = ok(b"LEAKD", b"Set-Cookie: stolen=A")

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(stray))
        await peer.read_request()  # only if the pool reused this connection
        await peer.send_drained(stray)

    origin.scripts = [script, answer(ok(b"mine"))]
    pool = make_pool(limit=1)
    head = await send(pool, "HEAD", "/h")
    head.release()
    get, data = await exchange(pool, "GET", "/g")
    assert data == b"mine" and (b"Set-Cookie", b"stolen=A") not in get.headers
    assert origin.accepted == 2


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_204_and_304_with_a_content_length_have_no_body(origin: Origin, make_pool: MakePool, status: bytes) -> None:
    # no body follows; if the pool waited for 10 bytes, the next answer would be taken for them
    origin.scripts = [answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\nETag: \"e\"\r\n\r\n"), answer(ok(b"next"))]
    pool = make_pool()
    first = await asyncio.wait_for(send(pool), WAIT)  # not waiting for 10 bytes that never come
    assert first.status == int(status[:3])
    assert first.body is None
    first.release()
    _, data = await exchange(pool, "GET", "/next")
    assert data == b"next"
    assert origin.accepted == 2  # an answer that ends at its head: its connection is not reused


@pytest.mark.parametrize("size", [11, 3 * MiB])
async def test_a_close_delimited_body_is_read_whole(origin: Origin, make_pool: MakePool, size: int) -> None:
    payload = bytes(i % 251 for i in range(size))

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + payload[:5])
        await peer.send_drained(payload[5:])
        peer.close()

    origin.scripts = [script]
    pool = make_pool()
    response = await send(pool)
    assert response.body is not None
    if size < 1024:
        data = await asyncio.wait_for(response.body.read_all(), WAIT)
    else:
        data = await read_body(response)
    assert data == payload
    assert response.body.complete
    response.release()
    _, again = await exchange(pool)  # that connection ended with the body: a new one
    assert again == b"default"
    assert origin.accepted == 2


async def test_chunked_trailers_reach_no_headers_not_even_the_next_responses(origin: Origin, make_pool: MakePool) -> None:
    origin.default = answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-First: 1\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nSet-Cookie: s=1\r\n\r\n",
        ok(b"two", b"X-Second: 1"),
    )
    pool = make_pool()
    first, b1 = await exchange(pool, "GET", "/one")
    second, b2 = await exchange(pool, "GET", "/two")
    assert b1 == b"hello world"
    assert first.headers == [(b"Transfer-Encoding", b"chunked"), (b"X-First", b"1")]
    assert b2 == b"two"
    assert second.headers == [(b"Content-Length", b"3"), (b"X-Second", b"1")]
    assert origin.accepted == 1  # the same pooled connection


async def test_interim_100_and_103_answers_are_skipped(origin: Origin, make_pool: MakePool) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 100 Continue\r\n\r\n")
        await peer.send_drained(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await peer.send_drained(ok(b"final", b"X-Final: 1"))
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"again"))
        await peer.read_to_end()

    origin.scripts = [script]
    pool = make_pool()
    first, b1 = await exchange(pool, "POST", "/one", body=b"data")
    assert (first.status, b1) == (200, b"final")
    assert first.headers == [(b"Content-Length", b"5"), (b"X-Final", b"1")]
    second, b2 = await exchange(pool, "GET", "/two")
    assert (second.status, b2) == (200, b"again")
    assert origin.accepted == 1


async def test_a_response_in_small_pieces(origin: Origin, make_pool: MakePool) -> None:
    """Heads, interim answers, chunks and trailers split at every byte."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.dribble(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                           b"X-A: 1\r\n\r\n3\r\nabc\r\n0\r\nSet-Cookie: s=1\r\nX-Trailer: t\r\n\r\n")
        await peer.read_request()
        await peer.dribble(ok(b"xyz", b"X-B: 2"))
        await peer.read_to_end()

    origin.scripts = [script]
    pool = make_pool()
    first, b1 = await exchange(pool, "GET", "/one")
    second, b2 = await exchange(pool, "GET", "/two")
    assert (b1, b2) == (b"abc", b"xyz")
    assert first.headers == [(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]
    assert second.headers == [(b"Content-Length", b"3"), (b"X-B", b"2")]
    assert origin.accepted == 1


# --- answers that are not valid -------------------------------------------------------------


async def test_101_is_a_bad_response(origin: Origin, make_pool: MakePool) -> None:
    origin.scripts = [answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")]
    pool = make_pool(limit=1)
    with pytest.raises(BadResponse):
        await send(pool)
    await asyncio.wait_for(origin.peers[0].ended.wait(), WAIT)  # that connection is closed
    _, data = await exchange(pool)  # and its slot came back
    assert data == b"default"


@pytest.mark.parametrize("first", [ok(b"ok"), b"HTTP/1.1 204 No Content\r\n\r\n"], ids=["with-body", "no-body"])
@pytest.mark.parametrize("when", ["with-the-answer", "while-idle"])
async def test_bytes_after_a_complete_response_mean_the_connection_is_not_reused(
        origin: Origin, make_pool: MakePool, first: bytes, when: str) -> None:
    unsolicited = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle"
    released = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.read_request()
        if when == "with-the-answer":
            await peer.send_drained(first + unsolicited)
        else:
            await peer.send_drained(first)
            await released.wait()
            await peer.send_drained(unsolicited)
        await peer.read_to_end()

    origin.scripts = [script]
    pool = make_pool()
    response = await send(pool, "GET", "/one")
    assert response.status == int(first[9:12])
    body = await read_body(response)
    assert body == first.partition(b"\r\n\r\n")[2]
    response.release()
    released.set()
    await asyncio.wait_for(origin.peers[0].ended.wait(), WAIT)  # the pool dropped it
    _, data = await exchange(pool, "GET", "/two")
    assert data == b"default"  # not "smuggle"
    assert origin.accepted == 2
    assert bytes(origin.peers[0].received) == request("GET", "/one", origin.host)


@pytest.mark.parametrize("pieces", [1, 40], ids=["one-write", "many-writes"])
async def test_a_response_head_over_64_kib_is_a_bad_response(origin: Origin, make_pool: MakePool, pieces: int) -> None:
    headers = b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"a" * 2000) for i in range(40))  # ~80 KiB
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + headers + b"\r\n"

    async def script(peer: Peer) -> None:
        await peer.read_request()
        step = -(-len(head) // pieces)
        for i in range(0, len(head), step):
            await peer.send_drained(head[i:i + step])
        await peer.send_drained(b"ok")
        await peer.read_to_end()

    origin.scripts = [script]
    pool = make_pool()
    with pytest.raises(BadResponse):
        await send(pool)
    await asyncio.wait_for(origin.peers[0].ended.wait(), WAIT)


async def test_a_response_head_under_64_kib_is_fine(origin: Origin, make_pool: MakePool) -> None:
    headers = [b"X-Filler-%04d: %s" % (i, b"a" * 2000) for i in range(30)]  # ~60 KiB
    origin.default = answer(ok(b"big", *headers))
    response, data = await exchange(make_pool())
    assert data == b"big" and len(response.headers) == 31


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"hello there\r\n\r\n",
])
async def test_an_invalid_status_line_is_a_bad_response(origin: Origin, make_pool: MakePool, line: bytes) -> None:
    origin.scripts = [answer(line)]
    pool = make_pool()
    with pytest.raises(BadResponse):
        await send(pool)
    await asyncio.wait_for(origin.peers[0].ended.wait(), WAIT)


# --- the keep-alive race ----------------------------------------------------------------------


async def test_a_pooled_connection_the_origin_closed_while_idle(origin: Origin, make_pool: MakePool) -> None:
    origin.scripts = [answer(ok(b"first"), then="close"), answer(ok(b"second"))]
    pool = make_pool()
    _, first = await exchange(pool, "GET", "/one")
    await asyncio.wait_for(origin.peers[0].done.wait(), WAIT)  # the origin closed it
    _, second = await exchange(pool, "GET", "/two")
    assert (first, second) == (b"first", b"second")
    assert origin.accepted == 2


@pytest.mark.parametrize(("how", "method", "make_body", "retried"), [
    ("close", "GET", lambda: None, True),
    # the origin read the POST before it closed: it may have acted on it, so it is not sent
    # again (Go's http.Transport), only a request that was not written at all would be
    ("close", "POST", lambda: b"data", False),
    ("reset", "GET", lambda: None, True),
    ("reset", "DELETE", lambda: None, True),
    ("reset", "POST", lambda: b"data", False),
    ("close", "POST", lambda: chunks(b"data"), False),  # a streamed body cannot be sent again
], ids=["close-get", "close-post", "reset-get", "reset-delete", "reset-post", "close-streamed-post"])
async def test_a_pooled_connection_closed_as_it_is_reused(origin: Origin, make_pool: MakePool, how: str, method: str,
                                                          make_body: Callable[[], object], retried: bool) -> None:
    """The origin takes the next request on a pooled connection, then closes or resets it
    without an answer."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(ok(b"first"))
        await peer.read_request()  # the whole request: a close then is a FIN, not a RST
        peer.close() if how == "close" else peer.reset()

    origin.scripts = [script, answer(ok(b"second"))]
    pool = make_pool(limit=1)
    _, first = await exchange(pool, "GET", "/one")
    assert first == b"first"
    if retried:
        response, second = await exchange(pool, method, "/two", body=make_body())
        assert (response.status, second) == (200, b"second")
        assert origin.accepted == 2
        # the retry is the very same request
        sent = bytes(origin.peers[1].received)
        assert sent.startswith(method.encode() + b" /two HTTP/1.1\r\n")
        assert bytes(origin.peers[0].received).endswith(sent)
    else:
        with pytest.raises(Disconnected) as failure:
            await send(pool, method, "/two", body=make_body())  # type: ignore[arg-type]
        assert failure.value.reset is (how == "reset")
        assert origin.accepted == 1
        _, after = await exchange(pool, "GET", "/after")  # the slot came back
        assert after == b"second"


async def test_a_non_idempotent_request_whose_answer_had_begun_is_not_sent_again(
        origin: Origin, make_pool: MakePool) -> None:
    """A pooled connection closed after part of an answer: the origin took the request, so
    the POST is not sent again ("before any answer")."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(ok(b"first"))
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Le")
        peer.close()

    origin.scripts = [script, answer(ok(b"second"))]
    pool = make_pool()
    await exchange(pool, "GET", "/one")
    with pytest.raises(Disconnected):
        await send(pool, "POST", "/pay", body=b"once")
    assert origin.accepted == 1


# --- timeouts ---------------------------------------------------------------------------------


async def test_an_origin_that_never_answers_is_a_read_timeout(origin: Origin, make_pool: MakePool) -> None:
    origin.scripts = [answer()]  # reads nothing, answers nothing, waits for the end
    pool = make_pool(limit=1)
    started = time.monotonic()
    with pytest.raises(ReadTimeout):
        await send(pool)
    assert time.monotonic() - started < WAIT
    await asyncio.wait_for(origin.peers[0].ended.wait(), WAIT)
    _, data = await exchange(pool)
    assert data == b"default"


async def test_an_origin_silent_mid_body_is_a_read_timeout(origin: Origin, make_pool: MakePool) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await peer.read_to_end()

    origin.scripts = [script]
    response = await send(make_pool())
    assert response.body is not None
    with pytest.raises(ReadTimeout):
        await asyncio.wait_for(response.body.read_all(), WAIT)
    response.close()


async def test_a_close_delimited_body_cut_by_the_read_timeout_is_not_whole(origin: Origin, make_pool: MakePool) -> None:
    """The pool closes the connection itself on a read timeout: that close must not end a
    close-delimited body as if the origin had."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10)
        await peer.read_to_end()

    origin.scripts = [script]
    response = await send(make_pool())
    assert response.body is not None
    await asyncio.wait_for(origin.peers[0].ended.wait(), WAIT)  # the timeout fired, the pool closed
    assert not response.body.complete
    with pytest.raises(ReadTimeout):
        await asyncio.wait_for(response.body.read_all(), WAIT)
    response.close()


async def test_a_slow_reader_is_not_origin_silence(origin: Origin, make_pool: MakePool) -> None:
    payload = bytes(i % 253 for i in range(4 * MiB))
    origin.default = answer(ok(payload))
    response = await send(make_pool())
    await asyncio.sleep(4 * READ_TIMEOUT)  # the subject: the app reads nothing for a while
    assert await read_body(response) == payload
    response.release()


async def test_read_all_takes_a_body_over_the_buffer_limit(origin: Origin, make_pool: MakePool) -> None:
    """read_all() on a body bigger than the buffer's high-water mark (reading pauses)."""
    payload = bytes(i % 253 for i in range(2 * MiB))
    origin.default = answer(ok(payload))
    response = await send(make_pool())
    assert response.body is not None
    assert await asyncio.wait_for(response.body.read_all(), WAIT) == payload
    response.release()


@pytest.mark.parametrize("length", [None, 50 * MiB], ids=["chunked", "sized"])
async def test_a_body_the_origin_never_takes_is_a_write_timeout(origin: Origin, make_pool: MakePool,
                                                                length: int | None) -> None:
    async def fifty_mib() -> AsyncIterator[bytes]:
        chunk = b"x" * MiB
        for _ in range(50):
            yield chunk

    origin.scripts = [never_read, answer(ok(b"after"))]
    pool = make_pool(limit=1)
    started = time.monotonic()
    with pytest.raises(WriteTimeout):
        await send(pool, "POST", "/upload", body=fifty_mib(), length=length)
    assert time.monotonic() - started < WAIT
    _, data = await exchange(pool, "GET", "/after")  # the one slot came back
    assert data == b"after"
    assert origin.accepted == 2


@pytest.mark.parametrize("length", [None, 10], ids=["chunked", "sized"])
@pytest.mark.parametrize("error", [BodyTimeout, ClientGone])
async def test_a_failing_request_body_aborts_the_origin_connection(origin: Origin, make_pool: MakePool,
                                                                   length: int | None, error: type[Exception]) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_to_end()

    origin.scripts = [script]
    pool = make_pool(limit=1)
    failure = error("the app's body failed")
    with pytest.raises(error) as raised:
        await send(pool, "POST", "/up", body=chunks(b"abc", fail=failure), length=length)
    assert raised.value is failure
    peer = origin.peers[0]
    await asyncio.wait_for(peer.ended.wait(), WAIT)  # the origin sees the connection end
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: 10"
    head = request("POST", "/up", origin.host, framing)
    received = bytes(peer.received)
    assert received.startswith(head)
    assert received[len(head):] in (b"", b"3\r\nabc\r\n" if length is None else b"abc")  # never "0\r\n\r\n"
    _, data = await exchange(pool)  # the slot came back
    assert data == b"default"


# --- the pool's limit ---------------------------------------------------------------------------


async def test_with_limit_1_a_second_request_waits_for_the_first_to_be_released(origin: Origin, make_pool: MakePool) -> None:
    origin.default = answer(ok(b"one"), ok(b"two"))
    pool = make_pool(limit=1)
    first = await send(pool, "GET", "/one")
    second = asyncio.create_task(pool.send("GET", "/two", [], None))
    done, _ = await asyncio.wait({second}, timeout=0.3)
    assert not done  # waiting for the one slot
    assert origin.accepted == 1 and b"/two" not in origin.peers[0].received
    assert await read_body(first) == b"one"
    first.release()
    response = await asyncio.wait_for(second, WAIT)
    assert await read_body(response) == b"two"
    response.release()
    assert origin.accepted == 1  # and it got the released connection


@pytest.mark.parametrize("when", ["while-waiting", "as-the-slot-is-handed-over"])
async def test_a_waiter_cancelled_leaks_no_slot(origin: Origin, make_pool: MakePool, when: str) -> None:
    origin.default = answer(*[ok(b"%d" % i) for i in range(5)])
    pool = make_pool(limit=1)
    first = await send(pool, "GET", "/one")
    waiter = asyncio.create_task(pool.send("GET", "/gone", [], None))
    done, _ = await asyncio.wait({waiter}, timeout=0.1)
    assert not done  # queued for the slot
    if when == "while-waiting":
        waiter.cancel()
        await read_body(first)
        first.release()
    else:
        await read_body(first)
        first.release()  # the slot goes to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for i in range(3):  # the slot came back
        _, data = await exchange(pool, "GET", f"/after{i}")
        assert data == b"%d" % (i + 1)
    assert b"/gone" not in origin.peers[0].received


# --- connecting, cut bodies -------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port with a socket bound to it but not listening: connections are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_a_refused_connection_is_connect_failed(make_pool: MakePool, closed_port: int) -> None:
    pool = make_pool(url=f"http://127.0.0.1:{closed_port}", limit=1)
    for _ in range(2):  # the slot comes back after a failure
        with pytest.raises(ConnectFailed):
            await send(pool)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_response_cut_mid_body_is_disconnected(origin: Origin, make_pool: MakePool, how: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"0123456789")
        peer.close() if how == "close" else peer.reset()

    origin.scripts = [script]
    pool = make_pool()
    response = await send(pool)
    assert response.body is not None
    got = bytearray()
    with pytest.raises(Disconnected) as cut:
        while chunk := await asyncio.wait_for(response.body.read_chunk(), WAIT):
            got += chunk
    assert bytes(got) == b"0123456789"
    assert cut.value.reset is (how == "reset")
    assert not response.body.complete
    response.close()


async def test_read_all_of_a_cut_body_raises_disconnected(origin: Origin, make_pool: MakePool) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"0123456789")
        peer.close()

    origin.scripts = [script]
    response = await send(make_pool())
    assert response.body is not None
    with pytest.raises(Disconnected):
        await asyncio.wait_for(response.body.read_all(), WAIT)
    response.close()
