"""Ndovu's auth call, against a real fake auth endpoint on loopback."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.config import read_secret_file
from proxy.errors import AuthUnreachable, BadAuthResponse, CredentialsRejected, RateLimited
from proxy.ndovu import HINT_400, HINT_401, NdovuAuth, jwt_exp, parse_retry_after, parse_token_response
from tests import fakes
from tests.fakes import CLIENT_ID, CLIENT_SECRET, FakeNdovu


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type")) as s:
        yield s


def auth_for(fake: FakeNdovu, session: aiohttp.ClientSession, secret: str = CLIENT_SECRET) -> NdovuAuth:
    return NdovuAuth(session, f"{fake.url}/api/v3/partners/auth", CLIENT_ID, lambda: secret, timeout=2)  # type: ignore[attr-defined]


async def test_the_exact_shape_of_the_call(fake: FakeNdovu, session: aiohttp.ClientSession) -> None:
    grant = await auth_for(fake, session).fetch()
    assert grant.value == fake.issued[0]
    assert grant.lifetime == 3600
    [call] = fake.auth_log
    assert call.method == "POST" and call.path_qs == "/api/v3/partners/auth"
    assert call.headers["Authorization"] == "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert call.headers["Accept"] == "application/json"
    assert call.body == b""
    assert "Content-Type" not in call.headers
    assert call.headers.get("Content-Length", "0") == "0"
    assert "Transfer-Encoding" not in call.headers


async def test_wrong_secret_is_rejected_with_the_raw_secret_hint(fake: FakeNdovu, session: aiohttp.ClientSession) -> None:
    encoded = base64.b64encode(CLIENT_SECRET.encode()).decode()  # the classic mistake
    with pytest.raises(CredentialsRejected) as err:
        await auth_for(fake, session, secret=encoded).fetch()
    assert err.value.status == 401 and err.value.hint == HINT_401
    assert "raw client secret" in HINT_401


@pytest.mark.parametrize(
    ("fault", "error", "kind"),
    [
        (fakes.status(400), CredentialsRejected, "credentials_rejected"),
        (fakes.status(429, headers={"Retry-After": "7"}), RateLimited, "rate_limited"),
        (fakes.status(500), AuthUnreachable, "auth_unreachable"),
        (fakes.status(503), AuthUnreachable, "auth_unreachable"),
        (fakes.status(404), BadAuthResponse, "bad_response"),
        (fakes.status(302, headers={"Location": "/elsewhere"}), BadAuthResponse, "bad_response"),
        (fakes.raw(b"<html>not json</html>"), BadAuthResponse, "bad_response"),
        (fakes.status(200, {"access_token": "abc", "expires_in": 60, "token_type": "MAC"}), BadAuthResponse, "bad_response"),
        (fakes.status(200, {"access_token": "abc", "expires_in": 60}), BadAuthResponse, "bad_response"),
        (fakes.status(200, {"access_token": "", "token_type": "Bearer"}), BadAuthResponse, "bad_response"),
        (fakes.status(200, {"access_token": "a\r\nX-Evil: 1", "token_type": "Bearer"}), BadAuthResponse, "bad_response"),
        (fakes.status(200, ["not", "an", "object"]), BadAuthResponse, "bad_response"),
        (fakes.reset(), AuthUnreachable, "auth_unreachable"),
    ],
)
async def test_answers_map_to_typed_errors(fake: FakeNdovu, session: aiohttp.ClientSession, fault: fakes.Fault, error: type, kind: str) -> None:
    fake.auth_faults = [fault]
    with pytest.raises(error) as err:
        await auth_for(fake, session).fetch()
    assert err.value.kind == kind
    if isinstance(err.value, RateLimited):
        assert err.value.retry_after == 7
    if isinstance(err.value, CredentialsRejected):
        assert err.value.hint == HINT_400


async def test_unreachable_endpoint(session: aiohttp.ClientSession) -> None:
    auth = NdovuAuth(session, "http://127.0.0.1:9/api/v3/partners/auth", CLIENT_ID, lambda: "x", timeout=2)
    with pytest.raises(AuthUnreachable):
        await auth.fetch()


async def test_secret_file_is_read_at_each_fetch(fake: FakeNdovu, session: aiohttp.ClientSession, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("stale-secret\n")
    auth = NdovuAuth(session, f"{fake.url}/api/v3/partners/auth", CLIENT_ID, lambda: read_secret_file(str(path)), timeout=2)  # type: ignore[attr-defined]
    with pytest.raises(CredentialsRejected):
        await auth.fetch()
    path.write_text(CLIENT_SECRET + "\n")  # rotated in place, as a mounted Secret is
    assert (await auth.fetch()).value == fake.issued[-1]


def _jwt(claims: dict[str, object]) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none'})}.{enc(claims)}.c2ln"


@pytest.mark.parametrize("expires_in", [None, 0, -5, "3600", True, float("nan"), float("inf"), 10**400])
def test_lifetime_falls_back_to_the_jwt_exp_claim(expires_in: object) -> None:
    token = _jwt({"exp": int(time.time()) + 1234})
    doc = {"access_token": token, "token_type": "bearer"}
    if expires_in is not None:
        doc["expires_in"] = expires_in
    grant = parse_token_response(json.dumps(doc).encode())
    assert 1230 <= grant.lifetime <= 1234


def test_lifetime_falls_back_to_300_seconds_without_exp() -> None:
    grant = parse_token_response(json.dumps({"access_token": "opaque-token", "token_type": "Bearer"}).encode())
    assert grant.lifetime == 300
    expired = _jwt({"exp": int(time.time()) - 10})
    assert parse_token_response(json.dumps({"access_token": expired, "token_type": "Bearer"}).encode()).lifetime == 300


def test_jwt_exp_ignores_what_is_not_a_jwt() -> None:
    assert jwt_exp("a.b") is None
    assert jwt_exp("a.!!!.c") is None
    assert jwt_exp(_jwt({"exp": "soon"})) is None
    assert jwt_exp(_jwt({"exp": 5})) == 5


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    got = parse_retry_after(future)
    assert got is not None and 55 <= got <= 61
