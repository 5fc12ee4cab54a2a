"""The admin listener: health, readiness that follows the token, metrics, token state."""

from __future__ import annotations

import asyncio
import re

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Proxy
from tests import fakes
from tests.conftest import StartProxy, url
from tests.fakes import CLIENT_SECRET, FakeNdovu

API = "/api/v3/partners"


def admin(proxy: Proxy, path: str) -> str:
    return f"http://{proxy.admin_address}{path}"


async def get_json(http: aiohttp.ClientSession, where: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with http.get(where) as resp:
        return resp.status, await resp.json()


async def scrape(http: aiohttp.ClientSession, proxy: Proxy) -> dict[str, dict[tuple, float]]:  # type: ignore[type-arg]
    async with http.get(admin(proxy, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, dict[tuple, float]] = {}  # type: ignore[type-arg]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_healthz_and_readyz_follow_the_token(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    clock = fakes.FakeClock()
    fake.auth_gate = asyncio.Event()
    fake.token_ttl = 100
    proxy = await start_proxy({"auth.backoff_initial": 30, "auth.backoff_max": 30}, clock=clock, wait_token=False)
    assert (await get_json(http, admin(proxy, "/healthz")))[0] == 200
    status, body = await get_json(http, admin(proxy, "/readyz"))
    assert status == 503 and body["ready"] is False and body["reason"] == "no token yet"
    fake.auth_gate.set()
    assert proxy.tokens is not None
    await proxy.tokens.get()
    assert (await get_json(http, admin(proxy, "/readyz")))[0] == 200
    fake.auth_faults = [fakes.status(503)] * 10
    await clock.advance(101)  # the refresh failed and the token ran out
    status, body = await get_json(http, admin(proxy, "/readyz"))
    assert status == 503 and body["last_error"] == "auth_unreachable"
    assert (await get_json(http, admin(proxy, "/healthz")))[0] == 200


async def test_tokenz_shows_state_never_the_token(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.auth_gate = asyncio.Event()
    proxy = await start_proxy(wait_token=False)
    status, before = await get_json(http, admin(proxy, "/tokenz"))
    assert status == 200
    assert before == {"generation": None, "obtained_at": None, "expires_at": None, "seconds_left": None, "fingerprint": None, "last_error": None}
    fake.auth_gate.set()
    assert proxy.tokens is not None
    await proxy.tokens.get()
    async with http.get(admin(proxy, "/tokenz")) as resp:
        raw = await resp.text()
        state = await resp.json()
    assert state["generation"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", state["obtained_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", state["expires_at"])
    assert 3500 < state["seconds_left"] <= 3600
    import hashlib

    assert state["fingerprint"] == hashlib.sha256(fake.issued[0].encode()).hexdigest()[:12]
    assert fake.issued[0] not in raw and fake.issued[0].split(".")[1] not in raw


async def test_metrics(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    fake.expire_all()
    async with http.post(url(proxy, f"{API}/a"), data=b"x") as resp:  # replayed
        assert resp.status == 200
    for _ in range(3):
        async with http.get(url(proxy, f"{API}/b")) as resp:
            assert resp.status == 200
    async with http.get(url(proxy, "/outside")) as resp:
        assert resp.status == 403
    async with http.request("PROPFIND", url(proxy, f"{API}/dav")) as resp:
        assert resp.status == 200
    m = await scrape(http, proxy)
    requests = m["ndovu_proxy_requests_total"]
    assert requests[(("method", "GET"), ("status_class", "2xx"))] == 3
    assert requests[(("method", "POST"), ("status_class", "2xx"))] == 1
    assert requests[(("method", "GET"), ("status_class", "4xx"))] == 1
    assert requests[(("method", "other"), ("status_class", "2xx"))] == 1  # no label per made-up method
    assert m["ndovu_proxy_replays_total"][()] == 1
    # one observation per upstream attempt: 2 for the replayed POST, 3 GETs, 1 PROPFIND
    assert m["ndovu_proxy_upstream_latency_seconds_count"][()] == 6
    assert m["ndovu_proxy_upstream_latency_seconds_bucket"][(("le", "+Inf"),)] == 6
    fetches = m["ndovu_proxy_token_fetches_total"]
    assert fetches[(("result", "success"),)] == 2
    assert fetches[(("result", "rejected"),)] == 0 and fetches[(("result", "error"),)] == 0
    assert 3500 < m["ndovu_proxy_token_expires_in_seconds"][()] <= 3600
    assert m["ndovu_proxy_in_flight_requests"][()] == 0
    # six exchanges one after another on one kept-alive connection, the 401's included
    assert m["ndovu_proxy_upstream_connections_opened_total"][()] == 1


async def test_in_flight_gauge_counts_open_requests(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    gate = fakes.Gate("ok")
    fake.api_faults["slow"] = gate
    proxy = await start_proxy()
    pending = asyncio.create_task(http.get(url(proxy, f"{API}/slow")))
    await asyncio.wait_for(gate.reached.wait(), 5)
    assert (await scrape(http, proxy))["ndovu_proxy_in_flight_requests"][()] == 1
    gate.release.set()
    (await pending).release()


async def test_rejected_fetches_are_counted(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    fake.client_secret = "other"
    proxy = await start_proxy({"auth.backoff_initial": 60, "auth.backoff_max": 60}, wait_token=False)
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 503
    m = await scrape(http, proxy)
    assert m["ndovu_proxy_token_fetches_total"][(("result", "rejected"),)] == 1
    assert m["ndovu_proxy_token_expires_in_seconds"][()] == 0
    status, state = await get_json(http, admin(proxy, "/tokenz"))
    assert state["last_error"] == "credentials_rejected"


async def test_no_admin_body_shows_a_secret_a_token_or_a_header(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy({"forwarding.inbound_token": "inbound-Secret-1"})
    async with http.get(url(proxy, f"{API}/x"), headers={"X-Proxy-Token": "inbound-Secret-1", "X-Custom": "hdr-value-9"}) as resp:
        assert resp.status == 200
    for path in ("/healthz", "/readyz", "/metrics", "/tokenz", "/nothing"):
        async with http.get(admin(proxy, path)) as resp:
            text = await resp.text() + str(resp.headers)
        for secret in (CLIENT_SECRET, *fake.issued, "inbound-Secret-1", "hdr-value-9"):
            assert secret not in text, (path, secret)


async def test_admin_listener_can_be_off(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"admin_listen": "off"})
    assert proxy.admin_address is None


async def test_admin_answers_only_what_it_has(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    async with http.get(admin(proxy, "/nope")) as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    async with http.post(admin(proxy, "/healthz"), data=b"x") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"
    async with http.head(admin(proxy, "/healthz")) as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with http.get(admin(proxy, "/healthz?verbose=1")) as resp:
        assert resp.status == 200  # the query string does not change the route
    assert proxy.admin_address is not None
    reader, writer = await asyncio.open_connection(proxy.admin_address.host, proxy.admin_address.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    writer.close()


async def test_readyz_says_draining_from_the_start_of_shutdown(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy()
    assert (await get_json(http, admin(proxy, "/readyz")))[0] == 200
    proxy.begin_draining()  # what SIGTERM does first; the listener still accepts
    status, body = await get_json(http, admin(proxy, "/readyz"))
    assert status == 503
    assert body == {"ready": False, "reason": "draining", "last_error": None}
    async with http.get(url(proxy, f"{API}/x")) as resp:
        assert resp.status == 200
    assert (await get_json(http, admin(proxy, "/healthz")))[0] == 200


async def test_readyz_says_draining_while_requests_drain(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    gate = fakes.Gate("ok")
    fake.api_faults["slow"] = gate
    proxy = await start_proxy()
    pending = asyncio.create_task(http.get(url(proxy, f"{API}/slow")))
    await asyncio.wait_for(gate.reached.wait(), 5)
    stopping = asyncio.create_task(proxy.stop())  # shutdown_delay 0: the listener closes at once
    try:
        status, body = await get_json(http, admin(proxy, "/readyz"))
        assert status == 503 and body["reason"] == "draining"
    finally:
        gate.release.set()
        (await pending).release()
        await stopping
