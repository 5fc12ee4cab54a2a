"""The proxy's own HTTP/1.1 listener, on raw sockets: keep-alive, pipelining, half-close,
HTTP/1.0, unread bodies, malformed requests and shutdown."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from proxy.app import Proxy
from proxy.wire.server import DISCARD_LIMIT, MAX_PIPELINE
from tests import fakes
from tests.conftest import StartProxy
from tests.fakes import FakeNdovu

API = "/api/v3/partners"


class Client:
    """One raw connection to the proxy, reading whole responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, proxy: Proxy) -> Client:
        assert proxy.address is not None
        return cls(*await asyncio.open_connection(proxy.address.host, proxy.address.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = raw.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ")[1]), headers

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", "0"))), 5)
        return status, headers, body

    async def closed(self) -> bool:
        """True once the proxy has closed the connection (EOF after what was read)."""
        rest = await asyncio.wait_for(self.reader.read(), 5)
        self.close()
        return rest == b""

    def close(self) -> None:
        self.writer.transport.abort()


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: x", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def test_keep_alive_serves_many_requests_on_one_connection(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    for i in range(3):
        await client.send(get(f"{API}/k{i}"))
        status, headers, body = await client.response()
        assert status == 200 and json.loads(body)["path"] == f"{API}/k{i}"
        assert "connection" not in headers  # HTTP/1.1: persistent unless said otherwise
    client.close()
    assert [r.path_qs for r in fake.api_log] == [f"{API}/k0", f"{API}/k1", f"{API}/k2"]


async def test_pipelined_requests_are_answered_in_order(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    count = MAX_PIPELINE * 3  # past the queue: reading pauses and resumes
    await client.send(b"".join(get(f"{API}/p{i}", f"X-Request-ID: rid-{i}") for i in range(count)))
    for i in range(count):
        status, headers, body = await client.response()
        assert status == 200
        assert headers["x-request-id"] == f"rid-{i}"
        assert json.loads(body)["path"] == f"{API}/p{i}"
    client.close()


async def test_a_client_that_closes_its_side_is_gone_and_its_upstream_request_is_cut(
    start_proxy: StartProxy, fake: FakeNdovu, log_buffer: Any
) -> None:
    reached, cut = asyncio.Event(), asyncio.Event()

    async def slow(_request: web.Request) -> web.StreamResponse:
        reached.set()
        try:
            await asyncio.Event().wait()
        finally:
            cut.set()  # cancelled: the proxy closed this upstream connection
        return web.Response()

    fake.api_faults["slow"] = slow
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(get(f"{API}/slow"))
    await asyncio.wait_for(reached.wait(), 5)
    client.writer.write_eof()  # FIN: nobody will read an answer
    await asyncio.wait_for(cut.wait(), 5)
    assert await client.closed()
    assert proxy.stats.in_flight == 0
    access = [json.loads(line) for line in log_buffer.getvalue().splitlines() if '"access"' in line]
    assert [a["status"] for a in access] == [499]


async def test_http10_without_keep_alive_is_closed_after_the_answer(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(get(f"{API}/old", version="1.0"))
    status, headers, _ = await client.response()
    assert status == 200 and headers["connection"] == "close"
    assert await client.closed()


async def test_http10_keep_alive_is_honoured(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    for _ in range(2):
        await client.send(get(f"{API}/old", "Connection: keep-alive", version="1.0"))
        status, headers, _ = await client.response()
        assert status == 200 and headers["connection"] == "keep-alive"
    client.close()


async def test_a_streamed_answer_of_unknown_length(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    """Chunked to an HTTP/1.1 client; to an HTTP/1.0 client, plain bytes ending at close."""
    go_on = asyncio.Event()

    async def unsized(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first-")
        await go_on.wait()  # the proxy has started its answer before the rest exists
        await resp.write(b"second")
        await resp.write_eof()
        return resp

    fake.api_faults["unsized"] = unsized
    proxy = await start_proxy()
    for version in ("1.1", "1.0"):
        go_on.clear()
        client = await Client.open(proxy)
        await client.send(get(f"{API}/unsized", version=version))
        status, headers = await client.head()
        assert status == 200 and "content-length" not in headers
        go_on.set()
        rest = await asyncio.wait_for(client.reader.read(), 5) if version == "1.0" else None
        if version == "1.1":
            assert headers["transfer-encoding"] == "chunked"
            chunks = b""
            while True:
                size = int(await client.reader.readline(), 16)
                data = await client.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks += data[:-2]
            assert chunks == b"first-second"
            client.close()
        else:
            assert "transfer-encoding" not in headers and headers["connection"] == "close"
            assert rest == b"first-second"  # and then the connection closed: that is the end
            client.close()


async def test_a_refused_request_keeps_a_connection_when_its_body_is_small(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    body = b"b" * 1000
    await client.send(b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    status, headers, _ = await client.response()  # refused before the body came
    assert status == 403 and "connection" not in headers
    await client.send(body)  # read and dropped, not taken for a request
    await client.send(get(f"{API}/after"))
    status, _, answer = await client.response()
    assert status == 200 and json.loads(answer)["path"] == f"{API}/after"
    client.close()
    assert [r.path_qs for r in fake.api_log] == [f"{API}/after"]


async def test_a_refused_request_with_a_large_body_reads_its_answer_not_a_reset(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    size = DISCARD_LIMIT * 16
    client.writer.write(b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    client.writer.write(b"b" * size)  # all sent before the answer is read
    await client.writer.drain()
    status, headers, body = await client.response()
    assert status == 403 and headers["x-ndovu-proxy-error"] == "path_not_allowed"
    assert json.loads(body)["error"] == "path_not_allowed"
    assert await client.closed()  # closed once the rest was drained
    assert fake.api_log == []


async def test_a_refused_request_that_held_its_body_back_is_told_the_connection_closes(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
    status, headers, _ = await client.response()  # a final answer, no 100 Continue first
    assert status == 403 and headers["connection"] == "close"
    assert await client.closed()
    assert fake.api_log == []


async def test_own_answers_carry_a_date(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(get("/elsewhere"))
    status, headers, _ = await client.response()
    assert status == 403
    assert headers["date"].endswith(" GMT")  # RFC 9110 §6.6.1, IMF-fixdate
    client.close()


async def test_a_malformed_request_gets_the_proxys_own_400(start_proxy: StartProxy, fake: FakeNdovu, log_buffer: Any) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Evil: a\x00b\r\n\r\n")
    status, headers, body = await client.response()
    assert status == 400 and headers["x-ndovu-proxy-error"] == "bad_request"
    assert headers["connection"] == "close" and headers["x-request-id"]
    assert json.loads(body)["error"] == "bad_request"
    assert await client.closed()
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    refused = [e for e in events if e["event"] == "malformed_request"]
    assert len(refused) == 1 and "a\\x00b" not in log_buffer.getvalue()  # the bytes are not logged
    assert fake.api_log == []


async def test_shutdown_closes_idle_connections_and_lets_busy_ones_finish(
    start_proxy: StartProxy, fake: FakeNdovu, log_buffer: Any
) -> None:
    gate = fakes.Gate("late")
    fake.api_faults["slow"] = gate
    proxy = await start_proxy({"shutdown_timeout": 10})
    idle, busy = await Client.open(proxy), await Client.open(proxy)
    await idle.send(get(f"{API}/once"))
    assert (await idle.response())[0] == 200
    await busy.send(get(f"{API}/slow"))
    await asyncio.wait_for(gate.reached.wait(), 5)
    stopping = asyncio.create_task(proxy.stop())
    assert await idle.closed()  # at once, not after the drain
    gate.release.set()
    status, headers, body = await busy.response()
    assert status == 200 and body == b"late" and headers["connection"] == "close"
    assert await busy.closed()
    await asyncio.wait_for(stopping, 5)
    assert "shutdown_cut" not in log_buffer.getvalue()  # everything finished within the bound


async def test_a_failing_handler_costs_one_connection_not_the_listener(
    start_proxy: StartProxy, fake: FakeNdovu, log_buffer: Any, monkeypatch: Any
) -> None:
    from proxy.forward import Forwarder

    admit = Forwarder._admit

    def broken(self: Forwarder, request: Any) -> str:
        if request.target.endswith("/boom"):
            raise RuntimeError("a bug")
        return admit(self, request)

    monkeypatch.setattr(Forwarder, "_admit", broken)
    proxy = await start_proxy()
    client = await Client.open(proxy)
    await client.send(get(f"{API}/boom") + get(f"{API}/after"))
    status, headers, body = await client.response()  # the proxy's own 500, then the connection closes
    assert status == 500 and headers["x-ndovu-proxy-error"] == "internal_error"
    assert json.loads(body)["error"] == "internal_error" and headers["connection"] == "close"
    assert await client.closed()
    again = await Client.open(proxy)
    await again.send(get(f"{API}/fine"))
    assert (await again.response())[0] == 200
    again.close()
    failed = [json.loads(line) for line in log_buffer.getvalue().splitlines() if "request_failed" in line]
    assert len(failed) == 1 and failed[0]["level"] == "error" and failed[0]["error"] == "RuntimeError"
    assert [r.path_qs for r in fake.api_log] == [f"{API}/fine"]  # the request behind the bug was not run
    access = [json.loads(line) for line in log_buffer.getvalue().splitlines() if '"access"' in line]
    assert [a["status"] for a in access] == [500, 200]


async def test_a_malformed_request_with_more_bytes_behind_it_still_reads_its_400(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    proxy = await start_proxy()
    client = await Client.open(proxy)
    client.writer.write(b"GET /api/v3/partners/x HTTP/1.1\r\nNo colon here\r\n\r\n" + b"z" * (DISCARD_LIMIT * 8))
    await client.writer.drain()
    status, headers, _ = await client.response()
    assert status == 400 and headers["x-ndovu-proxy-error"] == "bad_request"
    assert await client.closed()
    assert fake.api_log == []
