"""The admin listener: /healthz, /readyz, /metrics and /tokenz.

Nothing here ever shows a token, a secret or a request's headers: /tokenz gives the token's
SHA-256 fingerprint, never the token.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.metrics import Stats
from proxy.tokens import TokenCache


class Exporter:
    """/metrics. prometheus-client (and what it imports) is loaded at the first scrape: a
    sidecar nobody scrapes does not carry it."""

    def __init__(self, stats: Stats, tokens: TokenCache) -> None:
        self._stats = stats
        self._tokens = tokens
        self._registry: Any = None

    def render(self) -> tuple[bytes, str]:
        from proxy import exposition

        if self._registry is None:
            self._registry = exposition.registry(self._stats, self._tokens)
        return exposition.render(self._registry)

TOKENS = web.AppKey("tokens", TokenCache)
EXPORTER = web.AppKey("exporter", Exporter)


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    tokens = request.app[TOKENS]
    if tokens.valid_token() is not None:
        return web.json_response({"ready": True})
    if tokens.current is None and tokens.last_error is None:
        reason = "no token yet" if tokens.fetches.total() == 0 else "token dropped after a 401; fetching"
    elif tokens.current is not None and tokens.last_error is None:
        reason = "token expired; refreshing"
    else:
        reason = f"no valid token: {tokens.last_error}"
    return web.json_response({"ready": False, "reason": reason, "last_error": tokens.last_error}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[EXPORTER].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def tokenz(request: web.Request) -> web.Response:
    tokens = request.app[TOKENS]
    token = tokens.current
    left = tokens.seconds_left()
    state: dict[str, object] = {
        "generation": None,
        "obtained_at": None,
        "expires_at": None,
        "seconds_left": None,
        "fingerprint": None,
        "last_error": tokens.last_error,
    }
    if token is not None and left is not None:
        state.update(
            generation=token.generation,
            obtained_at=_rfc3339(token.obtained_wall),
            expires_at=_rfc3339(token.obtained_wall + token.lifetime),
            seconds_left=max(0, round(left, 1)),
            fingerprint=token.fingerprint,
        )
    return web.json_response(state)


def make_app(tokens: TokenCache, stats: Stats) -> web.Application:
    app = web.Application()
    app[TOKENS] = tokens
    app[EXPORTER] = Exporter(stats, tokens)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tokenz", tokenz)
    return app
