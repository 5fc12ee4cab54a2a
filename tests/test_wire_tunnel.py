"""`proxy.wire.Pool` through an egress proxy (`via`), against a scripted forward proxy on
loopback: a CONNECT tunnel to a TLS origin for https, absolute-form requests for http, and
every way a proxy can refuse or misbehave. (tests/test_egress_e2e.py runs a real squid.)

The origin's name, api.ndovu.test, resolves nowhere: the pool only ever hands it to the proxy,
which connects to the loopback origin whatever name it is given.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import trustme

from proxy.egress import ProxyURL
from proxy.wire import Pool, Response
from proxy.wire.errors import ConnectFailed, ConnectTimeout
from proxy.wire.tunnel import MAX_TUNNEL_ANSWER, answer_status, connect_request

NAME = "api.ndovu.test"
PASSWORD = "tunnel-pa55word"
CREDENTIALS = b"Basic " + base64.b64encode(f"alice:{PASSWORD}".encode())
WAIT = 5.0
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

Script = Callable[["FakeProxy", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def read_to_end(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass


class Server:
    """An asyncio server on 127.0.0.1 running `handle` for each connection; stop() ends them all."""

    def __init__(self, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._handle = handle
        self._ssl = ssl_context
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            await self._handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


class FakeProxy(Server):
    """A forward proxy whose every connection runs `script`; `heads` holds every request head
    it read, in order."""

    def __init__(self, script: Script) -> None:
        super().__init__(lambda r, w: script(self, r, w))
        self.heads: list[bytes] = []

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await read_head(reader)
        self.heads.append(head)
        return head


class TLSOrigin(Server):
    """An https origin: answers each request 200 with its request line as the body, and
    records every head."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(self._serve, context)
        self.heads: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            self.heads.append(head)
            line = head.split(b"\r\n", 1)[0]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))
            await writer.drain()


def tunnel_to(origin: Server, answer: bytes = ESTABLISHED) -> Script:
    """CONNECT, whatever the name, reaches the loopback origin; the bytes are piped both ways."""

    async def script(proxy: FakeProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await proxy.head(reader)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", origin.port)
        writer.write(answer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.transport.abort()

    return script


def answers(data: bytes, *, hang_up: bool = False) -> Script:
    """Read the request, send `data`, then wait for the pool to close (or `hang_up`)."""

    async def script(proxy: FakeProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await proxy.head(reader)
        writer.write(data)
        await writer.drain()
        if hang_up:
            writer.close()
        else:
            await read_to_end(reader)

    return script


async def silent(proxy: FakeProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await proxy.head(reader)
    await read_to_end(reader)


async def hangs_up(proxy: FakeProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await proxy.head(reader)
    writer.close()


def as_origin(status: bytes = b"200 OK") -> Script:
    """An http forward proxy seen from the pool: answers each request itself, keep-alive."""

    async def script(proxy: FakeProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await proxy.head(reader)
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok" % status)
            await writer.drain()

    return script


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def origin(ca: trustme.CA) -> AsyncIterator[TLSOrigin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(context)
    server = TLSOrigin(context)
    await server.start()
    yield server
    await server.stop()


MakeProxy = Callable[[Script], Awaitable[FakeProxy]]


@pytest.fixture
async def fake_proxy() -> AsyncIterator[MakeProxy]:
    made: list[FakeProxy] = []

    async def make(script: Script) -> FakeProxy:
        proxy = FakeProxy(script)
        await proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.stop()


MakePool = Callable[..., Pool]


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    made: list[Pool] = []

    def make(url: str, via: ProxyURL | None, *, tls: ssl.SSLContext | bool = False, limit: int = 4,
             connect_timeout: float = WAIT) -> Pool:
        pool = Pool(url, tls=tls, limit=limit, connect_timeout=connect_timeout, read_timeout=WAIT, via=via)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


def via(proxy: Server, authorization: bytes | None = None) -> ProxyURL:
    return ProxyURL("127.0.0.1", proxy.port, authorization)


async def get(pool: Pool, target: str = "/x", headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[Response, bytes]:
    response = await asyncio.wait_for(pool.send("GET", target, list(headers), None), WAIT)
    try:
        assert response.body is not None
        body = await asyncio.wait_for(response.body.read_all(), WAIT)
    except BaseException:
        response.close()
        raise
    response.release()
    return response, body


async def fails(pool: Pool, kind: type[Exception] = ConnectFailed) -> str:
    with pytest.raises(kind) as caught:
        await asyncio.wait_for(pool.send("GET", "/x", [], None), WAIT)
    text = str(caught.value)
    assert PASSWORD not in text and CREDENTIALS.decode() not in text and "alice" not in text
    return text


# --- the pieces ---------------------------------------------------------------------------


def test_the_connect_request_names_the_authority_as_target_and_host() -> None:
    assert connect_request(NAME, 443, None) == b"CONNECT api.ndovu.test:443 HTTP/1.1\r\nHost: api.ndovu.test:443\r\n\r\n"
    assert connect_request("fd00::1", 8443, CREDENTIALS) == (
        b"CONNECT [fd00::1]:8443 HTTP/1.1\r\nHost: [fd00::1]:8443\r\nProxy-Authorization: " + CREDENTIALS
        + b"\r\n\r\n")


@pytest.mark.parametrize(("head", "status"), [
    (b"HTTP/1.1 200 Connection established\r\n\r\n", (200, "Connection established")),
    (b"HTTP/1.0 200\r\n\r\n", (200, "")),
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
     (407, "Proxy Authentication Required")),
    (b"HTTP/1.1 403 \x1b[31mred\x00\r\n\r\n", (403, "[31mred")),  # no terminal escapes in a log line
    (b"HTTP/1.1 502 " + b"x" * 200 + b"\r\n\r\n", (502, "x" * 80)),
    (b"HTTP/2 200\r\n\r\n", None),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", None),
    (b"HTTP/1.1 20\r\n\r\n", None),
])
def test_answer_status(head: bytes, status: tuple[int, str] | None) -> None:
    assert answer_status(head) == status


# --- https: a CONNECT tunnel -------------------------------------------------------------------


async def test_https_goes_through_one_tunnel_with_tls_to_the_origins_name(
    origin: TLSOrigin, trusting: ssl.SSLContext, fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(tunnel_to(origin))
    pool = make_pool(f"https://{NAME}:{origin.port}/base", via(proxy), tls=trusting)
    for i in range(3):
        response, body = await get(pool, f"/x?i={i}")
        assert (response.status, body) == (200, f"GET /base/x?i={i} HTTP/1.1".encode())
    # one tunnel, kept alive; the CONNECT names the origin, which only the proxy resolves
    assert proxy.heads == [f"CONNECT {NAME}:{origin.port} HTTP/1.1\r\nHost: {NAME}:{origin.port}\r\n\r\n".encode()]
    assert proxy.connections == 1 and origin.connections == 1
    # inside the tunnel the origin gets origin-form requests, with its own Host
    assert all(head.startswith(b"GET /base/x?i=") for head in origin.heads)
    assert all(f"\r\nHost: {NAME}:{origin.port}\r\n".encode() in head for head in origin.heads)


async def test_proxy_credentials_go_on_the_connect_only(
    origin: TLSOrigin, trusting: ssl.SSLContext, fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(tunnel_to(origin))
    pool = make_pool(f"https://{NAME}:{origin.port}", via(proxy, CREDENTIALS), tls=trusting)
    response, _ = await get(pool)
    assert response.status == 200
    assert b"\r\nProxy-Authorization: " + CREDENTIALS + b"\r\n" in proxy.heads[0]
    assert all(b"proxy-authorization" not in head.lower() for head in origin.heads)  # never to the origin


async def test_the_origins_certificate_is_checked_against_its_name_not_the_proxys(
    origin: TLSOrigin, trusting: ssl.SSLContext, fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(tunnel_to(origin))
    pool = make_pool(f"https://other.ndovu.test:{origin.port}", via(proxy), tls=trusting, limit=1)
    text = await fails(pool)
    assert text.startswith(f"cannot connect to other.ndovu.test:{origin.port} through the egress proxy "
                           f"127.0.0.1:{proxy.port}: ")
    assert "certificate" in text.lower()
    await fails(pool)  # the failed attempt gave its slot back


async def test_an_untrusted_origin_fails_and_no_verification_passes(
    origin: TLSOrigin, fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(tunnel_to(origin))
    assert "certificate" in (await fails(make_pool(f"https://{NAME}:{origin.port}", via(proxy), tls=True))).lower()
    response, _ = await get(make_pool(f"https://{NAME}:{origin.port}", via(proxy), tls=False))
    assert response.status == 200


@pytest.mark.parametrize(("answer", "says"), [
    ((b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n"
      b"Content-Length: 5\r\n\r\ndenied"), "refused the tunnel to {to}: 407 Proxy Authentication Required"),
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused the tunnel to {to}: 403 Forbidden"),
    (b"HTTP/1.0 502 Bad Gateway\r\n\r\n", "refused the tunnel to {to}: 502 Bad Gateway"),
    (b"HTTP/1.1 503\r\n\r\n", "refused the tunnel to {to}: 503"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "answered CONNECT {to} with something that is not HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\n\r\nsurprise", "sent bytes past its answer to CONNECT {to}"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Filler: yes\r\n" * (MAX_TUNNEL_ANSWER // 15 + 10),
     "answered CONNECT {to} with a head over 16384 bytes"),
])
async def test_a_tunnel_the_proxy_does_not_open_fails_in_plain_words(
    answer: bytes, says: str, fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(answers(answer))
    pool = make_pool(f"https://{NAME}", via(proxy, CREDENTIALS), limit=1)
    text = await fails(pool)
    assert text == f"the egress proxy 127.0.0.1:{proxy.port} " + says.format(to=f"{NAME}:443")
    await fails(pool)  # the failed attempt gave its slot back
    assert proxy.connections == 2  # and nothing was kept


@pytest.mark.parametrize("script", [hangs_up, answers(b"HTTP/1.1 200 Conn", hang_up=True)], ids=["at once", "mid-answer"])
async def test_a_proxy_that_hangs_up_on_connect(script: Script, fake_proxy: MakeProxy, make_pool: MakePool) -> None:
    proxy = await fake_proxy(script)
    text = await fails(make_pool(f"https://{NAME}", via(proxy)))
    assert text == f"the egress proxy 127.0.0.1:{proxy.port} closed the connection before answering CONNECT {NAME}:443"


async def test_a_silent_proxy_is_a_connect_timeout(fake_proxy: MakeProxy, make_pool: MakePool) -> None:
    proxy = await fake_proxy(silent)
    pool = make_pool(f"https://{NAME}", via(proxy, CREDENTIALS), connect_timeout=0.2)
    text = await fails(pool, ConnectTimeout)
    assert text == f"no connection to {NAME} through the egress proxy 127.0.0.1:{proxy.port} within 0.2 s"


async def test_a_tunnel_to_a_silent_origin_is_a_connect_timeout_too(
    fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    """The whole of connect, CONNECT and the TLS handshake is bounded by connect_timeout."""
    mute = Server(lambda reader, writer: read_to_end(reader))
    await mute.start()
    try:
        proxy = await fake_proxy(tunnel_to(mute))
        pool = make_pool(f"https://{NAME}:{mute.port}", via(proxy), tls=True, connect_timeout=0.3)
        assert "within 0.3 s" in await fails(pool, ConnectTimeout)
    finally:
        await mute.stop()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_dead_proxy_is_named(scheme: str, make_pool: MakePool, fake_proxy: MakeProxy) -> None:
    proxy = await fake_proxy(silent)
    port = proxy.port
    await proxy.stop()  # nothing listens there any more
    text = await fails(make_pool(f"{scheme}://{NAME}", ProxyURL("127.0.0.1", port, CREDENTIALS)))
    assert text == f"cannot connect to the egress proxy 127.0.0.1:{port}: Connection refused"


# --- http: absolute form ----------------------------------------------------------------------


async def test_http_requests_go_to_the_proxy_in_absolute_form_on_one_connection(
    fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(as_origin())
    pool = make_pool(f"http://{NAME}:8081/base", via(proxy, CREDENTIALS))
    for i in range(3):
        response, body = await get(pool, f"/x?i={i}", [(b"Accept", b"*/*")])
        assert (response.status, body) == (200, b"ok")
    assert proxy.connections == 1
    assert [head.split(b"\r\n")[:4] for head in proxy.heads] == [[
        f"GET http://{NAME}:8081/base/x?i={i} HTTP/1.1".encode(), f"Host: {NAME}:8081".encode(),
        b"Proxy-Authorization: " + CREDENTIALS, b"Accept: */*"] for i in range(3)]


async def test_http_on_the_default_port_and_without_credentials(fake_proxy: MakeProxy, make_pool: MakePool) -> None:
    proxy = await fake_proxy(as_origin())
    response, _ = await get(make_pool(f"http://{NAME}", via(proxy)), "/api/v3/partners/x")
    assert response.status == 200
    assert proxy.heads[0] == f"GET http://{NAME}/api/v3/partners/x HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()


async def test_an_http_407_is_the_proxys_refusal_not_the_origins_answer(
    fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    proxy = await fake_proxy(as_origin(b"407 Proxy Authentication Required"))
    pool = make_pool(f"http://{NAME}:8081", via(proxy, CREDENTIALS), limit=1)
    text = await fails(pool)
    assert text == (f"the egress proxy 127.0.0.1:{proxy.port} refused the request to {NAME}:8081: "
                    "407 Proxy Authentication Required")
    await fails(pool)
    assert proxy.connections == 2  # that connection was not kept


async def test_a_407_from_an_origin_reached_directly_is_its_answer(
    fake_proxy: MakeProxy, make_pool: MakePool
) -> None:
    origin = await fake_proxy(as_origin(b"407 Proxy Authentication Required"))
    response, _ = await get(make_pool(f"http://127.0.0.1:{origin.port}", None))
    assert response.status == 407


# --- what the debug log says ------------------------------------------------------------------


async def test_debug_events_say_the_connection_goes_via_the_proxy_without_credentials(
    origin: TLSOrigin, trusting: ssl.SSLContext, fake_proxy: MakeProxy, make_pool: MakePool,
    log_buffer: io.StringIO,
) -> None:
    proxy = await fake_proxy(tunnel_to(origin))
    pool = make_pool(f"https://{NAME}:{origin.port}", via(proxy, CREDENTIALS), tls=trusting)
    await get(pool)
    await pool.close()  # returns once its connections are closed
    text = log_buffer.getvalue()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    opened = [e for e in events if e["event"] == "upstream_connection_opened"]
    closed = [e for e in events if e["event"] == "upstream_connection_closed"]
    assert [(e["peer"], e["via"]) for e in opened + closed] == [(f"127.0.0.1:{proxy.port}", f"http://127.0.0.1:{proxy.port}")] * 2
    assert PASSWORD not in text and CREDENTIALS.decode() not in text and "alice" not in text


async def test_a_direct_connection_logs_no_via(fake_proxy: MakeProxy, make_pool: MakePool, log_buffer: io.StringIO) -> None:
    origin = await fake_proxy(as_origin())
    await get(make_pool(f"http://127.0.0.1:{origin.port}", None))
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines() if line.startswith("{")]
    opened = [e for e in events if e["event"] == "upstream_connection_opened"]
    assert len(opened) == 1 and "via" not in opened[0]
