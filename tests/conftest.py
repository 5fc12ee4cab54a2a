"""Fixtures shared by the tests: a fake Ndovu API on loopback, a proxy started in-process in
front of it, and the captured log, checked after every test for leaked credentials.

`NDOVU_TEST_LOOP=uvloop` runs every test on uvloop, the loop the container image uses (CI
runs the suite both ways)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from proxy import config, logs
from proxy.app import Proxy
from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu
from tests.procs import Command, MakeCommand

StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def command() -> AsyncIterator[MakeCommand]:
    """command(*args, env=...) -> the real `ndovu-proxy` command, stopped after the test."""
    made: list[Command] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Command:
        cmd = Command(*args, env=env)
        made.append(cmd)
        return cmd

    yield make
    for cmd in made:
        await cmd.stop()


if os.environ.get("NDOVU_TEST_LOOP") == "uvloop":  # pytest-asyncio makes its loops from the policy
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """Everything the proxy logs during the test, at debug level, as JSON lines."""
    buf = io.StringIO()
    logs.configure("debug", "json", stream=buf, cache=False)
    yield buf


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeNdovu:
    fake = FakeNdovu()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


def proxy_settings(fake_url: str, overrides: dict[str, Any] | None = None) -> config.Settings:
    flags: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstream.url": fake_url,
        "auth.client_id": CLIENT_ID,
        "auth.client_secret": CLIENT_SECRET,
        "shutdown_timeout": 2,
        **(overrides or {}),
    }
    return config.load(flags, {})


@pytest.fixture
async def start_proxy(fake: FakeNdovu, log_buffer: io.StringIO) -> AsyncIterator[StartProxy]:
    """start_proxy(cfg={dotted key: value}, clock=None, wait_token=True) -> a running Proxy.

    After the test, the captured log must hold neither the client secret, nor its Basic
    encoding, nor any token the fake issued, nor any X-Proxy-Token."""
    started: list[Proxy] = []

    async def start(cfg: dict[str, Any] | None = None, clock: Any = None, wait_token: bool = True) -> Proxy:
        settings = proxy_settings(fake.url, cfg)  # type: ignore[attr-defined]
        proxy = Proxy(settings, clock=clock)
        logs.configure("debug", "json", stream=log_buffer, redactor=proxy.redactor, cache=False)
        await proxy.start()
        started.append(proxy)
        if wait_token:
            assert proxy.tokens is not None
            await asyncio.wait_for(proxy.tokens.get(), 5)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()
    assert_no_secrets(log_buffer.getvalue(), fake, started)


def assert_no_secrets(text: str, fake: FakeNdovu, proxies: list[Proxy] = ()) -> None:  # type: ignore[assignment]
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert CLIENT_SECRET not in text
    assert basic not in text
    for token in fake.issued:
        assert token not in text
        assert token.split(".")[2] not in text  # not even the signature part
    for proxy in proxies:
        inbound = proxy.settings.forwarding.inbound_token
        if inbound is not None:
            assert inbound.reveal() not in text


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client like a legacy app's: no decompression, no cookie memory."""
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def url(proxy: Proxy, path: str) -> str:
    return f"http://{proxy.address}{path}"


async def raw_request(proxy: Proxy, data: bytes, timeout: float = 5) -> tuple[int, bytes]:
    """Send raw bytes to the proxy; the status (0 when the connection closed without one) and
    everything read back."""
    assert proxy.address is not None
    reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
    try:
        writer.write(data)
        await writer.drain()
        got = await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()
    if not got.startswith(b"HTTP/"):
        return 0, got
    return int(got.split(b" ", 2)[1]), got
