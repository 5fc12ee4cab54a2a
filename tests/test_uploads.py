"""Uploads that go wrong while they stream: end to end through the real proxy, in front of a raw
asyncio upstream on loopback whose every byte the test scripts, with tokens from the fake Ndovu
API. The app is a raw socket too, so that it can break its chunks or stall.

- The app's body breaks (a malformed chunk) or stops coming after the upstream's answer has
  started: the app's connection is cut, and this is the app's failure, not a proxy bug
  (no `request_failed`, no 500 in the access log or the counters).
- The same before any answer: the proxy's own 400 `bad_request` or 408 `request_timeout`, then
  the connection closes.
- An upstream that answers (413) a big upload at once and reads no more of it: the app gets
  the answer, nothing keeps copying the upload, the proxy serves on.
- A pooled connection the upstream closes cleanly after reading a request: a GET is sent again,
  a POST never is (502).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.app import Proxy
from tests import fakes
from tests.conftest import StartProxy, url
from tests.fakes import FakeNdovu

API = "/api/v3/partners"
REPLAY_BUFFER = 1024  # forwarding.replay_buffer_bytes here: a bigger body streams
FIRST_PIECE = 4096  # the app's first chunk, over REPLAY_BUFFER
WAIT = 5.0  # real seconds any one thing may take before the test fails


# --- a scripted upstream ----------------------------------------------------------------------


class OriginConn:
    """One connection to the upstream, as its script sees it."""

    def __init__(self, origin: Origin, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin, self.number = origin, number
        self.reader, self.writer = reader, writer
        self.body = bytearray()  # what came after the head, for read_to_end()
        self.body_in = asyncio.Event()  # a first byte of it came
        self.ended = asyncio.Event()  # the proxy closed or cut this connection

    async def head(self) -> tuple[str, str, dict[str, str]]:
        """The next request's method, target and headers (names lower case); recorded."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        line, _, rest = head.decode("latin-1").partition("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = {}
        for field in rest.split("\r\n"):
            if field:
                name, _, value = field.partition(":")
                headers[name.strip().lower()] = value.strip()
        self.origin.requests.append((self.number, method, target))
        self.origin.head_in.set()
        return method, target, headers

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_to_end(self) -> None:
        """Take whatever comes, until the proxy closes or cuts the connection."""
        try:
            while data := await self.reader.read(65536):
                self.body += data
                self.body_in.set()
        except ConnectionError:
            pass
        self.ended.set()


Script = Callable[[OriginConn], Awaitable[None]]


class Origin:
    """An upstream on a raw asyncio server: `script(conn)` plays each connection. Every request
    head is recorded as (connection number, method, target)."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self.requests: list[tuple[int, str, str]] = []
        self.conns: list[OriginConn] = []
        self.head_in = asyncio.Event()
        self.stop = asyncio.Event()  # set at teardown: scripts that wait on it return
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.url = ""

    async def start(self) -> Origin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.append(task)
        conn = OriginConn(self, len(self.conns) + 1, reader, writer)
        self.conns.append(conn)
        try:
            await self._script(conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            conn.ended.set()
            writer.transport.abort()

    async def close(self) -> None:
        self.stop.set()
        for conn in self.conns:
            conn.writer.transport.abort()
        if self._server is not None:
            self._server.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)


@pytest.fixture
async def origins() -> AsyncIterator[list[Origin]]:
    """Upstreams started by a test, closed after it (after the proxy: requested first)."""
    started: list[Origin] = []
    yield started
    for origin in started:
        await origin.close()


async def start_origin(origins: list[Origin], script: Script) -> Origin:
    origin = await Origin(script).start()
    origins.append(origin)
    return origin


def via(origin: Origin, fake: FakeNdovu, **cfg: Any) -> dict[str, Any]:
    """A proxy config forwarding to `origin`, with tokens still from the fake Ndovu API."""
    return {"upstream.url": origin.url, "auth.token_path": f"{fake.url}{API}/auth", **cfg}  # type: ignore[attr-defined]


# --- the app's side ---------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


UPLOAD_HEAD = f"POST {API}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
BROKEN_CHUNK = b"zz\r\n"


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert proxy.address is not None
    return await asyncio.open_connection(proxy.address.host, proxy.address.port)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    line, _, rest = head.decode("latin-1").partition("\r\n")
    headers = {}
    for field in rest.split("\r\n"):
        if field:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(line.split(" ")[1]), headers


async def read_sized(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers = await read_head(reader)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
    return status, headers, body


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything until the proxy closes or cuts the connection (which must happen in time)."""
    data = b""
    try:
        async with asyncio.timeout(WAIT):
            while more := await reader.read(65536):
                data += more
    except ConnectionError:
        pass
    return data


# --- the log and the counters -----------------------------------------------------------------


def events(log_buffer: io.StringIO, name: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in log_buffer.getvalue().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and (name is None or event.get("event") == name):
            out.append(event)
    return out


async def access_event(log_buffer: io.StringIO) -> dict[str, Any]:
    """The one access event of the test (info lines are flushed in batches, a moment late)."""
    assert await fakes.eventually(lambda: bool(events(log_buffer, "access"))), "no access event"
    [event] = events(log_buffer, "access")
    return event


async def assert_not_a_proxy_failure(proxy: Proxy, log_buffer: io.StringIO) -> dict[str, Any]:
    """The request ended (its access event is out), and nothing counts it as the proxy's bug."""
    access = await access_event(log_buffer)
    assert access["status"] != 500, access
    assert events(log_buffer, "request_failed") == []
    assert not [key for key in proxy.stats.requests if key[1] == "5xx"], proxy.stats.requests
    assert await fakes.eventually(lambda: proxy.stats.in_flight == 0), f"in_flight stays {proxy.stats.in_flight}"
    return access


def body_was_whole(conn: OriginConn) -> bool:
    """The upstream got a chunked body to its end (the last chunk), not a cut one."""
    return bytes(conn.body).endswith(b"0\r\n\r\n")


# --- a. the answer had started: the app's broken or stalled upload cuts its connection -------------


async def answers_at_once(conn: OriginConn) -> None:
    """A chunked 200 and its first chunk as soon as the head is in; then takes whatever comes."""
    await conn.head()
    await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"first"))
    await conn.read_to_end()


@pytest.mark.parametrize("fault", ["broken_chunk", "stall"])
async def test_an_upload_that_fails_after_the_answer_started_cuts_the_connection(
    origins: list[Origin], start_proxy: StartProxy, fake: FakeNdovu, log_buffer: io.StringIO, fault: str
) -> None:
    origin = await start_origin(origins, answers_at_once)
    cfg = {"forwarding.replay_buffer_bytes": REPLAY_BUFFER, "upstream.read_timeout": 1 if fault == "stall" else 60}
    proxy = await start_proxy(via(origin, fake, **cfg))
    reader, writer = await connect(proxy)
    try:
        writer.write(UPLOAD_HEAD + chunk(b"u" * FIRST_PIECE))  # over the replay buffer: it streams
        status, headers = await read_head(reader)
        assert status == 200
        assert "x-ndovu-proxy-error" not in headers
        assert await asyncio.wait_for(reader.readuntil(b"first\r\n"), WAIT) == chunk(b"first")
        [conn] = origin.conns
        await asyncio.wait_for(conn.body_in.wait(), WAIT)  # the upload was streaming upstream
        if fault == "broken_chunk":
            writer.write(BROKEN_CHUNK)
        # else the app sends nothing more, for longer than upstream.read_timeout
        rest = await read_until_closed(reader)
    finally:
        writer.transport.abort()
    assert rest == b"", rest  # cut: no last chunk, no error body after the started answer
    await asyncio.wait_for(conn.ended.wait(), WAIT)
    assert not body_was_whole(conn)  # the upstream cannot take the cut body for a whole one
    access = await assert_not_a_proxy_failure(proxy, log_buffer)
    assert access["upstream_status"] == 200
    assert origin.requests == [(1, "POST", f"{API}/upload")]


# --- b. no answer yet: the proxy's own 400 or 408, then the connection closes ----------------------


async def waits_for_the_whole_body(conn: OriginConn) -> None:
    await conn.head()
    await conn.read_to_end()  # never answers: it would once the body were whole


@pytest.mark.parametrize(("fault", "status", "code"), [("broken_chunk", 400, "bad_request"), ("stall", 408, "request_timeout")])
async def test_an_upload_that_fails_before_any_answer_gets_the_proxys_error_then_a_close(
    origins: list[Origin], start_proxy: StartProxy, fake: FakeNdovu, log_buffer: io.StringIO,
    fault: str, status: int, code: str,
) -> None:
    origin = await start_origin(origins, waits_for_the_whole_body)
    cfg = {"forwarding.replay_buffer_bytes": REPLAY_BUFFER, "upstream.read_timeout": 1 if fault == "stall" else 60}
    proxy = await start_proxy(via(origin, fake, **cfg))
    reader, writer = await connect(proxy)
    try:
        writer.write(UPLOAD_HEAD + chunk(b"u" * FIRST_PIECE))
        await asyncio.wait_for(origin.head_in.wait(), WAIT)
        [conn] = origin.conns
        await asyncio.wait_for(conn.body_in.wait(), WAIT)  # the upload is streaming upstream
        if fault == "broken_chunk":
            writer.write(BROKEN_CHUNK)
        got, headers, body = await read_sized(reader)
        rest = await read_until_closed(reader)
    finally:
        writer.transport.abort()
    assert got == status
    assert headers["x-ndovu-proxy-error"] == code
    assert json.loads(body)["error"] == code
    assert rest == b""  # and the connection closed after it
    await asyncio.wait_for(conn.ended.wait(), WAIT)
    assert not body_was_whole(conn)
    access = await assert_not_a_proxy_failure(proxy, log_buffer)
    assert access["status"] == status


# --- c. an upstream that answers a big upload at once and takes no more of it ---------------------


TOO_LARGE = b'{"error": "too large"}'


async def refuses_uploads(conn: OriginConn) -> None:
    """413 as soon as an upload's head is in, and not another byte read on that connection;
    anything else is answered 200 (keep-alive)."""
    while True:
        _, target, headers = await conn.head()
        if target.endswith("/upload"):
            await conn.answer(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                              b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (len(TOO_LARGE), TOO_LARGE))
            await conn.origin.stop.wait()
            return
        await conn.reader.readexactly(int(headers.get("content-length", "0")))
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


def body_copiers() -> list[asyncio.Task[Any]]:
    """Tasks of the pool still writing a request body upstream."""
    return [task for task in asyncio.all_tasks() if "_write_body" in getattr(task.get_coro(), "__qualname__", "")]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upload_the_upstream_answers_at_once_leaves_nothing_copying_it(
    origins: list[Origin], start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession,
    log_buffer: io.StringIO, framing: str,
) -> None:
    origin = await start_origin(origins, refuses_uploads)
    proxy = await start_proxy(via(origin, fake, **{"forwarding.replay_buffer_bytes": REPLAY_BUFFER}))
    reader, writer = await connect(proxy)
    size = 64 * 2**20
    piece = b"u" * 2**16
    if framing == "chunked":
        writer.write(UPLOAD_HEAD)
        piece = chunk(piece)
    else:
        writer.write(f"POST {API}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())

    async def upload() -> None:  # the app goes on sending until it reads the answer
        for _ in range(size // 2**16):
            writer.write(piece)
            await writer.drain()

    sending = asyncio.create_task(upload())
    try:
        status, headers, body = await read_sized(reader)
        sending.cancel()  # the app has its answer, stops sending, and stays connected
        await asyncio.gather(sending, return_exceptions=True)
        assert status == 413
        assert "x-ndovu-proxy-error" not in headers  # the upstream's answer, passed on
        assert body == TOO_LARGE
        assert await fakes.eventually(lambda: proxy.stats.in_flight == 0), f"in_flight stays {proxy.stats.in_flight}"
        assert await fakes.eventually(lambda: not body_copiers(), timeout=2), body_copiers()
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.transport.abort()
    async with http.get(url(proxy, f"{API}/after")) as resp:  # the proxy serves on
        assert resp.status == 200
        assert await resp.read() == b"ok"
    assert [r[1:] for r in origin.requests] == [("POST", f"{API}/upload"), ("GET", f"{API}/after")]
    assert events(log_buffer, "request_failed") == []


# --- d. a pooled connection the upstream closes after reading a request ----------------------------


async def closes_after_reading_the_second_request(conn: OriginConn) -> None:
    """The first connection answers one request, then reads the next one whole and closes
    cleanly without a word; later connections answer everything."""
    served = 0
    while True:
        *_, headers = await conn.head()
        await conn.reader.readexactly(int(headers.get("content-length", "0")))
        if conn.number == 1 and served == 1:
            conn.writer.close()  # a FIN, after every byte of the request was read
            return
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
        served += 1


@pytest.mark.parametrize(("method", "expected", "sent"), [("POST", 502, 1), ("GET", 200, 2)])
async def test_a_request_the_upstream_read_then_closed_on_is_resent_only_when_idempotent(
    origins: list[Origin], start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession,
    log_buffer: io.StringIO, method: str, expected: int, sent: int,
) -> None:
    origin = await start_origin(origins, closes_after_reading_the_second_request)
    proxy = await start_proxy(via(origin, fake))
    async with http.get(url(proxy, f"{API}/warm")) as resp:  # leaves connection 1 in the pool
        assert resp.status == 200
        await resp.read()
    data = b"hello" if method == "POST" else None
    async with http.request(method, url(proxy, f"{API}/x"), data=data) as resp:
        assert resp.status == expected
        body = await resp.read()
        if expected == 502:
            assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_unreachable"
            assert json.loads(body)["error"] == "upstream_unreachable"
        else:
            assert "X-Ndovu-Proxy-Error" not in resp.headers
            assert body == b"ok"
    tried = [(number, verb) for number, verb, target in origin.requests if target == f"{API}/x"]
    # the first try went on the pooled connection; a resend, on a new one
    assert tried == [(1, method), (2, method)][:sent]
    assert events(log_buffer, "request_failed") == []
