"""Several routes in one process: each its own listener, upstream and credentials; token caches
shared only by routes with the same (token URL, client id, style, scope, audience)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import config, logs
from proxy.app import Proxy
from tests.conftest import assert_no_secrets
from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu, eventually
from tests.procs import MakeCommand

OTHER_ID, OTHER_SECRET = "partner-9", "an0ther-s3cret"
StartRoutes = Callable[[str], Awaitable[Proxy]]


@pytest.fixture
async def other(aiohttp_server: Any) -> FakeNdovu:
    """A second partner API, which knows only the second client."""
    fake = FakeNdovu()
    fake.client_id, fake.client_secret = OTHER_ID, OTHER_SECRET
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def start_routes(tmp_path: Path, fake: FakeNdovu, other: FakeNdovu,
                       log_buffer: io.StringIO) -> AsyncIterator[StartRoutes]:
    """start_routes(yaml) -> a running Proxy with that config file; the log is checked for
    either client's secret and every token either fake issued afterwards."""
    started: list[Proxy] = []

    async def start(text: str) -> Proxy:
        path = tmp_path / f"routes{len(started)}.yaml"
        path.write_text(text)
        proxy = Proxy(config.load({"config": str(path)}, {}))
        logs.configure("debug", "json", stream=log_buffer, redactor=proxy.redactor, cache=False)
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()
    assert_no_secrets(log_buffer.getvalue(), fake, started)
    assert_no_secrets(log_buffer.getvalue(), other, started)
    assert OTHER_SECRET not in log_buffer.getvalue()


def two_partners(fake: FakeNdovu, other: FakeNdovu, extra: str = "") -> str:
    return f"""
admin_listen: 127.0.0.1:0
shutdown_timeout: 2
upstream: {{url: "{fake.url}"}}
auth: {{client_id: {CLIENT_ID}, client_secret: "{CLIENT_SECRET}"}}
routes:
  - name: prod
    listen: 127.0.0.1:0
  - name: other
    listen: 127.0.0.1:0
    upstream: {{url: "{other.url}"}}
    auth: {{client_id: {OTHER_ID}, client_secret: "{OTHER_SECRET}"}}
{extra}"""


async def ready(proxy: Proxy) -> None:
    for lane in proxy.lanes:
        await asyncio.wait_for(lane.tokens.get(), 5)


def lane_url(proxy: Proxy, name: str, path: str) -> str:
    lane = next(lane for lane in proxy.lanes if lane.route.name == name)
    return f"http://{lane.address}{path}"


async def test_each_route_reaches_its_own_upstream_with_its_own_token(
    start_routes: StartRoutes, fake: FakeNdovu, other: FakeNdovu, http: aiohttp.ClientSession,
) -> None:
    proxy = await start_routes(two_partners(fake, other))
    await ready(proxy)
    for _ in range(3):
        for name in ("prod", "other"):
            async with http.get(lane_url(proxy, name, "/api/v3/partners/echo")) as resp:
                assert resp.status == 200, await resp.text()
    assert fake.api_calls == 3 and other.api_calls == 3
    assert fake.auth_calls == 1 and other.auth_calls == 1
    # one client's token never reaches the other's upstream
    sent_to_fake = {rec.headers["Authorization"] for rec in fake.api_log}
    sent_to_other = {rec.headers["Authorization"] for rec in other.api_log}
    assert sent_to_fake == {f"Bearer {t}" for t in fake.issued}
    assert sent_to_other == {f"Bearer {t}" for t in other.issued}
    assert not sent_to_fake & sent_to_other


async def test_a_401_on_one_route_leaves_the_other_routes_token_alone(
    start_routes: StartRoutes, fake: FakeNdovu, other: FakeNdovu, http: aiohttp.ClientSession,
) -> None:
    proxy = await start_routes(two_partners(fake, other))
    await ready(proxy)
    other_token = next(lane.tokens.current for lane in proxy.lanes if lane.route.name == "other")
    fake.revoke(fake.issued[0])
    async with http.get(lane_url(proxy, "prod", "/api/v3/partners/echo")) as resp:
        assert resp.status == 200 and resp.headers["X-Ndovu-Proxy-Retried"] == "1"
    assert fake.auth_calls == 2 and other.auth_calls == 1
    assert next(lane.tokens.current for lane in proxy.lanes if lane.route.name == "other") is other_token


async def test_routes_with_one_cache_key_share_one_token(
    start_routes: StartRoutes, fake: FakeNdovu, other: FakeNdovu, http: aiohttp.ClientSession,
) -> None:
    # same token URL and client: one cache, one auth call; each route keeps its own rules
    proxy = await start_routes(two_partners(fake, other, f"""
  - name: narrow
    listen: 127.0.0.1:0
    forwarding: {{allowed_paths: ["/api/v3/partners/products"]}}
"""))
    await ready(proxy)
    prod, narrow = (next(lane for lane in proxy.lanes if lane.route.name == n) for n in ("prod", "narrow"))
    assert prod.tokens is narrow.tokens
    async with http.get(lane_url(proxy, "narrow", "/api/v3/partners/products")) as resp:
        assert resp.status == 200
    async with http.get(lane_url(proxy, "narrow", "/api/v3/partners/echo")) as resp:
        assert resp.status == 403 and resp.headers["X-Ndovu-Proxy-Error"] == "path_not_allowed"
    async with http.get(lane_url(proxy, "prod", "/api/v3/partners/echo")) as resp:
        assert resp.status == 200
    assert fake.auth_calls == 1


async def test_admin_speaks_of_every_route(
    start_routes: StartRoutes, fake: FakeNdovu, other: FakeNdovu, http: aiohttp.ClientSession,
) -> None:
    # the other route's secret is wrong: that route never gets a token
    text = two_partners(fake, other).replace(f'client_secret: "{OTHER_SECRET}"', 'client_secret: "wrong"')
    proxy = await start_routes(text)
    admin = f"http://{proxy.admin_address}"
    await asyncio.wait_for(proxy.lanes[0].tokens.get(), 5)
    other_lane = next(lane for lane in proxy.lanes if lane.route.name == "other")
    assert await eventually(lambda: other_lane.tokens.last_error is not None)
    async with http.get(f"{admin}/readyz") as resp:
        doc = await resp.json()
        assert resp.status == 503
    assert doc["ready"] is False and set(doc["routes"]) == {"other"}
    assert doc["routes"]["other"] == "no valid token: credentials_rejected"
    assert "other" in doc["reason"] and doc["last_error"] == "credentials_rejected"
    async with http.get(f"{admin}/tokenz") as resp:
        tokenz = await resp.json()
    assert set(tokenz) == {"routes"} and set(tokenz["routes"]) == {"prod", "other"}
    assert tokenz["routes"]["prod"]["generation"] == 1 and tokenz["routes"]["prod"]["last_error"] is None
    assert tokenz["routes"]["other"]["generation"] is None
    assert tokenz["routes"]["other"]["last_error"] == "credentials_rejected"
    async with http.get(lane_url(proxy, "prod", "/api/v3/partners/echo")) as resp:
        assert resp.status == 200
    async with http.get(lane_url(proxy, "other", "/api/v3/partners/echo")) as resp:
        assert resp.status == 503 and resp.headers["X-Ndovu-Proxy-Error"] == "token_unavailable"
    async with http.get(f"{admin}/metrics") as resp:
        metrics = await resp.text()
    assert 'ndovu_proxy_requests_total{method="GET",route="prod",status_class="2xx"} 1.0' in metrics
    assert 'ndovu_proxy_requests_total{method="GET",route="other",status_class="5xx"} 1.0' in metrics
    assert 'ndovu_proxy_token_fetches_total{result="rejected",route="other"}' in metrics
    assert 'ndovu_proxy_token_fetches_total{result="success",route="prod"} 1.0' in metrics
    assert 'ndovu_proxy_in_flight_requests{route="prod"} 0.0' in metrics
    # one histogram per route
    assert metrics.count('ndovu_proxy_upstream_latency_seconds_count{route=') == 2
    assert 'ndovu_proxy_upstream_connections_opened_total{route="prod"} 1.0' in metrics


async def test_readyz_is_ready_once_every_route_holds_a_token(
    start_routes: StartRoutes, fake: FakeNdovu, other: FakeNdovu, http: aiohttp.ClientSession,
) -> None:
    proxy = await start_routes(two_partners(fake, other))
    await ready(proxy)
    async with http.get(f"http://{proxy.admin_address}/readyz") as resp:
        assert resp.status == 200 and await resp.json() == {"ready": True}


async def test_access_and_token_events_name_their_route(
    start_routes: StartRoutes, fake: FakeNdovu, other: FakeNdovu, http: aiohttp.ClientSession,
    log_buffer: io.StringIO,
) -> None:
    proxy = await start_routes(two_partners(fake, other))
    await ready(proxy)
    async with http.get(lane_url(proxy, "other", "/api/v3/partners/echo")) as resp:
        assert resp.status == 200
    logs.flush()
    lines = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    access = [e for e in lines if e["event"] == "access"]
    assert [(e["route"], e["status"]) for e in access] == [("other", 200)]
    acquired = sorted(e["route"] for e in lines if e["event"] == "token_acquired")
    assert acquired == ["other", "prod"]
    listening = sorted(e["route"] for e in lines if e["event"] == "listening")
    assert listening == ["other", "prod"]


async def test_without_routes_lines_and_metrics_have_no_route(
    start_proxy: Any, http: aiohttp.ClientSession, log_buffer: io.StringIO,
) -> None:
    proxy = await start_proxy()
    async with http.get(f"http://{proxy.address}/api/v3/partners/echo") as resp:
        assert resp.status == 200
    async with http.get(f"http://{proxy.admin_address}/metrics") as resp:
        assert "route=" not in await resp.text()
    logs.flush()
    assert all("route" not in json.loads(line) for line in log_buffer.getvalue().splitlines())


def test_route_errors_name_the_route(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
auth: {client_id: top, client_secret: s}
routes:
  - name: prod
    listen: 127.0.0.1:8080
    upstream: {url: "ftp://nope", read_timout: 3}
  - name: prod
    listen: 127.0.0.1:8080
  - listen: 127.0.0.1:8082
    auth: {scope: x}
    color: blue
  - name: "bad name"
""")
    with pytest.raises(config.ConfigErrors) as caught:
        config.load({"config": str(path)}, {"NDOVU_PROXY_LISTEN": "127.0.0.1:9"})
    assert [str(e) for e in caught.value.errors] == [
        "routes[prod].upstream.read_timout: unknown key; did you mean upstream.read_timeout?",
        "routes[2].color: unknown key",
        "listen: set by env NDOVU_PROXY_LISTEN, but with routes: every route has its own listen address "
        "(routes[NAME].listen)",
        "routes[prod].upstream.url: not a valid http(s) URL",
        "routes[prod].name: 'prod' names two routes",
        "routes[2].name: missing; every route needs a unique name",
        "routes[2].auth.scope: only with auth.style client_secret_basic or client_secret_post "
        "(Ndovu's auth call takes no body)",
        "routes[3].name: letters, digits, '_', '.' and '-' only, starting with a letter or digit, at most 63 characters",
        "routes[3].listen: missing; every route has its own listen address",
    ]


def test_a_route_listen_twice_is_an_error_and_env_sets_only_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
routes:
  - {name: a, listen: "127.0.0.1:8080"}
  - {name: b, listen: "127.0.0.1:8080", auth: {client_id: own-id}}
""")
    env = {"NDOVU_CLIENT_ID": "env-id", "NDOVU_CLIENT_SECRET": "s"}
    with pytest.raises(config.ConfigErrors, match=r"routes\[b\]\.listen: 127.0.0.1:8080 is routes\[a\]\.listen too"):
        config.load({"config": str(path)}, env)
    path.write_text(path.read_text().replace('"127.0.0.1:8080", auth', '"127.0.0.1:8081", auth'))
    settings = config.load({"config": str(path), "upstream.url": "http://127.0.0.1:9"}, env)
    assert [(r.name, r.auth.client_id, r.upstream.url) for r in settings.routes] == [
        ("a", "env-id", "http://127.0.0.1:9"), ("b", "own-id", "http://127.0.0.1:9")]
    assert settings.named_routes


def test_the_examples_commented_routes_are_valid(tmp_path: Path) -> None:
    """config.example.yaml's commented multi-route example, uncommented, loads."""
    example = (Path(__file__).parent.parent / "config.example.yaml").read_text()
    block = example[example.index("# routes:"):]
    lines = [line[2:] if line.startswith("# ") else line for line in block.splitlines()]
    text = example[:example.index("# routes:")].replace('listen: "127.0.0.1:8080"', "") + "\n".join(lines)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    settings = config.load({"config": str(path)}, {"NDOVU_CLIENT_ID": "id", "NDOVU_CLIENT_SECRET": "s",
                                                  "PROD_SECRET_FILE": str(secret), "MERCHANT_42_SECRET": "m"})
    assert len(settings.routes) >= 2 and settings.named_routes


async def test_check_checks_every_route_and_exits_with_the_worst(
    command: MakeCommand, tmp_path: Path, fake: FakeNdovu, other: FakeNdovu,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(two_partners(fake, other).replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1")
                    .replace("  - name: other\n    listen: 127.0.0.1:1", "  - name: other\n    listen: 127.0.0.1:2"))
    cmd = command("check", "--config", str(path))
    assert await cmd.run() == 0, cmd.output()
    assert [line for line in cmd.stdout if line.startswith(("route:", "token:"))] == [
        "route:    prod (listen 127.0.0.1:1)", "token:    OK, lifetime 3600 s (the token itself is never shown)",
        "route:    other (listen 127.0.0.1:2)", "token:    OK, lifetime 3600 s (the token itself is never shown)",
    ]
    path.write_text(path.read_text().replace(f'client_secret: "{OTHER_SECRET}"', 'client_secret: "wrong"'))
    cmd = command("check", "--config", str(path))
    assert await cmd.run() == 2, cmd.output()
    assert sum(line.startswith("token:    OK") for line in cmd.stdout) == 1
    assert OTHER_SECRET not in cmd.output() and CLIENT_SECRET not in cmd.output()
