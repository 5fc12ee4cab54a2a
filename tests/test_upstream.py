"""The lean upstream client: TLS, base paths, connection reuse and the keep-alive race."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.app import make_upstream
from proxy.config import UpstreamSettings
from tests import fakes
from tests.conftest import StartProxy, url
from tests.fakes import FakeNdovu

API = "/api/v3/partners"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing (Debian package openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def tls_fake(aiohttp_server: Any, certificate: tuple[Path, Path]) -> tuple[FakeNdovu, str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certificate)
    fake = FakeNdovu()
    server = await aiohttp_server(fake.app(), ssl=ctx)
    return fake, f"https://127.0.0.1:{server.port}"


async def test_https_upstream_with_an_extra_ca(aiohttp_server: Any, certificate: tuple[Path, Path],
                                               start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    fake, base = await tls_fake(aiohttp_server, certificate)
    proxy = await start_proxy({"upstream.url": base, "upstream.ca_file": str(certificate[0])})
    async with http.get(url(proxy, f"{API}/secure")) as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == f"{API}/secure"


async def test_https_upstream_is_verified(aiohttp_server: Any, certificate: tuple[Path, Path],
                                          start_proxy: StartProxy, http: aiohttp.ClientSession, fake: FakeNdovu) -> None:
    tls, base = await tls_fake(aiohttp_server, certificate)
    # the token comes from the plain fake; the API from the TLS one, whose CA is not trusted
    proxy = await start_proxy({"upstream.url": base, "auth.token_path": f"{fake.url}/api/v3/partners/auth"})  # type: ignore[attr-defined]
    async with http.get(url(proxy, f"{API}/secure")) as resp:
        assert resp.status == 502
        assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_unreachable"
    assert tls.api_log == []
    insecure = await start_proxy({"upstream.url": base, "upstream.tls_verify": False,
                                  "auth.token_path": f"{fake.url}/api/v3/partners/auth"})  # type: ignore[attr-defined]
    async with http.get(url(insecure, f"{API}/secure")) as resp:
        assert resp.status in (200, 401)  # reached: the TLS fake knows none of the plain fake's tokens


async def test_base_path_of_upstream_url_is_kept(aiohttp_server: Any, start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        if request.path.endswith("/auth"):
            return web.json_response({"access_token": "t0k", "expires_in": 60, "token_type": "Bearer"})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)
    proxy = await start_proxy({"upstream.url": f"http://127.0.0.1:{server.port}/gateway/v1/"})
    async with http.get(url(proxy, f"{API}/x?y=1")) as resp:
        assert resp.status == 200
    assert seen == ["/gateway/v1/api/v3/partners/auth", f"/gateway/v1{API}/x?y=1"]


async def test_connections_are_reused_unless_told_to_close(aiohttp_server: Any, start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    peers: list[Any] = []

    async def anything(request: web.Request) -> web.Response:
        if request.path.endswith("/auth"):
            return web.json_response({"access_token": "t0k", "expires_in": 60, "token_type": "Bearer"})
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        headers = {"Connection": "close"} if request.path.endswith("/closing") else {}
        return web.Response(text="ok", headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)
    proxy = await start_proxy({"upstream.url": f"http://127.0.0.1:{server.port}"})
    for _ in range(5):
        async with http.get(url(proxy, f"{API}/same")) as resp:
            assert resp.status == 200
    assert len(set(peers)) == 1  # one keep-alive connection for five sequential requests
    peers.clear()
    for _ in range(3):
        async with http.get(url(proxy, f"{API}/closing")) as resp:
            assert resp.status == 200
    assert len(set(peers)) == 3  # a fresh connection after each `Connection: close`


async def test_a_pooled_connection_closed_by_the_origin_is_not_a_failure(aiohttp_server: Any, start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    async def anything(request: web.Request) -> web.Response:
        if request.path.endswith("/auth"):
            return web.json_response({"access_token": "t0k", "expires_in": 60, "token_type": "Bearer"})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    # the origin drops idle connections fast (not so fast that a busy machine's new connection
    # is dropped before the proxy writes its request: that would be a real failure)
    server = await aiohttp_server(app, keepalive_timeout=0.2)
    proxy = await start_proxy({"upstream.url": f"http://127.0.0.1:{server.port}"})
    import asyncio

    for _ in range(5):
        async with http.get(url(proxy, f"{API}/x")) as resp:
            assert resp.status == 200
        await asyncio.sleep(0.3)  # the subject: idle longer than the origin keeps a connection


async def test_requests_wait_for_a_connection_when_the_pool_is_full(start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession) -> None:
    import asyncio

    gate = fakes.Gate("slow")
    fake.api_faults["slow"] = gate
    proxy = await start_proxy({"upstream.max_connections": 1})
    first = asyncio.create_task(http.get(url(proxy, f"{API}/slow")))
    await asyncio.wait_for(gate.reached.wait(), 5)
    second = asyncio.create_task(http.get(url(proxy, f"{API}/quick")))
    done, _ = await asyncio.wait({second}, timeout=0.3)
    assert not done  # waiting for the one connection, not failing
    gate.release.set()
    for task in (first, second):
        resp = await asyncio.wait_for(task, 5)
        assert resp.status == 200
        resp.release()


async def test_a_request_that_gives_up_waiting_for_a_connection_leaks_no_slot(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession
) -> None:
    import asyncio

    gate = fakes.Gate("slow")
    fake.api_faults["slow"] = gate
    proxy = await start_proxy({"upstream.max_connections": 1})
    assert proxy.address is not None and proxy.upstream is not None
    first = asyncio.create_task(http.get(url(proxy, f"{API}/slow")))
    await asyncio.wait_for(gate.reached.wait(), 5)
    # a client waits for the one connection, then goes away
    reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
    writer.write(f"GET {API}/gone HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    pool = proxy.upstream
    # no event tells of a place in the pool's queue: a bounded poll on it
    assert await fakes.eventually(lambda: bool(pool._waiting))  # noqa: SLF001 - the subject: queued for a slot
    writer.transport.abort()
    assert await fakes.eventually(lambda: pool._waiting[0].cancelled())  # noqa: SLF001 - it gave up
    gate.release.set()
    resp = await asyncio.wait_for(first, 5)
    assert resp.status == 200
    resp.release()
    for _ in range(3):  # the slot came back: later requests get the connection
        async with http.get(url(proxy, f"{API}/after")) as again:
            assert again.status == 200
    assert [r.path_qs for r in fake.api_log] == [f"{API}/after"] * 3


@pytest.mark.parametrize(("method", "expected"), [("GET", 200), ("DELETE", 200), ("POST", 502)])
async def test_a_pooled_connection_reset_before_any_answer_is_retried_only_when_idempotent(
    start_proxy: StartProxy, fake: FakeNdovu, http: aiohttp.ClientSession, method: str, expected: int
) -> None:
    import asyncio
    import socket
    import struct

    resets: list[str] = []
    writers: list[asyncio.StreamWriter] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers the first request on a connection; resets the connection on the second."""
        writers.append(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                served += 1
                if served == 2:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    resets.append(head.split(b" ")[0].decode())
                    writer.transport.abort()  # RST: the origin dropped it, answer unsent
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy({"upstream.url": f"http://127.0.0.1:{port}",
                                   "auth.token_path": f"{fake.url}/api/v3/partners/auth"})  # type: ignore[attr-defined]
        async with http.get(url(proxy, f"{API}/first")) as resp:
            assert resp.status == 200
        async with http.request(method, url(proxy, f"{API}/second"), data=b"x" if method == "POST" else None) as resp:
            assert resp.status == expected
            if expected == 502:
                assert resp.headers["X-Ndovu-Proxy-Error"] == "upstream_unreachable"
        assert resets == [method]  # the reset happened on the reused connection, once
    finally:
        server.close()
        for writer in writers:  # from 3.12 on, wait_closed waits for every connection too
            writer.transport.abort()
        await server.wait_closed()


async def test_ca_file_is_trusted_besides_the_systems_cas(aiohttp_server: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # "the system's CAs" are what OpenSSL's SSL_CERT_FILE names: one CA there, another in
    # ca_file, and an origin signed by each; both verify
    system_ca, extra_ca = trustme.CA(), trustme.CA()
    system_pem, extra_pem = tmp_path / "system.pem", tmp_path / "extra.pem"
    system_ca.cert_pem.write_to_path(str(system_pem))
    extra_ca.cert_pem.write_to_path(str(extra_pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(system_pem))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    for ca in (system_ca, extra_ca):
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_tls)
        app = web.Application()
        app.router.add_get("/", ok)
        server = await aiohttp_server(app, ssl=server_tls)
        pool = make_upstream(UpstreamSettings(
            url=f"https://127.0.0.1:{server.port}", connect_timeout=5, read_timeout=5, tls_verify=True,
            ca_file=str(extra_pem), max_connections=1))
        try:
            response = await pool.send("GET", "/", [], None)
            assert response.status == 200
            assert response.body is not None and await response.body.read_all() == b"ok"
            response.release()
        finally:
            await pool.close()  # the idle connection, closed and waited for
