"""Attacks and faults: the auth endpoint and the partner API misbehaving, clients vanishing,
hostile bytes on raw sockets. Nothing may crash the proxy, lose a request silently, leak a
credential (checked after every test by the start_proxy fixture) or reach the upstream
outside the rules."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import Proxy
from tests import fakes
from tests.conftest import StartProxy, raw_request, url
from tests.fakes import CLIENT_SECRET, FakeClock, FakeNdovu

API = "/api/v3/partners"


async def get(http: aiohttp.ClientSession, proxy: Proxy, path: str = f"{API}/x") -> int:
    async with http.get(url(proxy, path)) as resp:
        await resp.read()
        return resp.status


# --- auth faults --------------------------------------------------------------------------


async def test_auth_down_at_start_then_back(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    fake.auth_faults = [fakes.reset(), fakes.status(502), fakes.status(503)]
    mark = clock.parks
    proxy = await start_proxy({"auth.backoff_initial": 1, "auth.backoff_max": 8}, clock=clock, wait_token=False)
    await clock.wait_parked(mark)  # the first fetch failed: the refresher sleeps out its backoff
    assert fake.auth_calls == 1
    async with http.get(f"http://{proxy.admin_address}/readyz") as resp:
        assert resp.status == 503
    assert await get(http, proxy) == 503
    # backoff ~0.5-1, 1-2, 2-4 s: three failures, then the real endpoint answers; each step
    # returns once the refresher, woken, has fetched and parked again
    for _ in range(4):
        await clock.advance(4)
    assert proxy.tokens is not None
    await proxy.tokens.get()
    async with http.get(f"http://{proxy.admin_address}/readyz") as resp:
        assert resp.status == 200
    assert await get(http, proxy) == 200
    assert fake.auth_calls == 4  # never more than the backoff allows


async def test_flapping_auth_endpoint_never_fails_a_request_while_a_token_is_valid(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    fake.token_ttl = 100
    proxy = await start_proxy({"auth.refresh_margin": 40, "auth.backoff_initial": 2, "auth.backoff_max": 4}, clock=clock)
    statuses = []
    for second in range(0, 300, 5):
        # down for 20 s of every 40 s
        fake.auth_faults = [fakes.status(503)] * 50 if (second // 20) % 2 else []
        await clock.advance(5)  # returns once a refresher it woke has fetched and parked again
        statuses.append(await get(http, proxy))
    assert statuses.count(200) == len(statuses)
    assert fake.auth_calls < 300 / 2  # backoff held: far fewer calls than one per clock step


async def test_slow_auth_beyond_its_timeout(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    release = asyncio.Event()
    fake.auth_faults = [fakes.stall(release)]
    proxy = await start_proxy({"auth.timeout": 0.2, "auth.backoff_initial": 60, "auth.backoff_max": 60}, wait_token=False)
    assert await get(http, proxy) == 503
    assert proxy.tokens is not None and proxy.tokens.last_error == "auth_unreachable"
    release.set()


async def test_bad_secret_then_fixed_file_recovers_without_restart(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = FakeClock()
    secret = tmp_path / "secret"
    secret.write_text("typo-secret\n")
    mark = clock.parks
    proxy = await start_proxy(
        {"auth.client_secret_file": str(secret), "auth.backoff_initial": 10, "auth.backoff_max": 60},
        clock=clock, wait_token=False,
    )
    await clock.wait_parked(mark)  # the first fetch was rejected: the refresher backs off
    for _ in range(10):
        assert await get(http, proxy) == 503
    assert fake.auth_calls == 1  # a bad secret never hammers the endpoint
    await clock.advance(60)  # the refresher tries again, is rejected again and parks
    assert fake.auth_calls == 2
    secret.write_text(CLIENT_SECRET + "\n")  # the operator fixes the mounted file
    await clock.advance(60)
    assert proxy.tokens is not None
    await proxy.tokens.get()
    assert await get(http, proxy) == 200
    assert fake.auth_calls == 3


async def test_429_retry_after_is_honoured(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    fake.auth_faults = [fakes.status(429, headers={"Retry-After": "45"})]
    mark = clock.parks
    proxy = await start_proxy({"auth.backoff_initial": 1, "auth.backoff_max": 5}, clock=clock, wait_token=False)
    await clock.wait_parked(mark)  # the 429 is in: the refresher sleeps until Retry-After
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 503
        assert 44 <= int(resp.headers["Retry-After"]) <= 45
    await clock.advance(44)  # wakes nothing (a sleeper woken early would fetch, then park)
    assert fake.auth_calls == 1
    await clock.advance(1)  # due: the refresher fetches, and parks again until the renewal
    assert fake.auth_calls == 2
    assert proxy.tokens is not None
    await proxy.tokens.get()
    assert fake.auth_calls == 2


@pytest.mark.parametrize(
    "fault",
    [
        fakes.raw(b"{not json"),
        fakes.raw(b'{"access_token": "abc"}'),  # no token_type
        fakes.status(200, {"access_token": "abc", "token_type": "mac", "expires_in": 60}),
        fakes.status(200, {"token_type": "Bearer", "expires_in": 60}),
    ],
)
async def test_unusable_200s_are_failed_fetches(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, fault: fakes.Fault) -> None:
    fake.auth_faults = [fault]
    proxy = await start_proxy({"auth.backoff_initial": 60, "auth.backoff_max": 60}, wait_token=False)
    assert await get(http, proxy) == 503
    assert proxy.tokens is not None and proxy.tokens.last_error == "bad_response"
    assert fake.auth_calls == 1


async def test_missing_expires_in_falls_back_and_works(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    token = fake.issue()
    fake.auth_faults = [fakes.status(200, {"access_token": token, "token_type": "BEARER"})]
    proxy = await start_proxy()
    assert proxy.tokens is not None and proxy.tokens.current is not None
    assert 3590 < proxy.tokens.current.lifetime <= 3600  # from the JWT's exp claim
    assert await get(http, proxy) == 200


# --- upstream faults ------------------------------------------------------------------------


async def test_stall_mid_body_beyond_read_timeout_aborts(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    never = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(b"s" * 100)
        await never.wait()
        return resp

    fake.api_faults["stalls"] = stalls
    proxy = await start_proxy({"upstream.read_timeout": 0.2})
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url(proxy, f"{API}/stalls")) as resp:
            await resp.read()
    never.set()


async def test_slow_trickle_within_read_timeout_is_fine(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(10):
            await resp.write(b"%d;" % i)
            await asyncio.sleep(0.05)  # the subject of the test: a slow upstream, below the 0.5 s timeout
        await resp.write_eof()
        return resp

    fake.api_faults["trickle"] = trickle
    proxy = await start_proxy({"upstream.read_timeout": 0.5})
    async with http.get(url(proxy, f"{API}/trickle")) as resp:
        assert resp.status == 200
        assert await resp.read() == b"0;1;2;3;4;5;6;7;8;9;"


async def test_token_revoked_in_steady_traffic_fails_no_request(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    statuses: list[int] = []

    async def worker() -> None:
        for _ in range(40):
            async with http.post(url(proxy, f"{API}/orders"), data=b'{"n": 1}') as resp:
                await resp.read()
                statuses.append(resp.status)
            if len(statuses) % 60 == 0 and len(statuses) <= 300:
                fake.expire_all()  # revoked in the middle of the traffic, five times

    await asyncio.gather(*(worker() for _ in range(8)))
    assert statuses == [200] * 320
    assert 1 + 1 < fake.auth_calls <= 1 + 5  # revocations happened, and each cost one fetch at most


# --- client faults ---------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("max_connections", [1, 100])
async def test_clients_vanishing_mid_upload_and_mid_download_leak_nothing(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, max_connections: int
) -> None:
    upstream_ends: list[str] = []
    receiving, all_ended = asyncio.Event(), asyncio.Event()

    def ended(how: str) -> None:
        upstream_ends.append(how)
        if len(upstream_ends) == 20:
            all_ended.set()

    async def slow_sink(request: web.Request) -> web.StreamResponse:
        try:
            async for _ in request.content.iter_any():
                receiving.set()
            ended("complete")
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.CancelledError):
            ended("cut")
            raise
        return web.Response(text="ok")

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"e" * 65536)
        except (ConnectionError, asyncio.CancelledError):
            ended("cut")
            raise

    fake.api_faults["sink"] = slow_sink
    fake.api_faults["endless"] = endless
    # with one upstream connection, a single leaked slot would hang every later request
    proxy = await start_proxy({"forwarding.replay_buffer_bytes": 1000, "upstream.max_connections": max_connections})
    assert proxy.address is not None
    assert await get(http, proxy) == 200  # warm: token, pool
    gc.collect()
    tasks_before, fds_before = len(asyncio.all_tasks()), _open_fds()

    for _ in range(10):
        reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
        writer.write(f"POST {API}/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode() + b"u" * 50_000)
        await writer.drain()
        await asyncio.wait_for(receiving.wait(), 5)  # the upload reached the upstream
        receiving.clear()
        writer.transport.abort()
        reader2, writer2 = await asyncio.open_connection(proxy.address.host, proxy.address.port)
        writer2.write(f"GET {API}/endless HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader2.readexactly(200_000)
        writer2.transport.abort()

    await asyncio.wait_for(all_ended.wait(), 10)  # both hops noticed, for all twenty
    assert upstream_ends.count("cut") == 20  # every upstream request was cut, none completed
    assert await fakes.eventually(lambda: proxy.stats.in_flight == 0), f"in_flight stays {proxy.stats.in_flight}"
    assert await get(http, proxy) == 200  # still serving

    def tasks_left() -> int:
        gc.collect()
        return len(asyncio.all_tasks())

    # what the cut requests left behind winds down: nothing to await for it but its count
    assert await fakes.eventually(lambda: tasks_left() <= tasks_before, step=0.02), (tasks_left(), tasks_before)
    assert await fakes.eventually(lambda: _open_fds() <= fds_before + 2, step=0.02), (_open_fds(), fds_before)  # the pool may keep a connection or two


# --- hostile input ---------------------------------------------------------------------------

HOSTILE = {
    "cl_and_te": b"POST /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
    "two_cl": b"POST /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhelloGET /admin HTTP/1.1\r\n\r\n",
    "te_obfuscated": b"POST /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te_with_space": b"POST /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "negative_cl": b"POST /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "obs_fold": b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare_cr_in_value": b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Evil: a\rInjected: 1\r\n\r\n",
    "nul_in_value": b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Evil: a\x00b\r\n\r\n",
    "long_request_line": b"GET /api/v3/partners/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long_header": b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
    "invalid_method": b"G@T /api/v3/partners/x HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown_method": b"BREW /api/v3/partners/x HTTP/1.1\r\nHost: x\r\n\r\n",
    "space_in_path": b"GET /api/v3/partners/a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "raw_non_utf8_path": b"GET /api/v3/partners/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "encoded_non_utf8_path": b"GET /api/v3/partners/%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    "asterisk": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute_form": b"GET http://evil.example/api/v3/partners/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    "connect": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    "escape": b"GET /api/v3/partners/%2e%2e/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n",
    "http_09": b"GET /api/v3/partners/x\r\n\r\n",
    "bad_version": b"GET /api/v3/partners/x HTTP/7.1\r\nHost: x\r\n\r\n",
    "no_colon_header": b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nJustAName\r\n\r\n",
    "bad_chunk_size": b"POST /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_input_gets_a_4xx_or_a_closed_connection(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, name: str) -> None:
    proxy = await start_proxy()
    status, data = await raw_request(proxy, HOSTILE[name])
    assert status == 0 or 400 <= status < 500, (status, data[:200])
    # whatever came in, nothing outside the rules reached the upstream
    for rec in fake.api_log:
        assert rec.path_qs.startswith(f"{API}/x") and rec.method in ("GET", "POST")
        assert "Injected" not in rec.headers and "X-Evil" not in rec.headers
    assert not any("admin" in r.path_qs for r in fake.api_log)
    # and the proxy still serves a valid request
    assert await get(http, proxy) == 200


async def test_garbage_interleaved_with_valid_requests(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()

    async def garbage(payload: bytes) -> int:
        return (await raw_request(proxy, payload))[0]

    async def valid(i: int) -> int:
        async with http.post(url(proxy, f"{API}/orders/{i}"), data=b"%d" % i) as resp:
            body = await resp.json()
            assert body["body_length"] == len(b"%d" % i)
            return resp.status

    jobs: list[Any] = []
    for i, payload in enumerate(list(HOSTILE.values()) * 3):
        jobs.append(garbage(payload))
        jobs.append(valid(i))
    results = await asyncio.gather(*jobs)
    assert results[1::2] == [200] * (len(results) // 2)
    valid_paths = {f"{API}/orders/{i}" for i in range(len(HOSTILE) * 3)}
    forwarded_valid = [r for r in fake.api_log if r.path_qs in valid_paths]
    assert len(forwarded_valid) == len(valid_paths)  # each valid request forwarded exactly once


async def test_slow_header_clients_do_not_starve_others(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    assert proxy.address is not None
    slow = []
    for _ in range(200):
        _, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
        writer.write(b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(writer)
    try:
        for _ in range(20):
            assert await get(http, proxy) == 200
    finally:
        for writer in slow:
            writer.transport.abort()
    assert all(r.headers.get("X-Slow") is None for r in fake.api_log)


async def test_slow_header_clients_are_closed_after_the_idle_timeout(
    start_proxy: StartProxy, fake: FakeNdovu, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.app

    monkeypatch.setattr(proxy.app, "CLIENT_IDLE_TIMEOUT", 0.3)
    proxy_ = await start_proxy()
    assert proxy_.address is not None
    reader, writer = await asyncio.open_connection(proxy_.address.host, proxy_.address.port)
    writer.write(b"GET /api/v3/partners/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, with nothing forwarded
    writer.close()
    assert fake.api_log == []
