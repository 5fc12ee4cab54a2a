"""auth.style client_secret_basic and client_secret_post: the OAuth2 client-credentials grant
(RFC 6749 §4.4) against real fakes on loopback, through the proxy, and with the real
`mock-upstream --style oauth2` and `check` commands."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus

import aiohttp
import pytest

from proxy.errors import AuthUnreachable, CredentialsRejected
from proxy.mock import MockNdovu
from proxy.ndovu import (
    HINT_400,
    HINT_401,
    MAX_ERROR_DESCRIPTION,
    NdovuAuth,
    form_encode,
    sanitize,
    secret_spellings,
    token_request,
)
from tests import fakes
from tests.conftest import StartProxy, url
from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu
from tests.procs import MakeCommand

FORM = "application/x-www-form-urlencoded"
#: CLIENT_SECRET as it travels in a form body: differs from the raw one the redactor knows
FORM_SECRET = quote_plus(CLIENT_SECRET, safe="")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type")) as s:
        yield s


@pytest.fixture
def oauth2(fake: FakeNdovu) -> FakeNdovu:
    """The recording fake, as an OAuth2 token endpoint."""
    fake.style = "oauth2"
    return fake


def source(fake: FakeNdovu, session: aiohttp.ClientSession, style: str, secret: str = CLIENT_SECRET,
           client_id: str = CLIENT_ID, **kw: Any) -> NdovuAuth:
    return NdovuAuth(session, f"{fake.url}/api/v3/partners/auth", client_id, lambda: secret,  # type: ignore[attr-defined]
                     timeout=2, style=style, **kw)


def form(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)


# --- 1. the request each style makes --------------------------------------------------------


async def test_client_secret_basic_sends_form_encoded_basic_credentials_and_a_form(
    oauth2: FakeNdovu, session: aiohttp.ClientSession
) -> None:
    extra = (("resource", "https://api.example/v1"), ("x-tenant", "a&b=c"))
    grant = await source(oauth2, session, "client_secret_basic", scope="read write", audience="ndovu-api",
                         extra_params=extra).fetch()
    assert grant.value == oauth2.issued[-1] and grant.lifetime == 3600
    [call] = oauth2.auth_log
    assert call.method == "POST" and call.path_qs == "/api/v3/partners/auth"
    # RFC 6749 §2.3.1: each of id and secret form-urlencoded, then Basic (RFC 7617)
    encoded = base64.b64encode(f"{form_encode(CLIENT_ID)}:{FORM_SECRET}".encode()).decode()
    assert call.headers["Authorization"] == f"Basic {encoded}"
    assert FORM_SECRET != CLIENT_SECRET  # the secret has characters the encoding changes
    assert call.headers["Content-Type"] == FORM
    assert call.headers["Accept"] == "application/json"
    assert form(call.body) == [("grant_type", "client_credentials"), ("scope", "read write"),
                               ("audience", "ndovu-api"), *extra]
    assert b"client_secret" not in call.body and b"client_id" not in call.body
    assert oauth2.last_token_request == {"client_auth": "client_secret_basic", "scope": "read write",
                                         "audience": "ndovu-api", "extra": dict(extra)}


async def test_client_secret_post_puts_the_credentials_in_the_form_and_sends_no_authorization(
    oauth2: FakeNdovu, session: aiohttp.ClientSession
) -> None:
    await source(oauth2, session, "client_secret_post", scope="a b").fetch()
    [call] = oauth2.auth_log
    assert "Authorization" not in call.headers
    assert call.headers["Content-Type"] == FORM
    assert form(call.body) == [("grant_type", "client_credentials"), ("client_id", CLIENT_ID),
                               ("client_secret", CLIENT_SECRET), ("scope", "a b")]
    assert f"client_secret={FORM_SECRET}".encode() in call.body  # form-encoded on the wire
    assert oauth2.last_token_request is not None
    assert oauth2.last_token_request["client_auth"] == "client_secret_post"
    assert oauth2.last_token_request["audience"] is None


async def test_the_ndovu_style_is_the_call_it_always_was(fake: FakeNdovu, session: aiohttp.ClientSession) -> None:
    await source(fake, session, "ndovu").fetch()
    [call] = fake.auth_log
    assert call.headers["Authorization"] == "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert call.body == b"" and "Content-Type" not in call.headers


async def test_a_colon_in_the_client_id_survives_client_secret_basic(aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    """config allows ':' in the id for the OAuth2 styles: form-encoding makes it %3A, so the
    server splits the Basic credentials at the right colon."""
    mock = MockNdovu("urn:partner:7", "p@ss word:+", style="oauth2")
    server = await aiohttp_server(mock.app())
    for style in ("client_secret_basic", "client_secret_post"):
        auth = NdovuAuth(session, str(server.make_url("/api/v3/partners/auth")), "urn:partner:7",
                         lambda: "p@ss word:+", timeout=2, style=style)
        await auth.fetch()
        assert mock.last_token_request is not None and mock.last_token_request["client_auth"] == style


def test_token_request_is_pure_and_its_repr_hides_the_secret() -> None:
    ndovu = token_request("ndovu", "id", "pw")
    assert ndovu.body is None and set(ndovu.headers) == {"Authorization"}
    post = token_request("client_secret_post", "id", "s e+c", audience="aud")
    assert post.body == b"grant_type=client_credentials&client_id=id&client_secret=s+e%2Bc&audience=aud"
    assert "s+e%2Bc" not in repr(post) and "Basic" not in repr(post)
    with pytest.raises(ValueError, match="unknown auth style"):
        token_request("client_secret_jwt", "id", "pw")


def test_an_unknown_style_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown auth style 'basic'"):
        NdovuAuth(None, "http://x", "id", lambda: "pw", timeout=1, style="basic")  # type: ignore[arg-type]


# --- 2. RFC 6749 §5.2 error answers --------------------------------------------------------


async def test_a_wrong_secret_is_reported_as_invalid_client_not_with_ndovus_raw_secret_hint(
    oauth2: FakeNdovu, session: aiohttp.ClientSession
) -> None:
    for style in ("client_secret_basic", "client_secret_post"):
        with pytest.raises(CredentialsRejected) as err:
            await source(oauth2, session, style, secret="wrong").fetch()
        assert err.value.status == 401
        assert err.value.detail == "auth endpoint answered 401: invalid_client (client authentication failed)"
        assert "auth.client_id" in err.value.hint and "client secret" in err.value.hint
        assert style in err.value.hint
        assert err.value.hint != HINT_401 and "onboarding" not in err.value.hint


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("invalid_scope", "auth.scope"),
        ("unauthorized_client", "client_credentials grant"),
        ("unsupported_grant_type", "grant_type=client_credentials"),
        ("invalid_request", "malformed"),
        ("invalid_target", "auth.audience"),
        ("temporarily_odd", "error temporarily_odd"),
    ],
)
async def test_each_error_code_gets_its_own_hint(oauth2: FakeNdovu, session: aiohttp.ClientSession, code: str, words: str) -> None:
    oauth2.auth_faults = [fakes.status(400, {"error": code, "error_description": "said the server"})]
    with pytest.raises(CredentialsRejected) as err:
        await source(oauth2, session, "client_secret_post").fetch()
    assert err.value.status == 400
    assert err.value.detail == f"auth endpoint answered 400: {code} (said the server)"
    assert words in err.value.hint


async def test_an_error_answer_is_sanitised_and_never_echoes_the_secret(
    oauth2: FakeNdovu, session: aiohttp.ClientSession
) -> None:
    basic_raw = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    echo = (f"bad secret {CLIENT_SECRET} or {FORM_SECRET} or {basic_raw}\r\nX-Evil: 1\x1b[31m"
            + "padding " * 100)
    oauth2.auth_faults = [fakes.status(401, {"error": "invalid_client\n\x07", "error_description": echo})] * 2
    for style in ("client_secret_basic", "client_secret_post"):
        with pytest.raises(CredentialsRejected) as err:
            await source(oauth2, session, style).fetch()
        text = err.value.detail + err.value.hint
        for spelling in (CLIENT_SECRET, FORM_SECRET, basic_raw, "s3cr3t"):
            assert spelling not in text
        assert err.value.detail.startswith("auth endpoint answered 401: invalid_client?? (bad secret [redacted] or "
                                           "[redacted] or [redacted]??X-Evil: 1?[31mpadding")
        assert all(" " <= ch <= "~" for ch in err.value.detail)
        description = err.value.detail.split(" (", 1)[1]
        assert len(description) <= MAX_ERROR_DESCRIPTION + 1 and description.endswith("...)")


@pytest.mark.parametrize(
    ("fault", "status", "words"),
    [
        (fakes.raw(b"<html>denied</html>", 401, "text/html"), 401, "auth.client_id"),
        (fakes.status(400, {"message": "no error key"}), 400, "auth.style"),
        (fakes.status(400, {"error": 7}), 400, "auth.style"),
    ],
)
async def test_a_rejection_without_an_oauth2_error_object_gets_a_plain_hint(
    oauth2: FakeNdovu, session: aiohttp.ClientSession, fault: fakes.Fault, status: int, words: str
) -> None:
    oauth2.auth_faults = [fault]
    with pytest.raises(CredentialsRejected) as err:
        await source(oauth2, session, "client_secret_basic").fetch()
    assert err.value.detail == f"auth endpoint answered {status}"
    assert words in err.value.hint and "onboarding" not in err.value.hint


async def test_the_ndovu_style_keeps_its_own_hints_whatever_the_body(fake: FakeNdovu, session: aiohttp.ClientSession) -> None:
    fake.auth_faults = [fakes.status(401, {"error": "invalid_client"}), fakes.status(400, {"error": "invalid_request"})]
    for hint in (HINT_401, HINT_400):
        with pytest.raises(CredentialsRejected) as err:
            await source(fake, session, "ndovu").fetch()
        assert err.value.hint == hint and "invalid" not in err.value.detail


def test_sanitize_and_secret_spellings() -> None:
    spellings = secret_spellings("id", "a+b/c")
    assert {"a+b/c", "a%2Bb%2Fc"} <= set(spellings)
    assert base64.b64encode(b"id:a+b/c").decode() in spellings
    assert list(spellings) == sorted(spellings, key=len, reverse=True)
    assert sanitize("x a+b/c y", 50, spellings) == "x [redacted] y"
    assert sanitize("é\tz", 50) == "??z"
    assert sanitize("abcdefghij", 8) == "abcde..."


# --- 3. each mock refuses the other style's call ---------------------------------------------


async def test_the_oauth2_mock_refuses_ndovus_call(oauth2: FakeNdovu, session: aiohttp.ClientSession) -> None:
    with pytest.raises(CredentialsRejected) as err:
        await source(oauth2, session, "ndovu").fetch()
    assert err.value.status == 400 and err.value.hint == HINT_400
    assert oauth2.issued == []


@pytest.mark.parametrize("style", ["client_secret_basic", "client_secret_post"])
async def test_the_ndovu_mock_refuses_oauth2_calls(aiohttp_server: Any, session: aiohttp.ClientSession, style: str) -> None:
    mock = MockNdovu(CLIENT_ID, CLIENT_SECRET)  # style ndovu: "no request body is required or accepted"
    server = await aiohttp_server(mock.app())
    auth = NdovuAuth(session, str(server.make_url("/api/v3/partners/auth")), CLIENT_ID, lambda: CLIENT_SECRET,
                     timeout=2, style=style)
    with pytest.raises(CredentialsRejected) as err:
        await auth.fetch()
    assert err.value.status == 400
    assert err.value.detail == "auth endpoint answered 400: invalid_request"
    assert "auth.style" in err.value.hint


# --- 4. through an egress proxy ---------------------------------------------------------------


class ForwardProxy:
    """A plain-HTTP forward proxy on loopback that records each request head and answers it
    itself (a token, or `status`)."""

    def __init__(self, status: int = 200) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.status = status
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        self.bodies.append(await reader.readexactly(length))
        body = json.dumps({"access_token": "via-proxy", "token_type": "Bearer", "expires_in": 60}).encode()
        if self.status != 200:
            body = b"{}"
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (self.status, len(body), body))
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_the_token_call_goes_through_the_egress_proxy_with_its_credentials(session: aiohttp.ClientSession) -> None:
    proxy = ForwardProxy()
    where = await proxy.start()
    try:
        auth = NdovuAuth(session, "http://auth.partner.example/oauth/token", "id", lambda: "pw", timeout=2,
                         style="client_secret_post", egress_proxy=where, proxy_authorization="Basic dTpw")
        grant = await auth.fetch()
    finally:
        await proxy.close()
    assert grant.value == "via-proxy"
    [head] = proxy.heads
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST http://auth.partner.example/oauth/token HTTP/1.1"  # absolute form, to the proxy
    assert "Proxy-Authorization: Basic dTpw" in lines
    assert proxy.bodies == [b"grant_type=client_credentials&client_id=id&client_secret=pw"]


async def test_an_egress_proxy_that_wants_credentials_or_is_down_is_named(session: aiohttp.ClientSession) -> None:
    proxy = ForwardProxy(status=407)
    where = await proxy.start()
    hostport = where.removeprefix("http://")
    try:
        auth = NdovuAuth(session, "http://auth.partner.example/token", "id", lambda: "pw", timeout=2,
                         style="client_secret_basic", egress_proxy=where)
        with pytest.raises(AuthUnreachable) as err:
            await auth.fetch()
        assert err.value.detail.startswith(f"the egress proxy {hostport} answered 407: its credentials")
        # an https token URL: the proxy is asked to CONNECT, with the credentials on that request
        auth = NdovuAuth(session, "https://auth.partner.example/token", "id", lambda: "pw", timeout=2,
                         style="client_secret_basic", egress_proxy=where, proxy_authorization="Basic dTpw")
        with pytest.raises(AuthUnreachable) as err:
            await auth.fetch()
        assert err.value.detail == (f"the egress proxy {hostport} answered 407 to CONNECT auth.partner.example:443: "
                                    "its credentials are missing or wrong (upstream.proxy, HTTPS_PROXY)")
    finally:
        await proxy.close()
    connect = proxy.heads[-1].decode().split("\r\n")
    assert connect[0] == "CONNECT auth.partner.example:443 HTTP/1.1"
    assert "Proxy-Authorization: Basic dTpw" in connect
    # nothing listens there any more
    auth = NdovuAuth(session, "http://auth.partner.example/token", "id", lambda: "pw", timeout=2,
                     style="client_secret_basic", egress_proxy=where)
    with pytest.raises(AuthUnreachable) as err:
        await auth.fetch()
    assert err.value.detail == f"egress proxy: connection refused by {where.removeprefix('http://')}"


# --- 5. end to end: the proxy in front of the OAuth2 fake --------------------------------------


@pytest.mark.parametrize("style", ["client_secret_basic", "client_secret_post"])
async def test_the_proxy_fetches_tokens_the_oauth2_way_and_forwards(
    oauth2: FakeNdovu, start_proxy: StartProxy, http: aiohttp.ClientSession, log_buffer: io.StringIO, style: str
) -> None:
    proxy = await start_proxy(cfg={"auth.style": style, "auth.scope": "orders:read", "auth.audience": "partner-api",
                                   "auth.extra_params": {"resource": "r1"}})
    async with http.get(url(proxy, "/api/v3/partners/products")) as resp:
        assert resp.status == 200
        assert len((await resp.json())["products"]) == 4
    assert oauth2.last_token_request == {"client_auth": style, "scope": "orders:read", "audience": "partner-api",
                                         "extra": {"resource": "r1"}}
    [api_call] = oauth2.api_log
    assert api_call.headers["Authorization"] == f"Bearer {oauth2.issued[0]}"
    # a 401 from the API: the token is dropped and a new one fetched the same way
    oauth2.revoke(oauth2.issued[0])
    async with http.get(url(proxy, "/api/v3/partners/products")) as resp:
        assert resp.status == 200 and resp.headers["X-Ndovu-Proxy-Retried"] == "1"
    assert len(oauth2.issued) == 2 and len(oauth2.auth_log) == 2
    assert all(call.headers["Content-Type"] == FORM for call in oauth2.auth_log)
    assert FORM_SECRET not in log_buffer.getvalue()


async def test_the_proxy_logs_the_oauth2_error_of_a_rejected_secret(
    oauth2: FakeNdovu, start_proxy: StartProxy, http: aiohttp.ClientSession, log_buffer: io.StringIO
) -> None:
    oauth2.client_secret = "rotated-away"
    proxy = await start_proxy(cfg={"auth.style": "client_secret_post"}, wait_token=False)
    async with http.get(url(proxy, "/api/v3/partners/products")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Ndovu-Proxy-Error"] == "token_unavailable"
    events = [json.loads(line) for line in log_buffer.getvalue().splitlines() if line.startswith("{")]
    [failure, *_] = [e for e in events if e.get("event") == "token_refresh_failed"]
    assert failure["level"] == "error" and failure["reason"] == "credentials_rejected" and failure["status"] == 401
    assert failure["detail"] == "auth endpoint answered 401: invalid_client (client authentication failed)"
    assert "client_secret_post" in failure["hint"]
    assert FORM_SECRET not in log_buffer.getvalue()
    assert "rotated-away" not in log_buffer.getvalue()


# --- 6. the real commands: mock-upstream --style oauth2, and check ------------------------------


async def _mock_upstream(command: MakeCommand, *args: str) -> str:
    cmd = await command("mock-upstream", "--listen", "127.0.0.1:0", "--client-id", CLIENT_ID,
                        "--client-secret", CLIENT_SECRET, *args).start()
    line = await cmd.wait_for(lambda item: isinstance(item, str) and item.startswith("fake Ndovu Partner API on "))
    return str(line.rsplit(" ", 1)[1])


def _check_env(base: str) -> dict[str, str]:
    return {"NDOVU_CLIENT_ID": CLIENT_ID, "NDOVU_UPSTREAM_URL": base, "NDOVU_PROXY_LISTEN": "127.0.0.1:0",
            "NDOVU_PROXY_ADMIN_LISTEN": "off"}


@pytest.mark.parametrize("style", ["client_secret_basic", "client_secret_post"])
async def test_check_against_mock_upstream_style_oauth2(command: MakeCommand, tmp_path: Path, style: str) -> None:
    base = await _mock_upstream(command, "--style", "oauth2")
    config = tmp_path / "c.yaml"
    config.write_text(f"auth:\n  style: {style}\n  scope: orders:read\n  audience: partner-api\n")
    ok = command("check", "--config", str(config), env={**_check_env(base), "NDOVU_CLIENT_SECRET": CLIENT_SECRET})
    assert await ok.run() == 0, ok.output()
    assert any(line.startswith("token:    OK, lifetime 3600 s") for line in ok.stdout)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/_mock/stats") as resp:
        stats = await resp.json()
    assert stats["style"] == "oauth2"
    assert stats["last_token_request"] == {"client_auth": style, "scope": "orders:read",
                                           "audience": "partner-api", "extra": {}}

    wrong = command("check", "--config", str(config), env={**_check_env(base), "NDOVU_CLIENT_SECRET": "not-it+/="})
    assert await wrong.run() == 2, wrong.output()
    [failed] = [line for line in wrong.stdout if line.startswith("token:")]
    assert failed == "token:    FAILED: auth endpoint answered 401: invalid_client (client authentication failed)"
    [hint] = [line for line in wrong.stdout if line.startswith("hint:")]
    assert style in hint and "onboarding" not in hint
    for spelling in ("not-it+/=", quote_plus("not-it+/=", safe="")):
        assert spelling not in wrong.output()
    assert CLIENT_SECRET not in ok.output() + wrong.output()


async def test_check_with_the_wrong_style_for_each_mock_exits_2(command: MakeCommand, tmp_path: Path) -> None:
    oauth2_base = await _mock_upstream(command, "--style", "oauth2")
    ndovu_base = await _mock_upstream(command)  # --style ndovu, the default
    env = {"NDOVU_CLIENT_SECRET": CLIENT_SECRET}

    ndovu_call = command("check", env={**_check_env(oauth2_base), **env})
    assert await ndovu_call.run() == 2, ndovu_call.output()
    assert "token:    FAILED: auth endpoint answered 400" in ndovu_call.stdout
    assert f"hint:     {HINT_400}" in ndovu_call.stdout

    config = tmp_path / "c.yaml"
    config.write_text("auth:\n  style: client_secret_basic\n")
    oauth2_call = command("check", "--config", str(config), env={**_check_env(ndovu_base), **env})
    assert await oauth2_call.run() == 2, oauth2_call.output()
    assert "token:    FAILED: auth endpoint answered 400: invalid_request" in oauth2_call.stdout


async def test_serve_in_front_of_mock_upstream_style_oauth2(command: MakeCommand, tmp_path: Path) -> None:
    base = await _mock_upstream(command, "--style", "oauth2", "--token-ttl", "120")
    config = tmp_path / "c.yaml"
    config.write_text("auth:\n  style: client_secret_post\n  scope: a b\n")
    env = {**_check_env(base), "NDOVU_CLIENT_SECRET": CLIENT_SECRET, "NDOVU_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
           "NDOVU_PROXY_LOG_LEVEL": "debug"}
    serve = await command("serve", "--config", str(config), env=env).start()
    address, _ = await serve.listening()
    acquired = await serve.event("token_acquired")
    assert acquired["lifetime_s"] == 120
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{address}/api/v3/partners/echo?x=1", data=b"hello") as resp:
            assert resp.status == 200
            echo = await resp.json()
        async with http.get(f"{base}/_mock/stats") as resp:
            stats = await resp.json()
    assert echo["body_length"] == 5 and echo["query"] == "x=1"
    assert stats["last_token_request"]["scope"] == "a b" and stats["auth_calls"] == 1
    serve.signal(signal.SIGTERM)
    assert await serve.wait() == 0
    assert CLIENT_SECRET not in serve.output() and FORM_SECRET not in serve.output()
