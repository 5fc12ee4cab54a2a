"""Auth-call failures in plain words (proxy.neterrors.network_error) and an unreadable secret."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from proxy.config import read_secret_file
from proxy.errors import SecretUnreadable
from proxy.ndovu import NdovuAuth
from proxy.neterrors import network_error
from tests.fakes import CLIENT_ID, FakeNdovu

KEY: Any = SimpleNamespace(host="api.example", port=443, ssl=True, is_ssl=True)
URL = "https://api.example/api/v3/partners/auth"


def words(exc: BaseException, url: str = URL) -> str:
    return network_error(exc, url, connect_timeout=5, timeout=10)


def test_refused_unresolvable_and_reset() -> None:
    refused = aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connect call failed"))
    assert words(refused, "http://127.0.0.1:8081/x") == "connection refused by 127.0.0.1:8081"
    dns = aiohttp.ClientConnectorError(KEY, socket.gaierror(-2, "Name or service not known"))
    assert words(dns) == "cannot resolve host api.example"
    assert words(aiohttp.ClientOSError(104, "Connection reset by peer")) == "connection to api.example:443 failed: Connection reset by peer"
    assert words(aiohttp.ServerDisconnectedError()) == "api.example:443 closed the connection without answering"


def test_dns_errors_by_class_and_by_cause() -> None:
    assert words(aiohttp.ClientConnectorDNSError(KEY, OSError("no such host"))) == "cannot resolve host api.example"
    dns = aiohttp.ClientConnectorError(KEY, socket.gaierror(-2, "Name or service not known"))
    assert words(dns) == "cannot resolve host api.example"


def test_timeouts_say_which_and_how_long() -> None:
    connect_timeout = getattr(aiohttp, "ConnectionTimeoutError", None)
    if connect_timeout is not None:
        assert words(connect_timeout("Connection timeout to host")) == "timed out connecting to api.example:443 after 5 s"
    assert words(TimeoutError()) == "no answer from api.example:443 within 10 s"
    assert words(aiohttp.ServerTimeoutError("Timeout on reading data from socket")) == "no answer from api.example:443 within 10 s"


def test_tls_failures_give_the_reason_and_spot_a_plain_http_port() -> None:
    cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cert.verify_message = "self-signed certificate"
    text = words(aiohttp.ClientConnectorCertificateError(KEY, cert))
    assert text == "TLS handshake with api.example:443 failed: certificate verify failed: self-signed certificate"
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    plain.reason = "WRONG_VERSION_NUMBER"
    text = words(aiohttp.ClientConnectorSSLError(KEY, plain), "https://api.example:8081/auth")
    assert text == ("TLS handshake with api.example:8081 failed: wrong version number "
                    "(the port seems to speak plain HTTP: try http://api.example:8081 in upstream.url)")


@pytest.mark.parametrize(
    "exc",
    [aiohttp.ClientPayloadError(), aiohttp.ClientConnectionError(), OSError(), aiohttp.ClientError(), TimeoutError()],
)
def test_never_a_bare_class_name(exc: BaseException) -> None:
    text = words(exc)
    assert "api.example:443" in text
    assert type(exc).__name__ not in text


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_a_missing_secret_file_is_secret_unreadable_and_sends_nothing(
    fake: FakeNdovu, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "gone"
    auth = NdovuAuth(session, f"{fake.url}/api/v3/partners/auth", CLIENT_ID, lambda: read_secret_file(str(path)), timeout=2)  # type: ignore[attr-defined]
    with pytest.raises(SecretUnreadable) as err:
        await auth.fetch()
    assert err.value.kind == "secret_unreadable" and err.value.result == "error"
    assert err.value.detail == f"auth.client_secret_file: cannot read {path}: No such file or directory"
    path.write_text("")
    with pytest.raises(SecretUnreadable, match="is empty"):
        await auth.fetch()
    assert fake.auth_calls == 0
