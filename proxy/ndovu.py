"""The one place that knows how a token is asked for: Ndovu's auth call, and the OAuth2
client-credentials grant (RFC 6749 §4.4) for a gateway that speaks it.

`auth.style` picks the request:

- `ndovu` (Ndovu's partner docs): `POST {upstream}/api/v3/partners/auth` with
  `Authorization: Basic base64(client_id:client_secret)` over the *raw* secret, and no request
  body and no Content-Type ("no request body is required or accepted"). 401 means unknown id or
  wrong secret; 400 a missing or malformed Authorization header.
- `client_secret_basic` (RFC 6749 §2.3.1): `Authorization: Basic base64(id:secret)` where id and
  secret are each application/x-www-form-urlencoded first; the form body
  `grant_type=client_credentials` plus `scope`, `audience` and the extra fields.
- `client_secret_post` (RFC 6749 §2.3.1): no Authorization; `client_id` and `client_secret` go in
  the form body after `grant_type`, then the rest.

Every style reads a 200 the same way: `{"access_token": ..., "expires_in": ..., "token_type":
"Bearer"}` (RFC 6749 §5.1). There is no refresh token. For the OAuth2 styles, a 400/401 carrying
an RFC 6749 §5.2 error object is reported by its `error` and `error_description`, sanitised
(printable ASCII, bounded, the secret cut out in every form it was sent in).

Nothing here logs a request body or a header: the secret travels in them, and its
form-urlencoded spelling (which differs from the raw secret the log redactor knows when it holds
`+`, `/`, `=`...) must not reach a log.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

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
from proxy.neterrors import host_and_port, network_error
from proxy.tokens import Grant

log = structlog.get_logger("proxy.ndovu")

#: lifetime assumed when neither expires_in nor a JWT exp claim gives one
FALLBACK_LIFETIME = 300.0

HINT_401 = (
    "Ndovu rejected the client id or secret: use the raw client secret from the onboarding "
    "email (not base64-encoded, no quotes or trailing spaces) and check the client id"
)
HINT_400 = "Ndovu found the Authorization header malformed: check the client id and secret for stray characters"

#: auth.style values (proxy.config.AUTH_STYLES names the same three)
STYLE_NDOVU, STYLE_BASIC, STYLE_POST = "ndovu", "client_secret_basic", "client_secret_post"
STYLES = (STYLE_NDOVU, STYLE_BASIC, STYLE_POST)
FORM_TYPE = "application/x-www-form-urlencoded"

#: the OAuth2 styles' hints by RFC 6749 §5.2 error code
OAUTH2_HINTS = {
    "invalid_client": "the token endpoint did not accept the client: check auth.client_id and the client "
                      "secret, and that auth.style ({style}) is the authentication method the client is "
                      "registered with",
    "invalid_scope": "the token endpoint refused the requested scope: check auth.scope",
    "unauthorized_client": "this client may not use the client_credentials grant: ask the provider to allow "
                           "it for the client",
    "unsupported_grant_type": "the token endpoint does not take grant_type=client_credentials: check "
                              "auth.token_path and that this is an OAuth2 token endpoint",
    "invalid_grant": "the token endpoint refused the grant: check auth.audience and auth.extra_params",
    "invalid_request": "the token endpoint found the request malformed: check auth.style, auth.audience and "
                       "auth.extra_params",
    "invalid_target": "the token endpoint refused the requested audience: check auth.audience",
}
HINT_OAUTH2_401 = OAUTH2_HINTS["invalid_client"]
HINT_OAUTH2_400 = ("the token endpoint refused the request without saying why: check auth.style, "
                   "auth.scope, auth.audience and auth.extra_params")
#: bounds on what is shown of an error answer: RFC 6749 §5.2 codes are short words
MAX_ERROR_CODE = 64
MAX_ERROR_DESCRIPTION = 200

# RFC 6750 §2.1 b64token: what may stand after "Bearer " in a header
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def basic_credentials(client_id: str, secret: str) -> str:
    """`Basic base64(id:secret)` over the raw UTF-8 bytes (RFC 7617)."""
    raw = f"{client_id}:{secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def form_encode(value: str) -> str:
    """One value application/x-www-form-urlencoded (RFC 6749 Appendix B): UTF-8, space as `+`,
    everything but letters, digits and `-._~` percent-encoded."""
    return quote_plus(value, safe="")


@dataclass(frozen=True, slots=True, repr=False)
class TokenRequest:
    """What one token request sends besides the URL: its headers and its body (None: no body
    at all, not even an empty one). Its repr shows neither: both may hold the secret."""

    headers: dict[str, str]
    body: bytes | None

    def __repr__(self) -> str:
        return f"TokenRequest(headers={sorted(self.headers)}, body={'<hidden>' if self.body else None})"


def token_request(
    style: str,
    client_id: str,
    secret: str,
    *,
    scope: str | None = None,
    audience: str | None = None,
    extra_params: tuple[tuple[str, str], ...] = (),
) -> TokenRequest:
    """The request `style` makes (the module docstring), without Accept and User-Agent."""
    if style == STYLE_NDOVU:
        return TokenRequest({"Authorization": basic_credentials(client_id, secret)}, None)
    fields: list[tuple[str, str]] = [("grant_type", "client_credentials")]
    headers = {"Content-Type": FORM_TYPE}
    if style == STYLE_BASIC:
        # RFC 6749 §2.3.1: each form-encoded before they are joined, so a ':' in the id survives
        headers["Authorization"] = basic_credentials(form_encode(client_id), form_encode(secret))
    elif style == STYLE_POST:
        fields += [("client_id", client_id), ("client_secret", secret)]
    else:
        raise ValueError(f"unknown auth style {style!r}; expected one of {', '.join(STYLES)}")
    if scope is not None:
        fields.append(("scope", scope))
    if audience is not None:
        fields.append(("audience", audience))
    fields += extra_params
    return TokenRequest(headers, urlencode(fields, quote_via=quote_plus, safe="").encode("ascii"))


_PERCENT = re.compile(r"%[0-9A-F]{2}")


def secret_spellings(client_id: str, secret: str) -> tuple[str, ...]:
    """Every spelling of `secret` a token request may have carried: raw, form-encoded,
    percent-encoded, and inside each style's Basic credentials; the longest first, so that a
    longer one is cut out before a shorter one inside it."""
    forms = {secret, form_encode(secret), quote(secret, safe="")}
    for user, password in ((client_id, secret), (form_encode(client_id), form_encode(secret))):
        forms.add(basic_credentials(user, password).removeprefix("Basic "))
    # a server may echo a percent-encoding in lower-case hex (%2b for %2B)
    forms |= {_PERCENT.sub(lambda m: m[0].lower(), f) for f in forms}
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def sanitize(text: str, limit: int, secrets: tuple[str, ...] = ()) -> str:
    """`text` from a remote answer, fit for a log line and a terminal: each of `secrets` cut
    out first (before anything could split one), then anything outside printable ASCII shown
    as `?`, then at most `limit` characters."""
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text).strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def oauth2_error(body: bytes) -> tuple[str, str | None] | None:
    """(`error`, `error_description`) of an RFC 6749 §5.2 error answer, raw; None when the body
    is not a JSON object with a string `error`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str) or not doc["error"]:
        return None
    description = doc.get("error_description")
    return doc["error"], description if isinstance(description, str) and description else None


class NdovuAuth:
    """A `TokenSource` that asks the token endpoint for a token, in `style` (the module
    docstring): `ndovu` by default, or `client_secret_basic` / `client_secret_post` with the
    optional `scope`, `audience` and `extra_params` form fields (ignored by `ndovu`, which sends
    no body; proxy.config refuses them with it).

    `secret` is called at every fetch, so a rotated secret file is picked up. With
    `egress_proxy` (an http:// URL without credentials) the call goes through that forward
    proxy (CONNECT for https), sending `proxy_authorization` as `Proxy-Authorization` when
    given. Raises ValueError for an unknown style."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        token_url: str,
        client_id: str,
        secret: Callable[[], str],
        *,
        timeout: float,
        user_agent: str = "ndovu-proxy",
        style: str = STYLE_NDOVU,
        scope: str | None = None,
        audience: str | None = None,
        extra_params: tuple[tuple[str, str], ...] = (),
        egress_proxy: str | None = None,
        proxy_authorization: str | None = None,
    ) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown auth style {style!r}; expected one of {', '.join(STYLES)}")
        self._session = session
        self._url = token_url
        self._client_id = client_id
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._user_agent = user_agent
        self.style = style
        self._scope = scope
        self._audience = audience
        self._extra_params = tuple(extra_params)
        self._proxy = egress_proxy
        # aiohttp sends proxy_headers on the CONNECT of an https URL only; through the proxy to
        # an http:// URL the request itself goes to the proxy, so it carries the header
        self._proxy_headers: dict[str, str] | None = None
        self._own_proxy_headers: dict[str, str] = {}
        if egress_proxy is not None and proxy_authorization:
            if urlsplit(token_url).scheme == "https":
                self._proxy_headers = {"Proxy-Authorization": proxy_authorization}
            else:
                self._own_proxy_headers = {"Proxy-Authorization": proxy_authorization}

    async def fetch(self) -> Grant:
        try:
            secret = self._secret()
        except SecretFileError as exc:
            raise SecretUnreadable(f"auth.client_secret_file: {exc.reason}") from exc
        except OSError as exc:  # a secret source other than read_secret_file
            raise SecretUnreadable(f"cannot read the client secret: {exc.strerror or exc}") from exc
        request = token_request(self.style, self._client_id, secret, scope=self._scope,
                                audience=self._audience, extra_params=self._extra_params)
        headers = {**request.headers, "Accept": "application/json", "User-Agent": self._user_agent,
                   **self._own_proxy_headers}
        started = time.perf_counter()
        try:
            async with self._session.post(
                self._url,
                headers=headers,
                data=request.body,
                # ndovu: no body and no Content-Type, "no request body is required or accepted";
                # the OAuth2 styles set theirs in `headers`, which this does not remove
                skip_auto_headers=("Content-Type",),
                allow_redirects=False,
                timeout=self._timeout,
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            ) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            words = network_error(exc, self._url, connect_timeout=self._session.timeout.sock_connect,
                                  timeout=self._timeout.total, proxy=self._proxy)
            log.debug("auth_request", url=self._url, status=None, error=words,
                      duration_ms=round((time.perf_counter() - started) * 1000, 1))
            raise AuthUnreachable(words) from exc
        log.debug("auth_request", url=self._url, status=status,
                  duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return self._grant(status, body, retry_after, secret)

    def _grant(self, status: int, body: bytes, retry_after: str | None, secret: str = "") -> Grant:
        if status in (400, 401) and self.style != STYLE_NDOVU:
            raise self._oauth2_rejected(status, body, secret)
        if status == 401:
            raise CredentialsRejected("auth endpoint answered 401", status=401, hint=HINT_401)
        if status == 400:
            raise CredentialsRejected("auth endpoint answered 400", status=400, hint=HINT_400)
        if status == 407 and self._proxy is not None:  # an http:// token URL, sent via the proxy
            raise AuthUnreachable(f"the egress proxy {host_and_port(self._proxy)[1]} answered 407: "
                                  "its credentials are missing or wrong (upstream.proxy, HTTPS_PROXY)")
        if status == 429:
            raise RateLimited("auth endpoint answered 429", retry_after=parse_retry_after(retry_after))
        if status >= 500:
            raise AuthUnreachable(f"auth endpoint answered {status}")
        if status != 200:
            raise BadAuthResponse(f"auth endpoint answered {status}")
        return parse_token_response(body)

    def _oauth2_rejected(self, status: int, body: bytes, secret: str) -> CredentialsRejected:
        """A 400/401 in an OAuth2 style: by its RFC 6749 §5.2 `error` and `error_description`
        when it has them (what the server says, not Ndovu's raw-secret advice)."""
        detail = f"auth endpoint answered {status}"
        found = oauth2_error(body)
        if found is None:
            hint = HINT_OAUTH2_401 if status == 401 else HINT_OAUTH2_400
            return CredentialsRejected(detail, status=status, hint=hint.format(style=self.style))
        secrets = secret_spellings(self._client_id, secret) if secret else ()
        code = sanitize(found[0], MAX_ERROR_CODE, secrets)
        detail += f": {code}"
        if found[1] is not None:
            detail += f" ({sanitize(found[1], MAX_ERROR_DESCRIPTION, secrets)})"
        known = OAUTH2_HINTS.get(found[0])
        if known is not None:
            hint = known.format(style=self.style)
        else:
            hint = f"the token endpoint refused the request with error {code}: see the provider's documentation"
        return CredentialsRejected(detail, status=status, hint=hint)


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
    lifetime = _seconds(expires_in)
    if lifetime is not None:
        return Grant(value=value, lifetime=lifetime)
    exp = jwt_exp(value)
    if exp is not None and exp - time.time() > 0:
        lifetime = exp - time.time()
        log.warning("token_lifetime_fallback", source="jwt_exp", lifetime_s=round(lifetime, 3))
        return Grant(value=value, lifetime=lifetime)
    log.warning("token_lifetime_fallback", source="default", lifetime_s=FALLBACK_LIFETIME)
    return Grant(value=value, lifetime=FALLBACK_LIFETIME)


def _seconds(value: object) -> float | None:
    """A usable `expires_in`: a JSON number > 0 that is finite as a float (not NaN, not
    infinity, not an integer too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


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
