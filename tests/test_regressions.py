"""Regression tests for defects of the HTTP layer before its rewrite (747179a: proxy/listener.py
and proxy/upstream.py on aiohttp internals). Each test runs the real proxy in front of a real
upstream on loopback (the fake Ndovu API, or a raw asyncio server where the shape of the
upstream's bytes matters) and talks to it over raw sockets.

Each was run against the old code too (every one fails there); they use only
`tests.conftest` and `tests.fakes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.app import Proxy
from tests.conftest import StartProxy
from tests.fakes import FakeNdovu, eventually

API = "/api/v3/partners"
HTTP2_SETTINGS = "AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA"  # what Java's HttpClient sends


# --- helpers ---------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, trailers: list[tuple[str, str]],
                 raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.trailers = trailers
        self.raw = raw

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def _fields(block: bytes) -> list[tuple[str, str]]:
    out = []
    for line in block.decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            out.append((name.strip(), value.strip()))
    return out


class Client:
    """One raw connection to the proxy, reading whole responses (sized, chunked or to EOF).
    Every one still open when a test ends is closed then (so a failed test leaks nothing)."""

    opened: list[Client] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        Client.opened.append(self)

    @classmethod
    async def open(cls, proxy: Proxy) -> Client:
        assert proxy.address is not None
        return cls(*await asyncio.open_connection(proxy.address.host, proxy.address.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> Answer:
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, _, rest = head.partition(b"\r\n")
            status = int(status_line.split(b" ")[1])
            headers = _fields(rest)
            low = {k.lower(): v for k, v in headers}
            raw, body, trailers = head, b"", []
            if low.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size_line = await self.reader.readuntil(b"\r\n")
                    raw += size_line
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        tail = await self.reader.readuntil(b"\r\n")
                        raw += tail
                        while tail != b"\r\n":
                            trailers += _fields(tail)
                            tail = await self.reader.readuntil(b"\r\n")
                            raw += tail
                        break
                    data = await self.reader.readexactly(size + 2)
                    raw += data
                    body += data[:-2]
            elif "content-length" in low:
                body = await self.reader.readexactly(int(low["content-length"]))
                raw += body
            elif status not in (204, 304):
                body = await self.reader.read()
                raw += body
        return Answer(status, headers, body, trailers, raw)

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while Client.opened:
        Client.opened.pop().close()
    await asyncio.sleep(0)  # the transports' connection_lost runs


def get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *extra, "", ""]).encode()


def access_statuses(log_buffer: io.StringIO) -> list[int]:
    out = []
    for line in log_buffer.getvalue().splitlines():
        if '"access"' in line:
            event = json.loads(line)
            if event.get("event") == "access":
                out.append(event["status"])
    return out


def has_header(headers: dict[str, str], name: str) -> bool:
    return any(key.lower() == name.lower() for key in headers)


class RawOrigin:
    """An upstream on a raw asyncio server: `answer(method, target)` gives the exact bytes of
    each response; connections are kept open (keep-alive). Every request is recorded with the
    number of the connection it came on."""

    def __init__(self, answer: Callable[[str, str], bytes]) -> None:
        self._answer = answer
        self.requests: list[tuple[int, str, str, dict[str, str], bytes]] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def start(self) -> RawOrigin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        number = len(self._writers)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers = dict(_fields(rest))
                low = {k.lower(): v for k, v in headers.items()}
                body = await reader.readexactly(int(low.get("content-length", "0")))
                self.requests.append((number, method, target, headers, body))
                writer.write(self._answer(method, target))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


class DeafOrigin:
    """An upstream whose connections are accepted and never read from: plain sockets, so no
    event loop reads them behind the test's back (uvloop ignores a pause_reading() made in
    connection_made)."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.connected = asyncio.Event()
        self._listener = socket.socket()
        self._accepting: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> DeafOrigin:
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._accepting = asyncio.create_task(self._accept())
        return self

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self.sockets.append(conn)
            self.connected.set()

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        for conn in self.sockets:
            conn.close()
        self._listener.close()


@pytest.fixture
async def origins() -> AsyncIterator[list[Any]]:
    """Raw upstreams started by a test, closed after it (after the proxy: requested first)."""
    started: list[Any] = []
    yield started
    for origin in started:
        await origin.close()


def via(origin: RawOrigin | DeafOrigin, fake: FakeNdovu, **cfg: Any) -> dict[str, Any]:
    """A proxy config forwarding to `origin`, with tokens still from the fake Ndovu API."""
    return {"upstream.url": origin.url, "auth.token_path": f"{fake.url}{API}/auth", **cfg}  # type: ignore[attr-defined]


async def in_flight_metric(proxy: Proxy) -> float:
    """`ndovu_proxy_in_flight_requests` as /metrics on the admin listener shows it."""
    assert proxy.admin_address is not None
    reader, writer = await asyncio.open_connection(proxy.admin_address.host, proxy.admin_address.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
        await writer.wait_closed()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith("ndovu_proxy_in_flight_requests ")]
    assert len(values) == 1, text
    return float(values[0])


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int, int] | None:
    """(state, tx_queue, rx_queue) of the loopback TCP socket local_port -> remote_port."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
                tx, rx = queues.split(":")
                return int(state, 16), int(tx, 16), int(rx, 16)
    return None


def unread(local_port: int, remote_port: int) -> int:
    queues = tcp_queues(local_port, remote_port)
    return queues[2] if queues else 0


# --- 2. Upgrade: a body is a body, whatever Upgrade says ------------------------------------------


async def test_an_upgrade_requests_neighbour_body_is_a_body_and_java_h2c_upgrade_posts_still_work(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    proxy = await start_proxy()
    # 1. an h2c upgrade GET, then a POST whose body (a second write) looks like a request
    smuggled = b"DELETE /api/v3/partners/orders/42 HTTP/1.1\r\nHost: x\r\n\r\n"
    body = smuggled.ljust(55, b" ")
    assert len(body) == 55
    client = await Client.open(proxy)
    await client.send(
        f"GET {API}/a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".encode()
        + f"POST {API}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 55\r\n\r\n".encode()
    )
    first = await client.response()
    assert first.status == 200 and first.json()["method"] == "GET"
    await client.send(body)  # the POST's body, in a second write
    second = await client.response()
    assert second.status == 200
    assert second.json()["method"] == "POST" and second.json()["body_length"] == 55
    # a request after both: had the body been taken for a request, its answer would come first
    await client.send(get(f"{API}/probe"))
    third = await client.response()
    assert third.status == 200 and third.json()["path"] == f"{API}/probe"
    client.close()
    assert [(r.method, r.path_qs) for r in fake.api_log] == [
        ("GET", f"{API}/a"), ("POST", f"{API}/upload"), ("GET", f"{API}/probe")]
    assert fake.api_log[1].body == body

    # 2. Java's HttpClient: every HTTP/1.1 request offers h2c, a POST with its body included;
    # the body goes upstream whole, the offer does not, and the connection serves the next one
    payload = json.dumps({"order": 42, "items": ["a" * 300, "b" * 300]}).encode()
    java = await Client.open(proxy)
    await java.send(
        f"POST {API}/orders HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nContent-Length: {len(payload)}\r\n"
        f"Host: x\r\nHTTP2-Settings: {HTTP2_SETTINGS}\r\nUpgrade: h2c\r\nUser-Agent: Java-http-client/17\r\n"
        f"Content-Type: application/json\r\n\r\n".encode() + payload
    )
    answer = await java.response()
    assert answer.status == 200  # not 101: no upgrade
    assert answer.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()
    await java.send(get(f"{API}/next"))
    after = await java.response()
    assert after.status == 200 and after.json()["path"] == f"{API}/next"
    java.close()
    assert [(r.method, r.path_qs) for r in fake.api_log[3:]] == [("POST", f"{API}/orders"), ("GET", f"{API}/next")]
    post = fake.api_log[3]
    assert post.body == payload
    for name in ("Upgrade", "HTTP2-Settings"):
        assert not has_header(post.headers, name)
    assert all(r.method != "DELETE" for r in fake.api_log)


# --- 3. response trailers never become headers ------------------------------------------------------


async def test_response_trailers_do_not_leak_into_the_next_response_on_the_pooled_connection(
    origins: list[Any], start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    def answer(_method: str, target: str) -> bytes:
        if target.endswith("/with-trailer"):
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\nSet-Cookie: session=abc\r\n\r\n")
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nnext"

    origin = await RawOrigin(answer).start()
    origins.append(origin)
    proxy = await start_proxy(via(origin, fake))
    first_client = await Client.open(proxy)
    await first_client.send(get(f"{API}/with-trailer"))
    first = await first_client.response()
    first_client.close()
    second_client = await Client.open(proxy)  # a different app connection
    await second_client.send(get(f"{API}/plain"))
    second = await second_client.response()
    second_client.close()
    assert first.status == 200 and first.body == b"hello"
    assert second.status == 200 and second.body == b"next"
    assert [n for n, *_ in origin.requests] == [1, 1], "the second request must reuse the pooled connection"
    for got in (first, second):
        assert got.header("Set-Cookie") is None
        assert all(k.lower() != "set-cookie" for k, _ in got.trailers)
        assert b"session=abc" not in got.raw


# --- 4. request trailers never become headers ------------------------------------------------------


async def test_request_trailers_do_not_reach_the_upstream_nor_the_next_request(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(
        f"POST {API}/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"5\r\nhello\r\n0\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    )
    first = await client.response()
    await client.send(get(f"{API}/after"))
    second = await client.response()
    client.close()
    assert first.status == 200 and first.json()["body_length"] == 5
    assert second.status == 200 and second.json()["path"] == f"{API}/after"
    assert [(r.method, r.path_qs) for r in fake.api_log] == [("POST", f"{API}/chunked"), ("GET", f"{API}/after")]
    assert fake.api_log[0].body == b"hello"
    for rec in fake.api_log:
        assert not has_header(rec.headers, "X-Forwarded-For")
        assert "10.0.0.1" not in json.dumps(rec.headers)


# --- 5. TRACE and TRACK are refused -------------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
async def test_trace_and_track_are_refused_and_never_echo_the_token(
    start_proxy: StartProxy, fake: FakeNdovu, method: str
) -> None:
    echoed: list[str] = []

    async def echo(request: web.Request) -> web.StreamResponse:  # an upstream that echoes the request
        text = f"{request.method} {request.raw_path}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        echoed.append(text)
        return web.Response(text=text, content_type="message/http")

    fake.api_faults["echo"] = echo
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(f"{method} {API}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = await client.response()
    client.close()
    assert answer.status == 405
    assert answer.header("X-Ndovu-Proxy-Error") == "method_not_allowed"
    assert answer.json()["error"] == "method_not_allowed"
    allow = answer.header("Allow")
    assert allow is not None and "GET" in allow and method not in allow
    assert echoed == [] and fake.api_log == []
    for token in fake.issued:
        assert token.encode() not in answer.raw


# --- 6. `;` path parameters cannot climb out of the allowed paths -----------------------------------


async def test_dot_dot_with_path_parameters_cannot_leave_the_allowed_paths(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    proxy = await start_proxy()
    # Tomcat, Jetty and Spring drop `;params` before resolving dot segments: /a/..;/b is /b there
    for path in (f"{API}/..;/..;/admin", f"{API}/..%3B/..%3B/admin", f"{API}/..%3b/..;/admin"):
        client = await Client.open(proxy)
        await client.send(get(path))
        answer = await client.response()
        client.close()
        assert answer.status == 403, path
        assert answer.header("X-Ndovu-Proxy-Error") == "path_not_allowed"
        assert answer.json()["error"] == "path_not_allowed"
    assert fake.api_log == []
    # a parameter that climbs nowhere still passes, forwarded as is
    client = await Client.open(proxy)
    await client.send(get(f"{API}/x;v=1/y"))
    answer = await client.response()
    client.close()
    assert answer.status == 200
    assert [r.raw_path for r in fake.api_log] == [f"{API}/x;v=1/y"]


# --- 7. the size of a head, trailers included ---------------------------------------------------------


async def _refused_431(client: Client, data: bytes) -> Answer:
    """Send `data` (maybe more than the proxy will read) while reading the answer."""

    async def push() -> None:
        client.writer.write(data)
        await client.writer.drain()

    sending = asyncio.create_task(push())
    try:
        answer = await client.response(timeout=10)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        client.close()
    return answer


def assert_431(answer: Answer) -> None:
    assert answer.status == 431
    assert answer.header("X-Ndovu-Proxy-Error") == "headers_too_large"
    assert answer.json()["error"] == "headers_too_large"


async def test_a_hundred_headers_of_8000_bytes_get_431(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    headers = "".join(f"X-Big-{i}: {'v' * 8000}\r\n" for i in range(100))
    answer = await _refused_431(await Client.open(proxy), f"GET {API}/big HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert_431(answer)
    assert fake.api_log == []


async def test_max_header_bytes_is_the_head_limit(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy({"limits.max_header_bytes": 4096})
    answer = await _refused_431(await Client.open(proxy), get(f"{API}/over", f"X-Big: {'v' * 5000}"))
    assert_431(answer)
    client = await Client.open(proxy)
    await client.send(get(f"{API}/under", f"X-Big: {'w' * 3000}"))
    fine = await client.response()
    client.close()
    assert fine.status == 200
    assert [r.path_qs for r in fake.api_log] == [f"{API}/under"]
    assert len(fake.api_log[0].headers["X-Big"]) == 3000


async def test_trailers_count_against_max_header_bytes(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy({"limits.max_header_bytes": 4096})
    answer = await _refused_431(
        await Client.open(proxy),
        f"POST {API}/trailed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"5\r\nhello\r\n0\r\nX-Big-Trailer: " + b"t" * 5000 + b"\r\n\r\n",
    )
    assert_431(answer)
    assert fake.api_log == []


# --- 8. stalls: an upstream that takes no body, an app that leaves or trickles ------------------------


async def test_an_upload_to_an_upstream_that_never_reads_gets_504_in_time(
    origins: list[Any], start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    origin = await DeafOrigin().start()
    origins.append(origin)
    proxy = await start_proxy(via(origin, fake, **{"upstream.read_timeout": 1}))
    size = 50 * 2**20  # over replay_buffer_bytes: streamed
    assert size > proxy.settings.forwarding.replay_buffer_bytes
    client = await Client.open(proxy)
    await client.send(f"POST {API}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
    piece = b"u" * 2**20

    async def upload() -> None:
        for _ in range(size // len(piece)):
            client.writer.write(piece)
            await client.writer.drain()

    sending = asyncio.create_task(upload())
    started = time.monotonic()
    try:
        answer = await client.response(timeout=10)
        took = time.monotonic() - started
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        client.close()
    assert origin.connected.is_set()
    assert answer.status == 504
    assert answer.header("X-Ndovu-Proxy-Error") == "upstream_timeout"
    assert answer.json()["error"] == "upstream_timeout"
    assert took < 6, f"504 after {took:.1f} s"
    assert await eventually(lambda: proxy.stats.in_flight == 0), f"in_flight stays {proxy.stats.in_flight}"
    assert await in_flight_metric(proxy) == 0


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="watches socket queues in /proc/net/tcp (Linux)")
@pytest.mark.parametrize("leave", ["half-close", "close"])
async def test_an_app_that_leaves_while_its_upload_is_paused_ends_the_request(
    origins: list[Any], start_proxy: StartProxy, fake: FakeNdovu, log_buffer: io.StringIO, leave: str
) -> None:
    """The app sends a whole (chunked) body the upstream does not take, then sends its FIN,
    which arrives while the proxy has stopped reading from it."""
    origin = await DeafOrigin().start()
    origins.append(origin)
    # a long read_timeout: only the app's leaving can end this request within the test
    proxy = await start_proxy(via(origin, fake, **{"upstream.read_timeout": 60}))
    assert proxy.address is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (proxy.address.host, proxy.address.port))
        mine, theirs = sock.getsockname()[1], proxy.address.port
        await loop.sock_sendall(sock, f"POST {API}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"%x\r\n%s\r\n" % (2**16, b"p" * 2**16)
        sent, paused = 0, False
        while not paused and sent < 400 * 2**20:
            await loop.sock_sendall(sock, piece)
            sent += len(piece)
            # everything sent reached the proxy's host (acknowledged): nothing stuck on our side
            assert await eventually(lambda: (tcp_queues(mine, theirs) or (0, 1, 0))[1] == 0, timeout=5, step=0.002), \
                "the proxy's receive window filled up before its reading paused"
            # the proxy leaves bytes unread, and keeps leaving them: its reading is paused
            seen = [unread(theirs, mine)]
            while seen[0] > 0 and len(seen) < 4 and len(set(seen)) == 1:
                await asyncio.sleep(0.005)
                seen.append(unread(theirs, mine))
            paused = seen[0] > 0 and len(seen) == 4 and len(set(seen)) == 1
        assert paused, "the proxy never stopped reading"
        await loop.sock_sendall(sock, b"0\r\n\r\n")  # the body is whole
        assert await eventually(lambda: (tcp_queues(mine, theirs) or (0, 1, 0))[1] == 0, timeout=5, step=0.002)
        assert proxy.stats.in_flight == 1
        left = time.monotonic()
        if leave == "half-close":
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.close()
        assert await eventually(lambda: proxy.stats.in_flight == 0), f"in_flight stays {proxy.stats.in_flight}"
        assert await eventually(lambda: access_statuses(log_buffer) == [499], timeout=5), access_statuses(log_buffer)
        assert await in_flight_metric(proxy) == 0
        took = time.monotonic() - left
        assert took < 5, f"the request ended {took:.1f} s after the app left"
    finally:
        sock.close()


async def test_a_request_body_that_stops_coming_gets_408(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy({"upstream.read_timeout": 1})
    client = await Client.open(proxy)
    await client.send(f"POST {API}/trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b"0123456789")
    started = time.monotonic()
    try:
        answer = await client.response(timeout=10)
    finally:
        client.close()
    took = time.monotonic() - started
    assert answer.status == 408
    assert answer.header("X-Ndovu-Proxy-Error") == "request_timeout"
    assert answer.json()["error"] == "request_timeout"
    assert 0.5 <= took < 5, f"408 after {took:.1f} s"
    assert fake.api_log == []
    assert await eventually(lambda: proxy.stats.in_flight == 0)


# --- 9. raw UTF-8 in the query ----------------------------------------------------------------------


async def test_raw_utf8_in_the_query_is_forwarded_percent_encoded(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(b"GET /api/v3/partners/x?q=na\xc3\xafve HTTP/1.1\r\nHost: x\r\n\r\n")  # as curl sends it
    answer = await client.response()
    client.close()
    assert answer.status == 200
    assert answer.json()["query"] == "q=na%C3%AFve"
    assert [r.raw_path for r in fake.api_log] == [f"{API}/x?q=na%C3%AFve"]

