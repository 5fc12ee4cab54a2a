"""`proxy.wire.Listener` alone, on raw sockets, in front of a stub handler: keep-alive and
pipelining (and its queue's pause), HTTP/1.0, request bodies (lengths, chunks, trailers,
100-continue, flow control, timeouts), malformed requests, response framing, clients that go
away, the idle timeout and shutdown. No proxy, no upstream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.wire import Listener, Request
from proxy.wire.errors import BodyTimeout, ClientGone
from proxy.wire.http import HIGH_WATER
from proxy.wire.listener import FIN_CHECK
from proxy.wire.server import MAX_PIPELINE

#: a generous upper bound for anything expected at once, or within a timeout below
WAIT = 5.0
BODY_TIMEOUT = 0.3
IDLE_TIMEOUT = 0.5
#: timeouts that never fire in a test that is not about them
LONG = 30.0
MiB = 1024 * 1024
DATE = re.compile(rb"\r\nDate: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
                  rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT\r\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# --- the stub handler ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the handler got it, and what became of its answer."""

    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    error: BaseException | None = None  # what the answer raised (or caught and kept)
    cancelled: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


Answer = Callable[[Request, "Seen"], Awaitable[None]]


async def echo(request: Request, seen: Seen) -> None:
    """Read the whole body, answer `METHOD target length`."""
    if request.body is not None:
        seen.body = await request.body.read_all()
    request.respond(200, [], b"%s %s %d" % (request.method.encode(), request.target.encode(), len(seen.body)))


class Stub:
    """Records every request, refusal and failure; answers by target (`routes`), else `echo`."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.refused: list[str] = []
        self.failed: list[Exception] = []
        self.routes: dict[str, Answer] = {}
        self._arrivals: asyncio.Queue[Seen] = asyncio.Queue()

    async def arrival(self) -> Seen:
        """The next request handed to the handler."""
        return await asyncio.wait_for(self._arrivals.get(), WAIT)

    async def __call__(self, request: Request) -> None:
        seen = Seen(request.method, request.target, request.version, list(request.headers))
        self.seen.append(seen)
        self._arrivals.put_nowait(seen)
        try:
            await self.routes.get(request.target, echo)(request, seen)
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        except Exception as exc:
            seen.error = exc
            raise
        finally:
            seen.ended.set()

    def refuse(self, request: Request, kind: str) -> None:
        self.refused.append(kind)
        request.respond(400, [(b"X-Kind", kind.encode())], b"refused")

    def fail(self, request: Request, exc: Exception) -> None:
        self.failed.append(exc)
        request.respond(500, [], b"oops")


# --- the client side ----------------------------------------------------------------------------


class Client:
    """One raw connection to the listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), WAIT)

    async def head(self) -> bytes:
        """The next response head, its one Date header's value replaced by `*`."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        head, dates = DATE.subn(b"\r\nDate: *\r\n", raw)
        assert dates == 1, raw
        return head

    async def exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), WAIT)

    async def expect(self, head: bytes, body: bytes = b"") -> None:
        """The next response is exactly `head` (Date as `*`) and `body`."""
        assert await self.head() == head
        assert await self.exactly(len(body)) == body

    async def rest(self) -> bytes:
        """Everything until the listener closes the connection."""
        return await asyncio.wait_for(self.reader.read(), WAIT)

    async def closed(self) -> bool:
        """True once the listener has closed the connection, with nothing more sent."""
        return await self.rest() == b""

    def close(self) -> None:
        self.writer.transport.abort()


def get(target: str, *extra: bytes, method: bytes = b"GET", version: bytes = b"1.1") -> bytes:
    return b"%s %s HTTP/%s\r\nHost: x\r\n%s\r\n" % (method, target.encode(), version,
                                                    b"".join(line + b"\r\n" for line in extra))


def post(target: str, body: bytes, *extra: bytes) -> bytes:
    return get(target, b"Content-Length: %d" % len(body), *extra, method=b"POST") + body


def head(status: bytes, *lines: bytes) -> bytes:
    """A response head as the listener writes it: headers, Date, then framing lines."""
    return b"HTTP/1.1 %s\r\n" % status + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def ok(body: bytes, *framing: bytes) -> tuple[bytes, bytes]:
    """The head and body of an echo answer."""
    return head(b"200 OK", b"Date: *", b"Content-Length: %d" % len(body), *framing), body


@dataclass
class Served:
    listener: Listener
    stub: Stub
    port: int
    clients: list[Client]
    paused: asyncio.Event  # set whenever a connection pauses reading

    async def connect(self) -> Client:
        client = Client(*await asyncio.open_connection("127.0.0.1", self.port))
        self.clients.append(client)
        return client


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """serve(idle_timeout=LONG, body_timeout=LONG, max_head=2**16) -> a Listener on 127.0.0.1
    with a fresh Stub."""
    started: list[Served] = []

    async def start(*, idle_timeout: float = LONG, body_timeout: float = LONG, max_head: int = 2**16) -> Served:
        stub = Stub()
        listener = Listener(stub, idle_timeout=idle_timeout, body_timeout=body_timeout, max_head=max_head)
        _, port = await listener.start("127.0.0.1", 0)
        paused = asyncio.Event()
        watch = listener.watch

        def watched(conn: Any) -> None:  # called each time a connection pauses reading
            paused.set()
            watch(conn)

        listener.watch = watched  # type: ignore[method-assign]
        served = Served(listener, stub, port, [], paused)
        started.append(served)
        return served

    yield start
    for served in started:
        for client in served.clients:
            client.close()
        served.listener.close()
        await served.listener.drain(WAIT)


def gated(gate: asyncio.Event, then: Answer = echo) -> Answer:
    """An answer that waits for `gate` first."""

    async def answer(request: Request, seen: Seen) -> None:
        await gate.wait()
        await then(request, seen)

    return answer


async def forever(_request: Request, _seen: Seen) -> None:
    await asyncio.Event().wait()


# --- keep-alive and pipelining ------------------------------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection(serve: Serve) -> None:
    s = await serve()
    client = await s.connect()
    for i in range(10):
        await client.send(get(f"/k{i}?q={i}", b"X-N: %d" % i))
        await client.expect(*ok(b"GET /k%d?q=%d 0" % (i, i)))  # HTTP/1.1: no Connection header
    assert [(r.method, r.target, r.version) for r in s.stub.seen] == [("GET", f"/k{i}?q={i}", "1.1") for i in range(10)]
    assert s.stub.seen[3].headers == [(b"Host", b"x"), (b"X-N", b"3")]
    assert len(s.listener.connections) == 1


async def test_pipelined_requests_are_answered_in_order_even_when_the_first_is_slow(serve: Serve) -> None:
    s = await serve()
    gate = asyncio.Event()
    s.stub.routes["/slow"] = gated(gate)
    client = await s.connect()
    await client.send(get("/slow") + get("/fast") + get("/last"))
    slow = await s.stub.arrival()
    assert slow.target == "/slow" and len(s.stub.seen) == 1  # one at a time
    gate.set()
    for target in (b"/slow", b"/fast", b"/last"):
        await client.expect(*ok(b"GET %s 0" % target))
    assert [r.target for r in s.stub.seen] == ["/slow", "/fast", "/last"]


async def test_a_full_pipeline_pauses_reading_and_resumes(serve: Serve) -> None:
    s = await serve()
    gate = asyncio.Event()
    s.stub.routes["/p0"] = gated(gate)
    client = await s.connect()
    count = 40
    await client.send(b"".join(get(f"/p{i}") for i in range(count)))  # all at once
    await s.stub.arrival()
    await asyncio.wait_for(s.paused.wait(), WAIT)  # the queue passed MAX_PIPELINE
    assert count > MAX_PIPELINE and s.listener.paused
    more = 10
    await client.send(b"".join(get(f"/p{i}") for i in range(count, count + more)))  # sent while paused
    gate.set()
    for i in range(count + more):
        await client.expect(*ok(b"GET /p%d 0" % i))
    assert [r.target for r in s.stub.seen] == [f"/p{i}" for i in range(count + more)]
    assert not s.listener.paused  # resumed, and no longer watched


# --- HTTP/1.0 and Connection --------------------------------------------------------------------


async def test_http10_without_keep_alive_is_closed_after_the_answer(serve: Serve) -> None:
    s = await serve()
    client = await s.connect()
    await client.send(get("/old", version=b"1.0") + get("/never", version=b"1.0"))
    await client.expect(*ok(b"GET /old 0", b"Connection: close"))
    assert await client.closed()
    assert [(r.target, r.version) for r in s.stub.seen] == [("/old", "1.0")]


async def test_http10_keep_alive_is_kept(serve: Serve) -> None:
    s = await serve()
    client = await s.connect()
    for i in range(3):
        await client.send(get(f"/old{i}", b"Connection: keep-alive", version=b"1.0"))
        await client.expect(*ok(b"GET /old%d 0" % i, b"Connection: keep-alive"))
    assert len(s.stub.seen) == 3


async def test_connection_close_is_honoured(serve: Serve) -> None:
    s = await serve()
    client = await s.connect()
    await client.send(get("/a", b"Connection: close") + get("/b"))  # nothing after it is read
    await client.expect(*ok(b"GET /a 0", b"Connection: close"))
    assert await client.closed()
    assert [r.target for r in s.stub.seen] == ["/a"]


# --- request bodies -----------------------------------------------------------------------------


async def test_a_body_with_content_length_arrives_whole(serve: Serve) -> None:
    s = await serve()
    client = await s.connect()
    body = bytes(range(256)) * 40
    await client.send(post("/up", body)[:-5000])
    await client.send(post("/up", body)[-5000:] + post("/up2", b"second"))
    await client.expect(*ok(b"POST /up %d" % len(body)))
    await client.expect(*ok(b"POST /up2 6"))
    assert [r.body for r in s.stub.seen] == [body, b"second"]


async def test_a_chunked_body_arrives_whole_and_its_trailers_are_dropped(serve: Serve) -> None:
    s = await serve()
    client = await s.connect()
    await client.send(get("/chunked", b"Transfer-Encoding: chunked", b"X-Before: 1", method=b"POST")
                      + b"5\r\nhello\r\n")
    await client.send(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\nX-Before: 2\r\n\r\n" + get("/next"))
    await client.expect(*ok(b"POST /chunked 11"))
    await client.expect(*ok(b"GET /next 0"))
    first = s.stub.seen[0]
    assert first.body == b"hello world"
    assert first.headers == [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked"), (b"X-Before", b"1")]
    assert [r.target for r in s.stub.seen] == ["/chunked", "/next"]


async def test_a_body_over_the_high_water_mark_is_streamed_through(serve: Serve) -> None:
    s = await serve()
    gate = asyncio.Event()
    pieces: list[int] = []

    async def stream(request: Request, seen: Seen) -> None:
        await gate.wait()
        assert request.body is not None and request.body.paused  # the buffer filled: reading paused
        digest = hashlib.sha256()
        while chunk := await request.body.read_chunk():
            pieces.append(len(chunk))
            digest.update(chunk)
        request.respond(200, [], digest.hexdigest().encode())

    s.stub.routes["/big"] = stream
    client = await s.connect()
    data = os.urandom(5 * MiB)
    client.writer.write(get("/big", b"Content-Length: %d" % len(data), method=b"PUT"))

    async def upload() -> None:
        for i in range(0, len(data), 64 * 1024):  # the client keeps sending as it can
            client.writer.write(data[i:i + 64 * 1024])
            await client.writer.drain()

    sending = asyncio.create_task(upload())
    await asyncio.wait_for(s.paused.wait(), WAIT)
    gate.set()
    await client.expect(*ok(hashlib.sha256(data).hexdigest().encode()))
    await asyncio.wait_for(sending, WAIT)
    assert sum(pieces) == len(data) and len(pieces) > 1
    assert not s.listener.paused


async def test_expect_100_continue_brings_the_body(serve: Serve) -> None:
    s = await serve()

    async def accept(request: Request, seen: Seen) -> None:
        assert request.body_withheld
        request.send_continue()
        await echo(request, seen)

    s.stub.routes["/ask"] = accept
    client = await s.connect()
    await client.send(get("/ask", b"Content-Length: 7", b"Expect: 100-continue", method=b"POST"))
    assert await client.exactly(len(CONTINUE)) == CONTINUE
    await client.send(b"payload" + get("/after"))
    await client.expect(*ok(b"POST /ask 7"))
    await client.expect(*ok(b"GET /after 0"))  # the connection was kept
    assert [r.body for r in s.stub.seen] == [b"payload", b""]


async def test_an_answer_before_a_withheld_body_closes_the_connection(serve: Serve) -> None:
    s = await serve()

    async def refuse(request: Request, seen: Seen) -> None:
        request.respond(417, [], b"nope")

    s.stub.routes["/ask"] = refuse
    client = await s.connect()
    await client.send(get("/ask", b"Content-Length: 7", b"Expect: 100-continue", method=b"POST"))
    await client.expect(head(b"417 Expectation Failed", b"Date: *", b"Content-Length: 4", b"Connection: close"),
                        b"nope")  # no 100 Continue before it
    assert await client.closed()


async def test_a_body_that_stops_coming_times_out(serve: Serve) -> None:
    s = await serve(body_timeout=BODY_TIMEOUT)
    waited: list[float] = []

    async def read(request: Request, seen: Seen) -> None:
        assert request.body is not None
        started = time.monotonic()
        try:
            while chunk := await request.body.read_chunk():
                seen.body += chunk
                started = time.monotonic()
        except BodyTimeout as exc:
            waited.append(time.monotonic() - started)
            seen.error = exc
            request.keep_alive = False
            request.respond(408, [], b"slow")

    s.stub.routes["/up"] = read
    client = await s.connect()
    await client.send(get("/up", b"Content-Length: 100", method=b"POST") + b"0123456789")
    await client.expect(head(b"408 Request Timeout", b"Date: *", b"Content-Length: 4", b"Connection: close"), b"slow")
    assert await client.closed()
    seen = s.stub.seen[0]
    assert isinstance(seen.error, BodyTimeout) and seen.body == b"0123456789"
    assert BODY_TIMEOUT * 0.9 <= waited[0] < BODY_TIMEOUT + 2


# --- a failing handler, malformed requests -------------------------------------------------------


async def test_a_handler_that_raises_is_answered_by_fail_and_costs_only_its_connection(
    serve: Serve, log_buffer: Any
) -> None:
    s = await serve()

    async def boom(request: Request, seen: Seen) -> None:
        raise RuntimeError("a bug")

    s.stub.routes["/boom"] = boom
    client = await s.connect()
    await client.send(get("/boom") + get("/behind"))
    await client.expect(head(b"500 Internal Server Error", b"Date: *", b"Content-Length: 4", b"Connection: close"),
                        b"oops")
    assert await client.closed()
    assert [type(e) for e in s.stub.failed] == [RuntimeError]
    assert [r.target for r in s.stub.seen] == ["/boom"]  # the request behind the bug is not run
    again = await s.connect()
    await again.send(get("/fine"))
    await again.expect(*ok(b"GET /fine 0"))
    assert '"request_failed"' in log_buffer.getvalue()


MALFORMED_CASES = {
    "bare-lf": (b"GET / HTTP/1.1\nHost: x\n\n", "invalid_syntax"),
    "unknown-method": (b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", "invalid_method"),
    "transfer-encoding-gzip": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", "invalid_framing"),
    "head-too-large": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 600 + b"\r\n\r\n", "headers_too_large"),
    "track": (b"TRACK / HTTP/1.1\r\nHost: x\r\n\r\n", "method_not_allowed"),
}


@pytest.mark.parametrize("case", list(MALFORMED_CASES))
async def test_a_malformed_request_is_refused_after_those_before_it(serve: Serve, case: str) -> None:
    raw, kind = MALFORMED_CASES[case]
    s = await serve(max_head=512)
    client = await s.connect()
    await client.send(get("/a") + get("/b") + raw)
    await client.expect(*ok(b"GET /a 0"))
    await client.expect(*ok(b"GET /b 0"))
    await client.expect(head(b"400 Bad Request", b"X-Kind: " + kind.encode(), b"Date: *", b"Content-Length: 7",
                             b"Connection: close"), b"refused")
    assert await client.closed()
    assert s.stub.refused == [kind]
    assert [r.target for r in s.stub.seen] == ["/a", "/b"]  # nothing of it reached the handler


# --- response framing ---------------------------------------------------------------------------


async def unsized(request: Request, seen: Seen) -> None:
    request.start(200, [(b"X-S", b"1")], None, b"first-")
    await request.write(b"second")
    request.end()


async def test_an_answer_of_unknown_length_is_chunked_to_http11(serve: Serve) -> None:
    s = await serve()
    s.stub.routes["/u"] = unsized
    client = await s.connect()
    await client.send(get("/u") + get("/after"))
    await client.expect(head(b"200 OK", b"X-S: 1", b"Date: *", b"Transfer-Encoding: chunked"),
                        b"6\r\nfirst-\r\n6\r\nsecond\r\n0\r\n\r\n")
    await client.expect(*ok(b"GET /after 0"))  # kept


@pytest.mark.parametrize("extra", [(), (b"Connection: keep-alive",)], ids=["plain", "keep-alive"])
async def test_an_answer_of_unknown_length_ends_at_close_for_http10(serve: Serve, extra: tuple[bytes, ...]) -> None:
    s = await serve()
    s.stub.routes["/u"] = unsized
    client = await s.connect()
    await client.send(get("/u", *extra, version=b"1.0"))
    assert await client.head() == head(b"200 OK", b"X-S: 1", b"Date: *", b"Connection: close")
    assert await client.rest() == b"first-second"


async def test_head_gets_a_content_length_and_no_body(serve: Serve) -> None:
    s = await serve()

    async def sized(request: Request, seen: Seen) -> None:
        request.start(200, [], 5, b"hello")
        request.end()

    s.stub.routes["/s"] = sized
    client = await s.connect()
    await client.send(get("/x", method=b"HEAD") + get("/s", method=b"HEAD") + get("/after"))
    await client.expect(head(b"200 OK", b"Date: *", b"Content-Length: 9"))  # respond(): len("HEAD /x 0")
    await client.expect(head(b"200 OK", b"Date: *", b"Content-Length: 5"))  # start()
    await client.expect(*ok(b"GET /after 0"))  # no body bytes came in between


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_bodiless_status_gets_no_content_length(serve: Serve, status: bytes) -> None:
    s = await serve()

    async def empty(request: Request, seen: Seen) -> None:
        request.respond(int(status[:3]), [(b"ETag", b'"e"')], b"")

    s.stub.routes["/e"] = empty
    client = await s.connect()
    await client.send(get("/e") + get("/after"))
    await client.expect(head(status, b'ETag: "e"', b"Date: *"))
    await client.expect(*ok(b"GET /after 0"))


# --- clients that go away -----------------------------------------------------------------------


async def test_a_client_that_closes_cancels_its_handler(serve: Serve) -> None:
    s = await serve()
    s.stub.routes["/wait"] = forever
    client = await s.connect()
    await client.send(get("/wait"))
    seen = await s.stub.arrival()
    client.writer.close()  # FIN
    await asyncio.wait_for(seen.ended.wait(), WAIT)
    assert seen.cancelled
    await asyncio.wait_for(client.writer.wait_closed(), WAIT)


async def test_a_fin_while_reading_is_paused_cancels_the_handler(serve: Serve) -> None:
    s = await serve()
    s.stub.routes["/wait"] = forever  # never reads its body
    client = await s.connect()
    # just over the buffer's high-water mark: reading pauses once nearly all of it is read,
    # and the rest fits in the listener's receive buffer however small the kernel keeps it, so
    # the FIN reaches its socket (TCP delivers it after every byte; a FIN stuck behind bytes
    # the client could not send yet cannot be seen, README: bounded by read_timeout)
    data = b"z" * (HIGH_WATER + 2**16)
    await client.send(get("/wait", b"Content-Length: %d" % len(data), method=b"PUT"))
    seen = await s.stub.arrival()
    client.writer.write(data)
    client.writer.write_eof()  # the FIN follows the body, once the kernel has taken it all
    await asyncio.wait_for(s.paused.wait(), WAIT)
    started = time.monotonic()
    await asyncio.wait_for(seen.ended.wait(), FIN_CHECK * 2 + WAIT)
    assert seen.cancelled and time.monotonic() - started < FIN_CHECK * 2 + WAIT


@pytest.mark.parametrize("length", [None, 2**28], ids=["chunked", "sized"])
async def test_a_client_that_reads_nothing_of_a_large_answer_is_gone(serve: Serve, length: int | None) -> None:
    s = await serve(body_timeout=BODY_TIMEOUT)
    stalled: list[float] = []

    async def flood(request: Request, seen: Seen) -> None:
        request.start(200, [], length)
        chunk = b"x" * 2**16
        for _ in range(4096):  # 256 MiB at most: more than any socket buffers hold
            started = time.monotonic()
            try:
                await request.write(chunk)
            except ClientGone as exc:
                stalled.append(time.monotonic() - started)
                seen.error = exc
                return
        request.end()

    s.stub.routes["/flood"] = flood
    client = await s.connect()
    await client.send(get("/flood"))  # and never read
    seen = await s.stub.arrival()
    await asyncio.wait_for(seen.ended.wait(), WAIT)
    assert isinstance(seen.error, ClientGone)
    assert BODY_TIMEOUT * 0.9 <= stalled[0] < BODY_TIMEOUT + 2
    assert not s.listener.connections  # cut


# --- idle connections and shutdown --------------------------------------------------------------


@pytest.mark.parametrize("before", [b"", get("/one"), b"GET /half HTTP/1.1\r\nHost:"],
                         ids=["nothing", "after-an-answer", "half-a-head"])
async def test_an_idle_connection_is_closed_after_the_idle_timeout(serve: Serve, before: bytes) -> None:
    s = await serve(idle_timeout=IDLE_TIMEOUT)
    client = await s.connect()
    started = time.monotonic()
    if before:
        await client.send(before)
    if before.startswith(b"GET /one"):
        await client.expect(*ok(b"GET /one 0"))
        started = time.monotonic()
    assert await client.closed()
    assert IDLE_TIMEOUT * 0.9 <= time.monotonic() - started < IDLE_TIMEOUT + 2


async def test_close_shuts_idle_connections_and_lets_busy_ones_finish(serve: Serve) -> None:
    s = await serve()
    gate = asyncio.Event()
    s.stub.routes["/slow"] = gated(gate)
    idle, busy = await s.connect(), await s.connect()
    await idle.send(get("/once"))
    await idle.expect(*ok(b"GET /once 0"))
    await busy.send(get("/slow"))
    await s.stub.arrival()
    await s.stub.arrival()
    s.listener.close()
    draining = asyncio.create_task(s.listener.drain(WAIT))
    assert await idle.closed()  # at once, not after the drain
    with pytest.raises(OSError):
        await s.connect()  # no new connections
    gate.set()
    await busy.expect(*ok(b"GET /slow 0", b"Connection: close"))
    assert await busy.closed()
    assert await asyncio.wait_for(draining, WAIT) is True


async def test_a_head_whose_end_straddles_reads_after_its_request_line(serve: Serve) -> None:
    """`GET /a HTTP/1.1\r` | `\n` | `\r\nGET /b ...`: the empty line that ends the first head
    begins in the request line's last read; both requests are read, each as itself."""
    s = await serve()
    client = await s.connect()
    for part in (b"GET /a HTTP/1.1\r", b"\n", b"\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"):
        await client.send(part)
        await asyncio.sleep(0.05)  # the subject: the parts arrive as separate reads
    await client.expect(*ok(b"GET /a 0"))
    await client.expect(*ok(b"GET /b 0"))
    assert [r.target for r in s.stub.seen] == ["/a", "/b"]
