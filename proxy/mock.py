"""A fake Ndovu Partner API, for `demo`, `mock-upstream` and app teams' own tests.

- `POST /api/v3/partners/auth`: the real semantics. Basic credentials with the configured id
  and raw secret; 400 when the header is missing or malformed or a body is sent ("no request
  body is required or accepted"); 401 when the id or secret is wrong; 200 with a JWT-shaped
  token (`exp` claim set), `expires_in` and `token_type`.
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

from aiohttp import web

from proxy.config import Address

API = "/api/v3/partners"
DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"  # the fake API's own, printed by `demo`; never a real one

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
    ) -> None:
        self.client_id = DEMO_CLIENT_ID if client_id is None else client_id
        self.client_secret = DEMO_CLIENT_SECRET if client_secret is None else client_secret
        self.token_ttl = token_ttl
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
        return hmac.compare_digest(client_id.encode(), self.client_id.encode()) and hmac.compare_digest(
            secret.encode(), self.client_secret.encode()
        )

    # --- handlers -----------------------------------------------------------------------

    async def auth(self, request: web.Request) -> web.Response:
        self.auth_calls += 1
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
             "live_tokens": sum(1 for t in self._tokens if self.is_live(t))}
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
