"""End to end, in one process: a real proxy on loopback in front of a real fake Ndovu API."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import Proxy
from proxy.errors import TokenUnavailable
from tests import fakes
from tests.conftest import StartProxy, raw_request, url
from tests.fakes import FakeNdovu

API = "/api/v3/partners"


async def test_forwards_with_bearer_token_and_answers(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/products")) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert resp.headers["X-Request-ID"]
    assert body["count"] == 4
    async with http.get(url(proxy, f"{API}/orders?status=open&x=%20y")) as resp:
        echo = await resp.json()
    assert echo["query"] == "status=open&x=%20y"
    assert fake.api_log[-1].headers["Authorization"] == f"Bearer {fake.issued[0]}"


async def test_auth_call_has_the_documented_shape(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    await start_proxy()
    [call] = fake.auth_log
    assert call.method == "POST"
    assert call.path_qs == f"{API}/auth"
    scheme, _, value = call.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert __import__("base64").b64decode(value).decode("utf-8") == f"{fakes.CLIENT_ID}:{fakes.CLIENT_SECRET}"
    assert call.body == b""
    assert "Content-Type" not in call.headers
    assert call.headers["Accept"] == "application/json"


async def test_one_auth_call_for_many_sequential_and_concurrent_requests(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    for _ in range(20):
        async with http.get(url(proxy, f"{API}/products")) as resp:
            assert resp.status == 200

    async def one() -> int:
        async with http.get(url(proxy, f"{API}/echo")) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert statuses == [200] * 50
    assert fake.auth_calls == 1


async def test_first_requests_share_the_first_fetch(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.auth_gate = asyncio.Event()
    proxy = await start_proxy(wait_token=False)

    async def one() -> int:
        async with http.get(url(proxy, f"{API}/echo")) as resp:
            return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(10)]
    # every request is in and waits for a token (a request counts itself in flight, then asks
    # for the token without a pause), while the first auth call is held at the gate
    assert await fakes.eventually(lambda: proxy.stats.in_flight == 10 and len(fake.auth_log) >= 1), \
        (proxy.stats.in_flight, len(fake.auth_log))
    fake.auth_gate.set()
    assert await asyncio.gather(*tasks) == [200] * 10
    assert fake.auth_calls == 1


async def test_replays_a_401_with_a_byte_identical_body(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    fake.expire_all()  # the token the proxy holds is now dead upstream
    body = os.urandom(200_000)
    async with http.post(url(proxy, f"{API}/orders"), data=body, headers={"Content-Type": "application/x-thing"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Ndovu-Proxy-Retried"] == "1"
        echo = await resp.json()
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    first, second = fake.api_log
    assert first.body == second.body == body
    assert first.headers["Authorization"] != second.headers["Authorization"]
    assert second.headers["Content-Type"] == "application/x-thing"
    assert fake.auth_calls == 2
    assert proxy.stats.replays == 1


async def test_chunked_body_within_the_buffer_is_replayed(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    fake.expire_all()

    async def chunks() -> Any:
        for i in range(10):
            yield bytes([i]) * 1000

    async with http.post(url(proxy, f"{API}/upload"), data=chunks()) as resp:
        assert resp.status == 200
        assert resp.headers["X-Ndovu-Proxy-Retried"] == "1"
    assert fake.api_log[0].body == fake.api_log[1].body
    assert len(fake.api_log[1].body) == 10_000


async def test_a_burst_of_401s_on_one_token_causes_one_fetch(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    fake.expire_all()

    async def one() -> tuple[int, str | None]:
        async with http.get(url(proxy, f"{API}/echo")) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Ndovu-Proxy-Retried")

    results = await asyncio.gather(*(one() for _ in range(30)))
    assert all(status == 200 for status, _ in results)
    assert fake.auth_calls == 2  # the first token and one replacement


async def test_second_401_goes_back_to_the_client(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    hits = []

    async def always_401(request: web.Request) -> web.StreamResponse:
        hits.append(request.headers["Authorization"])
        return web.json_response({"error": "nope"}, status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    fake.api_faults["locked"] = always_401
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/locked")) as resp:
        assert resp.status == 401
        assert resp.headers["X-Ndovu-Proxy-Retried"] == "1"
        assert "X-Ndovu-Proxy-Error" not in resp.headers  # the partner's answer, not ours
        assert await resp.json() == {"error": "nope"}
    assert len(hits) == 2  # replayed once, never twice


@pytest.mark.parametrize(
    ("status", "challenge"),
    [(403, None), (401, 'Bearer error="insufficient_scope", scope="orders"'), (401, 'Bearer realm="x", error=invalid_request')],
)
async def test_no_replay_and_no_drop_for_other_refusals(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, status: int, challenge: str | None
) -> None:
    hits = []

    async def refuse(request: web.Request) -> web.StreamResponse:
        hits.append(1)
        headers = {"WWW-Authenticate": challenge} if challenge else {}
        return web.json_response({"error": "refused"}, status=status, headers=headers)

    fake.api_faults["guarded"] = refuse
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/guarded")) as resp:
        assert resp.status == status
        assert "X-Ndovu-Proxy-Retried" not in resp.headers
    assert hits == [1]
    assert fake.auth_calls == 1
    assert proxy.tokens is not None and proxy.tokens.current is not None


async def test_no_replay_for_a_body_over_the_replay_buffer(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"forwarding.replay_buffer_bytes": 1000})
    fake.expire_all()
    async with http.post(url(proxy, f"{API}/big"), data=b"x" * 5000) as resp:
        assert resp.status == 401
        assert "X-Ndovu-Proxy-Retried" not in resp.headers
    assert len(fake.api_log) == 1
    # the dead token was still dropped: the next request gets a fresh one and succeeds
    async with http.post(url(proxy, f"{API}/big"), data=b"x" * 5000) as resp:
        assert resp.status == 200
    assert fake.auth_calls == 2


async def test_retry_on_401_off_passes_the_401_through(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"forwarding.retry_on_401": False})
    fake.expire_all()
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 401
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 200
    assert proxy.stats.replays == 0


async def test_body_over_max_is_refused_with_413(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"forwarding.max_body_bytes": 10_000, "forwarding.replay_buffer_bytes": 1000})
    async with http.post(url(proxy, f"{API}/upload"), data=b"x" * 10_001) as resp:
        assert resp.status == 413
        assert resp.headers["X-Ndovu-Proxy-Error"] == "body_too_large"
        assert (await resp.json())["error"] == "body_too_large"
    assert fake.api_log == []
    async with http.post(url(proxy, f"{API}/upload"), data=b"x" * 10_000) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("replay_buffer", [1000, 100_000])
async def test_chunked_body_over_max_is_cut_with_413(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, replay_buffer: int
) -> None:
    proxy = await start_proxy({"forwarding.max_body_bytes": 50_000, "forwarding.replay_buffer_bytes": replay_buffer})

    async def chunks() -> Any:
        for _ in range(100):
            yield b"y" * 1000

    async with http.post(url(proxy, f"{API}/upload"), data=chunks()) as resp:
        assert resp.status == 413
        assert resp.headers["X-Ndovu-Proxy-Error"] == "body_too_large"
    # the upstream never got a whole request
    assert all(len(r.body) <= 50_000 for r in fake.api_log)
    assert fake.api_calls == 0


async def test_request_header_rules(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    headers = {
        "Authorization": "Basic app-own-credentials",
        "Proxy-Authorization": "Basic cHJveHk6cHJveHk=",
        "X-Proxy-Token": "whatever",
        "Connection": "keep-alive, X-Hop-Only",
        "X-Hop-Only": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Foo": "bar",
        "X-App-Header": "kept",
        "Cookie": "session=abc",
        "Accept": "application/vnd.thing+json",
    }
    async with http.get(url(proxy, f"{API}/headers"), headers=headers, skip_auto_headers=("Accept-Encoding", "User-Agent")) as resp:
        assert resp.status == 200
    seen = {k.lower(): v for k, v in fake.api_log[0].headers.items()}
    for gone in ("proxy-authorization", "x-proxy-token", "x-hop-only", "keep-alive", "te", "proxy-foo", "x-forwarded-for"):
        assert gone not in seen, gone
    assert seen["authorization"] == f"Bearer {fake.issued[0]}"
    assert seen["x-app-header"] == "kept"
    assert seen["cookie"] == "session=abc"
    assert seen["accept"] == "application/vnd.thing+json"
    assert seen["host"] == fake.url.split("//")[1]  # type: ignore[attr-defined]
    assert "accept-encoding" not in seen  # the proxy invents no compression
    assert "user-agent" not in seen


async def test_response_header_rules_and_compressed_bodies_pass_untouched(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    payload = gzip.compress(json.dumps({"big": "x" * 5000}).encode())

    async def compressed(_request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=payload, headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json",
            "Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1", "Keep-Alive": "timeout=9",
            "Proxy-Authenticate": "Basic", "X-Ndovu-Proxy-Error": "forged", "X-Partner": "kept",
        })
        return resp

    fake.api_faults["gz"] = compressed
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/gz"), headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == payload
        got = {k.lower() for k in resp.headers}
    assert {"x-upstream-hop", "keep-alive", "proxy-authenticate", "x-ndovu-proxy-error"}.isdisjoint(got)
    assert "x-partner" in got


async def test_redirects_go_back_to_the_client(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    async def moved(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"{API}/elsewhere"})

    fake.api_faults["moved"] = moved
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/moved"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{API}/elsewhere"
    assert fake.api_log == []  # /elsewhere was never asked for by the proxy


@pytest.mark.parametrize(("location", "rewritten"), [
    ("{up}/api/v3/partners/next?page=2", "http://{proxy}/api/v3/partners/next?page=2"),
    ("{UP}/api/v3/partners/next", "http://{proxy}/api/v3/partners/next"),  # scheme and host in any case
    ("{up}", "http://{proxy}"),
    ("/api/v3/partners/relative", "/api/v3/partners/relative"),  # relative: as it is
    ("https://elsewhere.example/api/v3/partners/x", "https://elsewhere.example/api/v3/partners/x"),
    ("{up}0/api/v3/partners/x", "{up}0/api/v3/partners/x"),  # another port that starts alike
], ids=["absolute", "case", "bare-origin", "relative", "other-host", "other-port"])
async def test_a_location_on_the_upstream_points_back_at_the_proxy(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, location: str, rewritten: str
) -> None:
    up = fake.url  # type: ignore[attr-defined]
    sent = location.format(up=up, UP=up.upper())

    async def moved(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": sent, "Content-Location": sent})

    fake.api_faults["moved"] = moved
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/moved"), allow_redirects=False) as resp:
        assert resp.status == 302
        expected = rewritten.format(up=up, proxy=str(proxy.address))
        # the app follows the redirect through the proxy, so the token stays behind it
        assert resp.headers["Location"] == expected
        assert resp.headers["Content-Location"] == expected


async def test_a_location_under_the_base_path_of_upstream_url_loses_the_base_path(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    """upstream.url with a base path (a gateway mounting the API): the proxy adds the base
    path to every request, so a Location under it comes back without it."""
    async def moved(request: web.Request) -> web.StreamResponse:
        return web.Response(status=303, headers={"Location": f"{fake.url}/gw/api/v3/partners/done"})  # type: ignore[attr-defined]

    fake.api_faults["gw/api/v3/partners/gwmoved"] = moved  # the fake sees the base path
    proxy = await start_proxy({"upstream.url": f"{fake.url}/gw",  # type: ignore[attr-defined]
                               "auth.token_path": f"{fake.url}/api/v3/partners/auth"})  # type: ignore[attr-defined]
    async with http.get(url(proxy, f"{API}/gwmoved"), allow_redirects=False) as resp:
        assert resp.headers["Location"] == f"http://{proxy.address}/api/v3/partners/done"


ESCAPES = [
    "/admin",
    "/api/v3/partners/../../../admin",
    "/api/v3/partners/..%2f..%2fadmin",
    "/api/v3/partners/..%2F..%2Fadmin",
    "/api/v3/partners/%2e%2e/%2e%2e/admin",
    "/api/v3/partners/%252e%252e/%252e%252e/admin",
    "/api/v3/partners/..%5c..%5cadmin",
    "/api/v3/partners\\..\\..\\admin",
    "/api/v3/partners/./../other",
    "/API/v3/partners/x",
    "/api/v3/partners",
]
UNDECODABLE = ["/api/v3/partners/%zz", "/api/v3/partners/%ff%fe", "/api/v3/partners/a%00b", "/api/v3/partners/%"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [(p, 403, "path_not_allowed") for p in ESCAPES] + [(p, 400, "bad_request") for p in UNDECODABLE],
)
async def test_paths_that_escape_or_cannot_be_decoded_are_refused(
    start_proxy: StartProxy, fake: FakeNdovu, path: str, status: int, code: str
) -> None:
    proxy = await start_proxy()
    got, data = await raw_request(proxy, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert got == status, data
    assert f"X-Ndovu-Proxy-Error: {code}".encode() in data
    assert fake.api_log == []


async def test_admitted_path_is_forwarded_as_received(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    target = "/api/v3/partners/files/a%2Fb/./c?q=%41"
    status, _ = await raw_request(proxy, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200
    assert fake.api_log[0].raw_path == target


@pytest.mark.parametrize(
    "line",
    [b"CONNECT evil.example:443 HTTP/1.1", b"GET http://evil.example/api/v3/partners/x HTTP/1.1"],
)
async def test_connect_and_absolute_form_are_refused(start_proxy: StartProxy, fake: FakeNdovu, line: bytes) -> None:
    proxy = await start_proxy()
    status, data = await raw_request(proxy, line + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 405
    assert b"method_not_allowed" in data
    assert fake.api_log == []


async def test_request_id_is_kept_forwarded_and_returned(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/x"), headers={"X-Request-ID": "req-123"}) as resp:
        assert resp.headers["X-Request-ID"] == "req-123"
    assert fake.api_log[0].headers["X-Request-ID"] == "req-123"
    async with http.get(url(proxy, "/nope"), headers={"X-Request-ID": "req-456"}) as resp:
        assert resp.status == 403
        assert resp.headers["X-Request-ID"] == "req-456"
    async with http.get(url(proxy, f"{API}/x")) as resp:
        generated = resp.headers["X-Request-ID"]
    assert len(generated) == 32 and fake.api_log[1].headers["X-Request-ID"] == generated


async def test_allowed_clients(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    shut = await start_proxy({"forwarding.allowed_clients": ["10.0.0.0/8", "::1/128"]})
    async with http.get(url(shut, f"{API}/x")) as resp:
        assert resp.status == 403
        assert resp.headers["X-Ndovu-Proxy-Error"] == "client_not_allowed"
    open_ = await start_proxy({"forwarding.allowed_clients": ["127.0.0.0/8"]})
    async with http.get(url(open_, f"{API}/x")) as resp:
        assert resp.status == 200


async def test_inbound_token(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"forwarding.inbound_token": "app-shared-Key-42"})
    for headers in ({}, {"X-Proxy-Token": "wrong"}, {"X-Proxy-Token": "app-shared-Key-4"}):
        async with http.get(url(proxy, f"{API}/x"), headers=headers) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "client_not_allowed"
    async with http.get(url(proxy, f"{API}/x"), headers={"X-Proxy-Token": "app-shared-Key-42"}) as resp:
        assert resp.status == 200
    assert len(fake.api_log) == 1
    assert "X-Proxy-Token" not in fake.api_log[0].headers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_refused_is_502(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({
        "upstream.url": f"http://127.0.0.1:{_free_port()}",
        "auth.token_path": f"{fake.url}/api/v3/partners/auth",  # type: ignore[attr-defined]
    })
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 502
        assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_unreachable"
        assert await resp.json() == {"error": "upstream_unreachable", "message": "cannot connect to the partner API"}


async def test_upstream_reset_is_502(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.api_faults["reset"] = fakes.reset()
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/reset")) as resp:
        assert resp.status == 502
        assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_unreachable"


async def test_upstream_stall_is_504(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    release = asyncio.Event()
    fake.api_faults["slow"] = fakes.stall(release)
    proxy = await start_proxy({"upstream.read_timeout": 0.2})
    try:
        async with http.get(url(proxy, f"{API}/slow")) as resp:
            assert resp.status == 504
            assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_timeout"
    finally:
        release.set()


async def test_no_token_is_503_with_retry_after(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.auth_faults = [fakes.status(500)] * 3
    proxy = await start_proxy({"auth.backoff_initial": 30, "auth.backoff_max": 60}, wait_token=False)
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Ndovu-Proxy-Error"] == "token_unavailable"
        assert 1 <= int(resp.headers["Retry-After"]) <= 30
        assert (await resp.json())["error"] == "token_unavailable"
    calls = fake.auth_calls
    # during the backoff: 503 at once, and no new token request
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 503
    assert fake.auth_calls == calls == 1
    assert fake.api_log == []


async def test_rejected_credentials_are_503_and_not_retried_hot(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, log_buffer: Any) -> None:
    fake.client_secret = "rotated-elsewhere"
    proxy = await start_proxy({"auth.backoff_initial": 30, "auth.backoff_max": 60}, wait_token=False)
    for _ in range(5):
        async with http.get(url(proxy, f"{API}/x")) as resp:
            assert resp.status == 503
    assert fake.auth_calls == 1
    lines = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    [failure] = [e for e in lines if e["event"] == "token_refresh_failed"]
    assert failure["level"] == "error"
    assert failure["reason"] == "credentials_rejected"
    assert "raw client secret" in failure["hint"]


async def test_response_streams_before_the_upstream_finishes(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    more = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first-part;")
        await more.wait()
        await resp.write(b"second-part")
        await resp.write_eof()
        return resp

    fake.api_faults["trickle"] = trickle
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/trickle")) as resp:
        first = await asyncio.wait_for(resp.content.readexactly(11), 5)
        assert first == b"first-part;"  # arrived while the upstream was still holding the rest
        more.set()
        assert await resp.read() == b"second-part"


async def test_request_body_streams_upstream_before_the_client_finishes(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    upstream_started = asyncio.Event()

    async def sink(request: web.Request) -> web.StreamResponse:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            upstream_started.set()
        return web.json_response({"received": total})

    fake.api_faults["sink"] = sink
    proxy = await start_proxy({"forwarding.replay_buffer_bytes": 1000})

    async def body() -> Any:
        yield b"a" * 5000
        await asyncio.wait_for(upstream_started.wait(), 5)  # only goes on once the upstream saw bytes
        yield b"b" * 5000

    async with http.post(url(proxy, f"{API}/sink"), data=body()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"received": 10_000}


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_cut_short_upstream_aborts_the_client_response(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, chunked: bool
) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if not chunked:
            resp.content_length = 100_000
        await resp.prepare(request)
        await resp.write(b"z" * 1000)
        assert request.transport is not None
        request.transport.close()  # a clean close, before the declared length or the last chunk
        return resp

    fake.api_faults["cut"] = cut
    proxy = await start_proxy()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url(proxy, f"{API}/cut")) as resp:
            assert resp.status == 200
            await resp.read()


@pytest.mark.parametrize("method", ["HEAD", "DELETE", "PUT", "PATCH", "OPTIONS"])
async def test_other_methods_pass(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, method: str) -> None:
    proxy = await start_proxy()
    async with http.request(method, url(proxy, f"{API}/things/1"), data=b"{}" if method in ("PUT", "PATCH") else None) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert fake.api_log[0].method == method
    assert (body == b"") == (method == "HEAD")


async def test_no_content_and_not_modified(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.api_faults["gone"] = fakes.raw(b"", code=204)

    async def same(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    fake.api_faults["same"] = same
    proxy = await start_proxy()
    async with http.delete(url(proxy, f"{API}/gone")) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    async with http.get(url(proxy, f"{API}/same"), headers={"If-None-Match": '"v1"'}) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == '"v1"'
    # the connection is still good for more
    async with http.get(url(proxy, f"{API}/products")) as resp:
        assert resp.status == 200


async def test_set_cookie_from_one_answer_never_reaches_another_request(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    async def sets_cookie(_request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers={"Set-Cookie": "partner_session=s1; Path=/"})

    fake.api_faults["login"] = sets_cookie
    proxy = await start_proxy()
    async with http.get(url(proxy, f"{API}/login")) as resp:
        assert resp.headers["Set-Cookie"].startswith("partner_session=")
    async with http.get(url(proxy, f"{API}/after")) as resp:
        assert resp.status == 200
    assert "Cookie" not in fake.api_log[-1].headers


async def test_access_log_has_one_event_per_request(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, log_buffer: Any) -> None:
    proxy = await start_proxy()
    fake.expire_all()
    async with http.get(url(proxy, f"{API}/things?secret_query=1"), headers={"X-Request-ID": "r-1"}) as resp:
        assert resp.status == 200
    async with http.get(url(proxy, "/forbidden")) as resp:
        assert resp.status == 403
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    access = [e for e in events if e["event"] == "access"]
    assert len(access) == 2
    first, second = access
    assert first["method"] == "GET"
    assert first["path"] == f"{API}/things"  # without the query string
    assert first["status"] == 200 and first["upstream_status"] == 200
    assert first["replayed"] is True and first["request_id"] == "r-1"
    assert isinstance(first["duration_ms"], float)
    assert second["status"] == 403 and second["upstream_status"] is None and second["replayed"] is False


async def test_refresh_before_expiry_with_no_request_failing(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    clock = fakes.FakeClock()
    fake.token_ttl = 100  # margin 60 is clamped to half of it: refresh at 50 s
    proxy = await start_proxy({"auth.refresh_margin": 60}, clock=clock)
    assert proxy.tokens is not None
    statuses = []
    for step in range(12):  # two minutes of traffic in 10 s steps
        await clock.advance(10)
        for _ in range(3):
            async with http.get(url(proxy, f"{API}/x")) as resp:
                statuses.append(resp.status)
        if step == 5:
            fake.revoke(fake.issued[0])  # the first token dies upstream after its rotation
    assert statuses == [200] * 36
    assert fake.auth_calls == 3  # at 50 s and at 100 s, never from a request
    assert fake.rejected_calls == 0
    assert proxy.stats.replays == 0


async def test_failed_refresh_keeps_the_current_token_until_it_expires(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    clock = fakes.FakeClock()
    fake.token_ttl = 100
    proxy = await start_proxy({"auth.refresh_margin": 20, "auth.backoff_initial": 5, "auth.backoff_max": 5}, clock=clock)
    fake.auth_faults = [fakes.status(503)] * 100
    await clock.advance(85)  # refresh due at 80 s: it fails, the token is still good
    assert fake.auth_calls >= 2
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 200
    await clock.advance(16)  # past the real expiry, still failing
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Ndovu-Proxy-Error"] == "token_unavailable"
    fake.auth_faults.clear()
    await clock.advance(6)  # the next backoff attempt succeeds
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 200


async def test_client_disconnect_mid_download_cancels_the_upstream(
    start_proxy: StartProxy, fake: FakeNdovu
) -> None:
    upstream_done = asyncio.Event()
    outcome: list[str] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(10_000):
                await resp.write(b"d" * 65536)
            outcome.append("finished")
        except (ConnectionError, asyncio.CancelledError):
            outcome.append("cut")
            raise
        finally:
            upstream_done.set()
        return resp

    fake.api_faults["endless"] = endless
    proxy = await start_proxy()
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
    writer.write(f"GET {API}/endless HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readexactly(100_000)
    writer.transport.abort()
    await asyncio.wait_for(upstream_done.wait(), 5)
    assert outcome == ["cut"]
    assert await fakes.eventually(lambda: proxy.stats.in_flight == 0), f"in_flight stays {proxy.stats.in_flight}"


async def test_proxy_listens_before_the_first_token(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.auth_gate = asyncio.Event()
    proxy: Proxy = await start_proxy(wait_token=False)
    async with http.get(url(proxy, "/not-api")) as resp:  # answered while the token is pending
        assert resp.status == 403
    fake.auth_gate.set()


async def test_expect_100_continue_is_answered_before_the_body(start_proxy: StartProxy, fake: FakeNdovu) -> None:
    proxy = await start_proxy()
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
    try:
        writer.write(f"POST {API}/orders HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode())
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # before any body byte
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert fake.api_log[0].body == b"hello"
    assert "Expect" not in fake.api_log[0].headers


async def test_upstream_connect_timeout_is_504(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    # a loopback listener that never accepts, its queue filled: new connections hang in SYN
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(0)
    port = sink.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        proxy = await start_proxy({
            "upstream.url": f"http://127.0.0.1:{port}",
            "upstream.connect_timeout": 0.3,
            "auth.token_path": f"{fake.url}/api/v3/partners/auth",  # type: ignore[attr-defined]
        })
        async with http.get(url(proxy, f"{API}/x")) as resp:
            assert resp.status == 504
            assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_timeout"
    finally:
        for s in fillers:
            s.close()
        sink.close()


async def test_token_events_in_the_log(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, log_buffer: Any) -> None:
    fake.auth_faults = [fakes.status(400)]
    clock = fakes.FakeClock()
    proxy = await start_proxy({"auth.backoff_initial": 2, "auth.backoff_max": 2}, clock=clock, wait_token=False)
    assert proxy.tokens is not None
    with pytest.raises(TokenUnavailable):
        await proxy.tokens.get()  # shares the first, failing, fetch
    await clock.advance(2)
    await proxy.tokens.get()
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    failed = next(e for e in events if e["event"] == "token_refresh_failed")
    assert failed["level"] == "error" and failed["status"] == 400 and "malformed" in failed["hint"]
    assert 1 <= failed["next_attempt_in_s"] <= 2
    acquired = next(e for e in events if e["event"] == "token_acquired")
    assert acquired["lifetime_s"] == 3600 and acquired["generation"] == 1
    assert proxy.tokens is not None and proxy.tokens.current is not None


async def test_debug_level_shows_the_auth_call_and_upstream_connections_without_a_secret(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, log_buffer: io.StringIO
) -> None:
    proxy = await start_proxy()  # logs at debug level into log_buffer
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 200
    await proxy.stop()  # the pooled connection closes
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines() if line.startswith("{")]
    auth = [e for e in events if e["event"] == "auth_request"]
    assert auth and auth[0]["url"] == f"{fake.url}{API}/auth" and auth[0]["status"] == 200  # type: ignore[attr-defined]
    assert isinstance(auth[0]["duration_ms"], float)
    peer = fake.url.removeprefix("http://")  # type: ignore[attr-defined]
    assert [e["peer"] for e in events if e["event"] == "upstream_connection_opened"] == [peer]
    closed = [e for e in events if e["event"] == "upstream_connection_closed"]
    assert [e["peer"] for e in closed] == [peer] and closed[0]["by"] == "proxy"
    # the fixture checks after the test that no secret or token is anywhere in the log
