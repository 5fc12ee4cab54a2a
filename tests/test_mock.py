"""The fake Ndovu Partner API that `demo` and `mock-upstream` serve."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import aiohttp
import pytest

from proxy.mock import MockNdovu
from proxy.ndovu import jwt_exp

API = "/api/v3/partners"


@pytest.fixture
async def mock(aiohttp_server: Any) -> tuple[MockNdovu, str]:
    m = MockNdovu("app-1", "pw:with/odd=chars", token_ttl=120)
    server = await aiohttp_server(m.app())
    return m, str(server.make_url("")).rstrip("/")


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


async def token(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}{API}/auth", headers={"Authorization": basic("app-1", "pw:with/odd=chars")}) as resp:
        assert resp.status == 200
        return str((await resp.json())["access_token"])


@pytest.mark.parametrize(
    ("headers", "data", "status"),
    [
        ({"Authorization": basic("app-1", "pw:with/odd=chars")}, None, 200),
        ({"Authorization": basic("app-1", "wrong")}, None, 401),
        ({"Authorization": basic("nobody", "pw:with/odd=chars")}, None, 401),
        ({}, None, 400),
        ({"Authorization": "Basic !!!not-base64"}, None, 400),
        ({"Authorization": "Bearer abc"}, None, 400),
        ({"Authorization": basic("app-1", "pw:with/odd=chars")}, b"grant_type=client_credentials", 400),
    ],
)
async def test_auth_endpoint_semantics(mock: tuple[MockNdovu, str], headers: dict[str, str], data: bytes | None, status: int) -> None:
    m, base = mock
    async with aiohttp.ClientSession() as http, http.post(f"{base}{API}/auth", headers=headers, data=data) as resp:
        assert resp.status == status
        body = await resp.json()
    if status == 200:
        assert body["token_type"] == "Bearer" and body["expires_in"] == 120
        exp = jwt_exp(body["access_token"])
        assert exp is not None and abs(exp - (time.time() + 120)) < 5
    assert m.auth_calls == 1


async def test_protected_endpoints_want_a_live_token(mock: tuple[MockNdovu, str]) -> None:
    _, base = mock
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer forged"}):
            async with http.get(f"{base}{API}/products", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        t = await token(http, base)
        async with http.get(f"{base}{API}/products", headers={"Authorization": f"Bearer {t}"}) as resp:
            assert resp.status == 200
            assert len((await resp.json())["products"]) == 4
        async with http.post(f"{base}/_mock/expire") as resp:
            assert (await resp.json()) == {"expired": 1}
        async with http.get(f"{base}{API}/products", headers={"Authorization": f"Bearer {t}"}) as resp:
            assert resp.status == 401
        async with http.get(f"{base}/_mock/stats") as resp:
            stats = await resp.json()
        assert stats["auth_calls"] == 1 and stats["rejected_calls"] == 3


async def test_echo_shows_the_request_without_credentials(mock: tuple[MockNdovu, str]) -> None:
    _, base = mock
    body = b"\x00\x01payload" * 1000
    async with aiohttp.ClientSession() as http:
        t = await token(http, base)
        headers = {"Authorization": f"Bearer {t}", "Cookie": "c=1", "X-Proxy-Token": "p", "Proxy-Authorization": "x", "X-Mine": "yes"}
        async with http.put(f"{base}{API}/orders/7?a=%20b&c", data=body, headers=headers) as resp:
            assert resp.status == 200
            echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == f"{API}/orders/7"
    assert echo["query"] == "a=%20b&c"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["headers"]["X-Mine"] == "yes"
    lowered = {k.lower() for k in echo["headers"]}
    assert not lowered & {"authorization", "cookie", "x-proxy-token", "proxy-authorization"}
    assert t not in json.dumps(echo)


# --- style oauth2: an RFC 6749 client-credentials token endpoint -------------------------------

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
#: Basic over the form-urlencoded id and secret (RFC 6749 §2.3.1): "pw:with/odd=chars" encoded
OAUTH2_BASIC = basic("app-1", "pw%3Awith%2Fodd%3Dchars")


@pytest.fixture
async def oauth2_mock(aiohttp_server: Any) -> tuple[MockNdovu, str]:
    m = MockNdovu("app-1", "pw:with/odd=chars", token_ttl=120, style="oauth2")
    server = await aiohttp_server(m.app())
    return m, str(server.make_url("")).rstrip("/")


GOOD_POST = "grant_type=client_credentials&client_id=app-1&client_secret=pw%3Awith%2Fodd%3Dchars"


@pytest.mark.parametrize(
    ("headers", "data", "status", "error"),
    [
        ({**FORM, "Authorization": OAUTH2_BASIC}, "grant_type=client_credentials&scope=a+b", 200, None),
        (FORM, GOOD_POST + "&audience=api", 200, None),
        # Ndovu's own call: Basic over the raw secret, no body
        ({"Authorization": basic("app-1", "pw:with/odd=chars")}, None, 400, "invalid_request"),
        ({"Authorization": OAUTH2_BASIC, "Content-Type": "application/json"}, '{"grant_type": "client_credentials"}',
         400, "invalid_request"),
        ({**FORM, "Authorization": OAUTH2_BASIC}, "scope=a", 400, "invalid_request"),
        ({**FORM, "Authorization": OAUTH2_BASIC}, "grant_type=password", 400, "unsupported_grant_type"),
        ({**FORM, "Authorization": OAUTH2_BASIC}, "grant_type=client_credentials&scope=a&scope=b", 400, "invalid_request"),
        ({**FORM, "Authorization": OAUTH2_BASIC}, GOOD_POST, 400, "invalid_request"),  # two methods at once
        ({**FORM, "Authorization": basic("app-1", "wrong")}, "grant_type=client_credentials", 401, "invalid_client"),
        ({**FORM, "Authorization": "Basic !!!"}, "grant_type=client_credentials", 401, "invalid_client"),
        (FORM, "grant_type=client_credentials&client_id=app-1&client_secret=wrong", 401, "invalid_client"),
        (FORM, "grant_type=client_credentials", 401, "invalid_client"),  # no client authentication
    ],
)
async def test_oauth2_token_endpoint_semantics(
    oauth2_mock: tuple[MockNdovu, str], headers: dict[str, str], data: str | None, status: int, error: str | None
) -> None:
    m, base = oauth2_mock
    async with aiohttp.ClientSession() as http, http.post(f"{base}{API}/auth", headers=headers, data=data) as resp:
        assert resp.status == status
        body = await resp.json()
        assert resp.headers["Cache-Control"] == "no-store"  # RFC 6749 §5.1, §5.2
        www = resp.headers.get("WWW-Authenticate")
    if error is None:
        assert body["token_type"] == "Bearer" and body["expires_in"] == 120 and m.is_live(body["access_token"])
        return
    assert body["error"] == error and body["error_description"]
    assert m.last_token_request is None and m.expire_all() == 0  # nothing was issued
    if status == 401 and "Authorization" in headers:
        assert www is not None and www.startswith("Basic realm=")


async def test_oauth2_records_scope_and_audience_and_stats_show_them(oauth2_mock: tuple[MockNdovu, str]) -> None:
    m, base = oauth2_mock
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}{API}/auth", headers=FORM, data=GOOD_POST + "&scope=orders%3Aread&audience=api&resource=r") as resp:
            assert resp.status == 200
            grant = await resp.json()
        assert grant["scope"] == "orders:read"
        async with http.get(f"{base}{API}/products", headers={"Authorization": f"Bearer {grant['access_token']}"}) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/_mock/stats") as resp:
            stats = await resp.json()
    expected = {"client_auth": "client_secret_post", "scope": "orders:read", "audience": "api", "extra": {"resource": "r"}}
    assert m.last_token_request == expected
    assert stats["last_token_request"] == expected and stats["style"] == "oauth2"
    assert "pw" not in json.dumps(stats)


def test_an_unknown_mock_style_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        MockNdovu(style="saml")
