"""A fake Ndovu Partner API, for `demo`, `mock-upstream` and app teams' own tests.

- `POST /api/v3/partners/auth`: the real semantics. Basic credentials with the configured id
  and raw secret; 400 when the header is missing or malformed or a body is sent ("no request
  body is required or accepted"); 401 when the id or secret is wrong; 200 with a JWT-shaped
  token (`exp` claim set), `expires_in` and `token_type`.
- with `style="oauth2"` (`mock-upstream --style oauth2`), the same path is an OAuth2 token
  endpoint instead (RFC 6749 §4.4, client credentials): a form body with
  `grant_type=client_credentials`, the client authenticated by `client_secret_basic` (Basic over
  the form-urlencoded id and secret) or `client_secret_post` (`client_id` and `client_secret` in
  the form), never both; `scope` and `audience` are recorded (`last_token_request`, and
  `/_mock/stats`). Errors are RFC 6749 §5.2 JSON (`error`, `error_description`): 400
  `invalid_request` for no form body (Ndovu's own call among them) or a repeated field, 400
  `unsupported_grant_type`, 401 `invalid_client` (with `WWW-Authenticate: Basic` when Basic was
  used).
- `GET /api/v3/partners/products`: a small sample catalogue.
- any other path under `/api/v3/partners/`: echoes the request as JSON (`method`, `path`,
  `query`, `headers` without credentials, `body_length`, `body_sha256`), streaming the body.
- a missing, unknown, expired or revoked bearer token gets 401 with
  `WWW-Authenticate: Bearer error="invalid_token"`.
- knobs, outside the API's prefix so a proxy never forwards them: `POST /_mock/expire` and
  `POST /_mock/revoke` end every token issued so far (an app team's retry-path test),
  `GET /_mock/stats` counts auth calls and requests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from proxy.config import Address

API = "/api/v3/partners"
DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"  # the fake API's own, printed by `demo`; never a real one

#: the auth endpoint's semantics: Ndovu's own call, or an OAuth2 client-credentials endpoint
STYLES = ("ndovu", "oauth2")
#: form fields of an OAuth2 token request that `last_token_request` does not keep as extras
_OWN_FIELDS = frozenset({"grant_type", "client_id", "client_secret", "scope", "audience"})

#: request headers the echo leaves out: credentials of any kind
_HIDDEN = frozenset({"authorization", "proxy-authorization", "cookie", "x-proxy-token"})

PRODUCTS = [
    {"id": "prd_001", "name": "Maize flour 2 kg", "price": {"amount": 21500, "currency": "KES"}, "in_stock": True},
    {"id": "prd_002", "name": "Cooking oil 1 l", "price": {"amount": 38900, "currency": "KES"}, "in_stock": True},
    {"id": "prd_003", "name": "Rice 5 kg", "price": {"amount": 92000, "currency": "KES"}, "in_stock": False},
    {"id": "prd_004", "name": "Sugar 1 kg", "price": {"amount": 17800, "currency": "KES"}, "in_stock": True},
]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class MockNdovu:
    """State of the fake API: the credentials it accepts and the tokens it issued."""

    def __init__(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_ttl: float = 3600,
        style: str = "ndovu",
    ) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
        self.client_id = DEMO_CLIENT_ID if client_id is None else client_id
        self.client_secret = DEMO_CLIENT_SECRET if client_secret is None else client_secret
        self.token_ttl = token_ttl
        #: read at every auth call, so a test may switch it on a running fake
        self.style = style
        #: oauth2: how the last accepted token request authenticated, and its scope, audience and
        #: other form fields (never the secret)
        self.last_token_request: dict[str, Any] | None = None
        self._key = secrets.token_bytes(32)
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.auth_calls = 0
        self.api_calls = 0
        self.rejected_calls = 0

    # --- tokens -------------------------------------------------------------------------

    def issue(self) -> str:
        now = time.time()
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"sub": self.client_id, "iat": int(now), "exp": int(now + self.token_ttl), "jti": secrets.token_hex(8)}
        payload = _b64url(json.dumps(claims).encode())
        signature = _b64url(hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        token = f"{header}.{payload}.{signature}"
        self._tokens[token] = time.monotonic() + self.token_ttl
        return token

    def is_live(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def expire_all(self) -> int:
        n = len(self._tokens)
        self._tokens.clear()
        return n

    def _credentials_ok(self, header: str) -> bool | None:
        """True/False for well-formed Basic credentials; None when malformed (400)."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            return None
        return self._secret_ok(client_id, secret)

    # --- handlers -----------------------------------------------------------------------

    def _secret_ok(self, client_id: str, secret: str) -> bool:
        return hmac.compare_digest(client_id.encode(), self.client_id.encode()) and hmac.compare_digest(
            secret.encode(), self.client_secret.encode()
        )

    async def auth(self, request: web.Request) -> web.Response:
        self.auth_calls += 1
        if self.style == "oauth2":
            return await self._oauth2_token(request)
        if request.body_exists:
            await request.read()
            return _error(400, "invalid_request", "no request body is required or accepted")
        ok = self._credentials_ok(request.headers.get("Authorization", ""))
        if ok is None:
            return _error(400, "invalid_request", "missing or malformed Authorization header")
        if not ok:
            return _error(401, "invalid_client", "unknown client id or wrong client secret")
        return web.json_response(
            {"access_token": self.issue(), "expires_in": self.token_ttl, "token_type": "Bearer"}
        )

    async def _oauth2_token(self, request: web.Request) -> web.Response:
        """RFC 6749 §4.4.2: the client-credentials grant, client authenticated per §2.3.1."""
        body = await request.read()
        if not body:
            return _oauth2_error(400, "invalid_request", "a form body with grant_type=client_credentials is required")
        if request.content_type != "application/x-www-form-urlencoded":
            return _oauth2_error(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return _oauth2_error(400, "invalid_request", "the form body cannot be parsed")
        form = dict(pairs)
        if len(form) != len(pairs):  # §3.2: parameters MUST NOT be included more than once
            return _oauth2_error(400, "invalid_request", "a parameter is repeated")
        grant_type = form.get("grant_type")
        if not grant_type:
            return _oauth2_error(400, "invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            return _oauth2_error(400, "unsupported_grant_type", "only grant_type=client_credentials is supported")
        header = request.headers.get("Authorization")
        in_form = "client_id" in form or "client_secret" in form
        if header is not None and in_form:  # §2.3: one authentication method per request
            return _oauth2_error(400, "invalid_request", "more than one client authentication method")
        if header is not None:
            method, ok = "client_secret_basic", self._oauth2_basic_ok(header)
        elif in_form:
            method = "client_secret_post"
            ok = self._secret_ok(form.get("client_id", ""), form.get("client_secret", ""))
        else:
            method, ok = None, False
        if not ok:
            resp = _oauth2_error(401, "invalid_client", "client authentication failed")
            if method != "client_secret_post":  # §5.2: the scheme the client used, or could use
                resp.headers["WWW-Authenticate"] = 'Basic realm="ndovu-mock", charset="UTF-8"'
            return resp
        self.last_token_request = {
            "client_auth": method,
            "scope": form.get("scope"),
            "audience": form.get("audience"),
            "extra": {k: v for k, v in pairs if k not in _OWN_FIELDS},
        }
        doc: dict[str, Any] = {"access_token": self.issue(), "expires_in": self.token_ttl, "token_type": "Bearer"}
        if "scope" in form:
            doc["scope"] = form["scope"]
        # §5.1: a token answer must not be cached
        return web.json_response(doc, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _oauth2_basic_ok(self, header: str) -> bool:
        """§2.3.1: Basic over the form-urlencoded id and secret; anything malformed is a failed
        authentication (401 invalid_client), as a real server answers it."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        client_id, sep, secret = decoded.partition(":")
        return bool(sep) and self._secret_ok(unquote_plus(client_id), unquote_plus(secret))

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.is_live(token)

    async def products(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return self._unauthorised()
        self.api_calls += 1
        return web.json_response({"products": PRODUCTS, "count": len(PRODUCTS)})

    async def echo(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            await request.read()  # keep the connection usable
            return self._unauthorised()
        self.api_calls += 1
        digest, length = hashlib.sha256(), 0
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                length += len(chunk)
        except ConnectionError:  # the caller gave up mid-upload: nobody to answer
            raise web.HTTPBadRequest() from None
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": request.raw_path.partition("?")[2],
                "headers": {k: v for k, v in request.headers.items() if k.lower() not in _HIDDEN},
                "body_length": length,
                "body_sha256": digest.hexdigest(),
            }
        )

    def _unauthorised(self) -> web.Response:
        self.rejected_calls += 1
        resp = _error(401, "invalid_token", "the access token is missing, expired or revoked")
        resp.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return resp

    async def expire(self, _request: web.Request) -> web.Response:
        return web.json_response({"expired": self.expire_all()})

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"auth_calls": self.auth_calls, "api_calls": self.api_calls, "rejected_calls": self.rejected_calls,
             "live_tokens": sum(1 for t in self._tokens if self.is_live(t)), "style": self.style,
             "last_token_request": self.last_token_request}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(f"{API}/auth", self.auth)
        app.router.add_get(f"{API}/products", self.products)
        app.router.add_route("*", API + "/{tail:.*}", self.echo)
        app.router.add_post("/_mock/expire", self.expire)
        app.router.add_post("/_mock/revoke", self.expire)
        app.router.add_get("/_mock/stats", self.stats)
        return app

    async def listen(self, where: Address) -> tuple[web.AppRunner, Address]:
        """Serve the fake API on `where` (port 0: a free one); the runner, and where it listens."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, where.host, where.port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        host, port = runner.addresses[0][:2]
        return runner, Address(host, port)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _oauth2_error(status: int, code: str, description: str) -> web.Response:
    """RFC 6749 §5.2."""
    return web.json_response({"error": code, "error_description": description}, status=status,
                             headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
