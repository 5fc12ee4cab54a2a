"""The one place that knows Ndovu's auth call.

Partner docs: `POST {upstream}/api/v3/partners/auth` with
`Authorization: Basic base64(client_id:client_secret)` over the *raw* secret, and no request
body ("no request body is required or accepted"). 200 gives
`{"access_token": "<JWT>", "expires_in": 3600, "token_type": "Bearer"}`; 401 means unknown id or
wrong secret; 400 a missing or malformed Authorization header. There is no refresh token.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import socket
import ssl
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from proxy.errors import (
    AuthUnreachable,
    BadAuthResponse,
    CredentialsRejected,
    RateLimited,
    SecretFileError,
    SecretUnreadable,
)
from proxy.tokens import Grant

log = structlog.get_logger("proxy.ndovu")

#: lifetime assumed when neither expires_in nor a JWT exp claim gives one
FALLBACK_LIFETIME = 300.0

HINT_401 = (
    "Ndovu rejected the client id or secret: use the raw client secret from the onboarding "
    "email (not base64-encoded, no quotes or trailing spaces) and check the client id"
)
HINT_400 = "Ndovu found the Authorization header malformed: check the client id and secret for stray characters"

# RFC 6750 §2.1 b64token: what may stand after "Bearer " in a header
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def basic_credentials(client_id: str, secret: str) -> str:
    """`Basic base64(id:secret)` over the raw UTF-8 bytes (RFC 7617)."""
    raw = f"{client_id}:{secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


class NdovuAuth:
    """A `TokenSource` that asks Ndovu's auth endpoint for a token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        token_url: str,
        client_id: str,
        secret: Callable[[], str],
        *,
        timeout: float,
        user_agent: str = "ndovu-proxy",
    ) -> None:
        self._session = session
        self._url = token_url
        self._client_id = client_id
        self._secret = secret  # called at every fetch, so a rotated secret file is picked up
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._user_agent = user_agent

    async def fetch(self) -> Grant:
        try:
            secret = self._secret()
        except SecretFileError as exc:
            raise SecretUnreadable(f"auth.client_secret_file: {exc.reason}") from exc
        except OSError as exc:  # a secret source other than read_secret_file
            raise SecretUnreadable(f"cannot read the client secret: {exc.strerror or exc}") from exc
        headers = {
            "Authorization": basic_credentials(self._client_id, secret),
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }
        started = time.perf_counter()
        try:
            async with self._session.post(
                self._url,
                headers=headers,
                # no body and no Content-Type: "no request body is required or accepted"
                skip_auto_headers=("Content-Type",),
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            words = network_error(exc, self._url, connect_timeout=self._session.timeout.sock_connect,
                                  timeout=self._timeout.total)
            log.debug("auth_request", url=self._url, status=None, error=words,
                      duration_ms=round((time.perf_counter() - started) * 1000, 1))
            raise AuthUnreachable(words) from exc
        log.debug("auth_request", url=self._url, status=status,
                  duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return self._grant(status, body, retry_after)

    def _grant(self, status: int, body: bytes, retry_after: str | None) -> Grant:
        if status == 401:
            raise CredentialsRejected("auth endpoint answered 401", status=401, hint=HINT_401)
        if status == 400:
            raise CredentialsRejected("auth endpoint answered 400", status=400, hint=HINT_400)
        if status == 429:
            raise RateLimited("auth endpoint answered 429", retry_after=parse_retry_after(retry_after))
        if status >= 500:
            raise AuthUnreachable(f"auth endpoint answered {status}")
        if status != 200:
            raise BadAuthResponse(f"auth endpoint answered {status}")
        return parse_token_response(body)


# both newer than aiohttp 3.10.0, the oldest supported: looked up, not imported
_DNS_ERROR: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(aiohttp, "ClientConnectorDNSError", None),) if isinstance(c, type))
_CONNECT_TIMEOUT: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(aiohttp, "ConnectionTimeoutError", None),) if isinstance(c, type))
#: what OpenSSL says when the other end answers a ClientHello in plain text
_PLAIN_HTTP_SIGNS = ("wrong_version_number", "wrong version number", "http_request", "http request",
                     "record layer failure", "packet length too long", "unknown protocol")


def _where(url: str) -> tuple[str, str]:
    """(host, host:port) of a URL, the port spelled out even when it is the default."""
    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or (443 if parts.scheme == "https" else 80)
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _tls_reason(exc: BaseException) -> str:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason).lower().replace("_", " ")
    text = getattr(cause, "strerror", None) or str(cause)
    return text or "the connection closed during the handshake"


def network_error(exc: BaseException, url: str, *, connect_timeout: float | None, timeout: float | None) -> str:
    """A failed HTTP call to `url`, in plain words naming the host and port; never a bare
    exception class name."""
    host, where = _where(url)
    os_error = getattr(exc, "os_error", None)
    if isinstance(exc, _DNS_ERROR) or isinstance(os_error, socket.gaierror) or isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host}"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError) or isinstance(os_error, ssl.SSLError):
        reason = _tls_reason(exc)
        words = f"TLS handshake with {where} failed: {reason}"
        if any(sign in repr(os_error or exc).lower() for sign in _PLAIN_HTTP_SIGNS):
            words += f" (the port seems to speak plain HTTP: try http://{where} in upstream.url)"
        return words
    if isinstance(exc, _CONNECT_TIMEOUT):
        after = f" after {connect_timeout:g} s" if connect_timeout else ""
        return f"timed out connecting to {where}{after}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(os_error, ConnectionRefusedError):
            return f"connection refused by {where}"
        if isinstance(os_error, TimeoutError):
            after = f" after {connect_timeout:g} s" if connect_timeout else ""
            return f"timed out connecting to {where}{after}"
        return f"cannot connect to {where}: {_os_words(os_error or exc)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where} closed the connection without answering"
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError and the total timeout alike
        within = f" within {timeout:g} s" if timeout else ""
        return f"no answer from {where}{within}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the answer from {where} broke off"
    if isinstance(exc, ConnectionResetError) or isinstance(os_error, ConnectionResetError):
        return f"connection to {where} reset"
    if isinstance(exc, OSError):
        return f"connection to {where} failed: {_os_words(exc)}"
    text = str(exc)
    return f"talking to {where} failed: {text}" if text else f"talking to {where} failed"


def _os_words(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return str(strerror)
    return str(exc) or "the connection failed"


def parse_token_response(body: bytes) -> Grant:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadAuthResponse("auth endpoint answered 200 with a body that is not JSON") from None
    if not isinstance(doc, dict):
        raise BadAuthResponse("auth endpoint answered 200 with JSON that is not an object")
    value = doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise BadAuthResponse("auth endpoint answered 200 without an access_token")
    if not _B64TOKEN.fullmatch(value):
        raise BadAuthResponse("auth endpoint answered 200 with an access_token unfit for a header")
    token_type = doc.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":  # RFC 6749 §5.1
        raise BadAuthResponse("auth endpoint answered 200 with a token_type other than Bearer")
    expires_in = doc.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        if expires_in == expires_in and expires_in != float("inf"):
            return Grant(value=value, lifetime=float(expires_in))
    exp = jwt_exp(value)
    if exp is not None and exp - time.time() > 0:
        lifetime = exp - time.time()
        log.warning("token_lifetime_fallback", source="jwt_exp", lifetime_s=round(lifetime, 3))
        return Grant(value=value, lifetime=lifetime)
    log.warning("token_lifetime_fallback", source="default", lifetime_s=FALLBACK_LIFETIME)
    return Grant(value=value, lifetime=FALLBACK_LIFETIME)


def jwt_exp(token: str) -> float | None:
    """The `exp` claim of a JWT (RFC 7519 §4.1.4), without checking its signature."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims: Any = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (RFC 9110 §10.2.3); the HTTP-date form too."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
