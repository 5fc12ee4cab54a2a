"""`proxy.wire.tls` through the pool: what only TLS has (the handshake, close_notify, a
truncated end, bytes that are not TLS). Every other behaviour of the pool is run over TLS too,
by tests/test_wire_pool.py's `tls` variant.

`BioOrigin` runs the origin's TLS by hand, on `ssl.MemoryBIO` over a plain asyncio server, so
a test sees what TLS itself says (a close_notify, or none) and can put raw bytes on the wire.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from proxy.wire import Pool
from proxy.wire.errors import ConnectFailed, ConnectTimeout, Disconnected
from proxy.wire.origin import OriginConnection
from proxy.wire.tls import TLSLayer
from tests.test_wire_pool import MiB, WAIT, Origin, Peer, chunks, ok, read_body, send

_CA = trustme.CA()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    _CA.configure_trust(ctx)
    return ctx


def server_context(*names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _CA.issue_cert(*(names or ("127.0.0.1",))).configure_cert(ctx)
    return ctx


class Tls:
    """The origin's side of one connection, TLS done by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def flush(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())

    async def _more(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                if not await self._more():
                    raise EOFError("the client left during the handshake") from None
        self.flush()

    async def read(self) -> bytes | None:
        """Decrypted bytes; b"" once the client said close_notify; None at an end without it."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self.flush()
                if not await self._more():
                    return None

    async def read_head(self) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            more = await self.read()
            if not more:
                raise EOFError("no request head")
            data += more
        return data

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.flush()


class BioOrigin:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.script: Callable[[Tls], Awaitable[None]] | None = None
        self.finished = asyncio.Event()
        self.outcome: str | None = None  # what the script saw, for the test to look at
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Tls(reader, writer, self.ctx)
        try:
            await conn.handshake()
            if self.script is not None:
                await self.script(conn)
        except (EOFError, ConnectionError, ssl.SSLError) as exc:
            self.outcome = self.outcome or type(exc).__name__
        finally:
            writer.close()
            self.finished.set()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def bio_origin() -> AsyncIterator[BioOrigin]:
    origin = BioOrigin(server_context())
    await origin.start()
    yield origin
    await origin.stop()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(url: str, *, connect_timeout: float = WAIT, tls: ssl.SSLContext | None = None) -> Pool:
        pool = Pool(url, tls=tls or client_context(), limit=4, connect_timeout=connect_timeout, read_timeout=WAIT)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


async def test_the_pool_says_close_notify_when_it_closes(bio_origin: BioOrigin, pools: Callable[..., Pool]) -> None:
    async def script(conn: Tls) -> None:
        await conn.read_head()
        conn.send(ok(b"hi"))
        end = await conn.read()
        bio_origin.outcome = "close_notify" if end == b"" else "no close_notify"

    bio_origin.script = script
    pool = pools(f"https://127.0.0.1:{bio_origin.port}")
    response = await send(pool)
    assert await read_body(response) == b"hi"
    response.release()
    await pool.close()  # the idle connection goes, properly
    await asyncio.wait_for(bio_origin.finished.wait(), WAIT)
    assert bio_origin.outcome == "close_notify"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_close_delimited_body_is_whole_only_when_tls_ended_properly(
        pools: Callable[..., Pool], tls: bool) -> None:
    # A body with neither length nor chunks ends when the connection does; over TLS, an end
    # without close_notify may be an attacker's cut (RFC 9112 §9.8): never a whole body.
    origin = Origin(tls=tls)

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send_drained(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe first part")
        peer.truncate()  # FIN, no close_notify before it
        await peer.read_to_end()

    origin.scripts = [script]
    await origin.start()
    try:
        pool = pools(origin.url(), tls=origin.client_tls or None)
        response = await send(pool)
        assert response.body is not None
        got = bytearray()
        if tls:
            with pytest.raises(Disconnected):
                while chunk := await asyncio.wait_for(response.body.read_chunk(), WAIT):
                    got += chunk
            assert not response.body.complete
            response.close()
        else:
            got += await read_body(response)
            assert response.body.complete
            response.release()
        assert bytes(got) == b"the first part"
    finally:
        await origin.stop()


async def test_a_handshake_the_origin_never_answers_is_a_connect_timeout(pools: Callable[..., Pool]) -> None:
    gone = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # the ClientHello, and nothing back
            pass
        gone.set()  # the pool closed its socket after giving up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        pool = pools(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", connect_timeout=0.3)
        with pytest.raises(ConnectTimeout):
            await send(pool)
        await asyncio.wait_for(gone.wait(), WAIT)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_certificate_for_another_name_is_connect_failed(pools: Callable[..., Pool]) -> None:
    origin = BioOrigin(server_context("api.example"))
    await origin.start()
    try:
        pool = pools(f"https://127.0.0.1:{origin.port}")
        with pytest.raises(ConnectFailed, match="certificate"):
            await send(pool)
        await asyncio.wait_for(origin.finished.wait(), WAIT)  # the socket was closed, not left open
    finally:
        await origin.stop()


async def test_a_plain_http_origin_on_an_https_url_is_connect_failed(pools: Callable[..., Pool]) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    try:
        pool = pools(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        with pytest.raises(ConnectFailed):
            await send(pool)
    finally:
        server.close()
        await server.wait_closed()


async def test_bytes_that_are_not_tls_after_the_handshake_fail_the_exchange(
        bio_origin: BioOrigin, pools: Callable[..., Pool]) -> None:
    async def script(conn: Tls) -> None:
        await conn.read_head()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")  # in the clear
        await conn.read()

    bio_origin.script = script
    pool = pools(f"https://127.0.0.1:{bio_origin.port}")
    with pytest.raises(Disconnected):
        await send(pool)
    await asyncio.wait_for(bio_origin.finished.wait(), WAIT)


async def test_a_large_upload_and_answer_cross_whole(bio_origin: BioOrigin, pools: Callable[..., Pool]) -> None:
    upload = bytes(i % 253 for i in range(5 * MiB))
    answer = bytes(i % 241 for i in range(7 * MiB))

    async def script(conn: Tls) -> None:
        data = await conn.read_head()
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"content-length: %d" % len(upload) in head.lower()
        body = bytearray(body)
        while len(body) < len(upload):
            more = await conn.read()
            assert more, "the upload ended early"
            body += more
        conn.send(ok(b"same" if bytes(body) == upload else b"different"))
        assert await conn.read_head()  # the next request, on the same connection
        conn.send(ok(answer))
        await conn.read()

    bio_origin.script = script
    pool = pools(f"https://127.0.0.1:{bio_origin.port}")
    pieces = [upload[i:i + 65536] for i in range(0, len(upload), 65536)]
    response = await send(pool, "PUT", "/up", body=chunks(*pieces), length=len(upload))
    assert await read_body(response) == b"same"
    response.release()
    response = await send(pool, "GET", "/down")
    assert await read_body(response) == answer
    response.release()


async def test_a_bug_in_the_protocols_connection_made_is_heard_at_once(
        bio_origin: BioOrigin, pools: Callable[..., Pool], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: OriginConnection, transport: asyncio.BaseTransport) -> None:
        raise RuntimeError("a bug in connection_made")

    monkeypatch.setattr(OriginConnection, "connection_made", broken)
    pool = pools(f"https://127.0.0.1:{bio_origin.port}", connect_timeout=WAIT)
    # the bug itself, at once: not a ConnectTimeout WAIT seconds later
    with pytest.raises(RuntimeError, match="a bug in connection_made"):
        await asyncio.wait_for(pool.send("GET", "/", [], None), WAIT / 2)
    await asyncio.wait_for(bio_origin.finished.wait(), WAIT)  # and the socket went


async def test_a_handshake_nobody_waits_for_any_more_is_no_error() -> None:
    # the pool gave up (its connect timeout) as the socket went: nobody hears `ready` fail,
    # and the loop must not report "Future exception was never retrieved"
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        layer = TLSLayer(loop, asyncio.Protocol(), client_context(), "127.0.0.1")
        layer.connection_lost(None)  # before any handshake
        assert isinstance(layer.ready.exception(), ConnectionResetError)
        layer = TLSLayer(loop, asyncio.Protocol(), client_context(), "127.0.0.1")
        layer.connection_lost(None)
        del layer  # this one never looked at
        gc.collect()
        await asyncio.sleep(0)
        assert reported == []
    finally:
        loop.set_exception_handler(previous)
