"""The admin listener: /healthz, /readyz, /metrics and /tokenz.

Served by the same small HTTP/1.1 listener as the proxy (`proxy.wire`): four GET
endpoints need no router, and leaving aiohttp's web framework unloaded keeps the sidecar's
idle memory down. Nothing here ever shows a token, a secret or a request's headers: /tokenz
gives the token's SHA-256 fingerprint, never the token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from proxy.metrics import Stats
from proxy.tokens import TokenCache
from proxy.wire import Pool, Request

JSON = "application/json; charset=utf-8"
Answer = tuple[int, bytes, str]  # status, body, content type


#: one route as the admin listener sees it: its name, its token cache, its counters, its pool
RouteView = tuple[str, TokenCache, Stats, Pool]


class Exporter:
    """/metrics. prometheus-client (and what it imports) is loaded at the first scrape: a
    sidecar nobody scrapes does not carry it."""

    def __init__(self, routes: Sequence[RouteView], named: bool) -> None:
        self._routes = routes
        self._named = named
        self._registry: Any = None

    def render(self) -> tuple[bytes, str]:
        from proxy import exposition

        if self._registry is None:
            self._registry = exposition.registry(self._routes, named=self._named)
        return exposition.render(self._registry)


def _json(doc: object, status: int = 200) -> Answer:
    return status, json.dumps(doc).encode(), JSON


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def not_ready_reason(tokens: TokenCache) -> str | None:
    """Why a route cannot forward now, or None when it holds a valid token."""
    if tokens.valid_token() is not None:
        return None
    if tokens.current is None and tokens.last_error is None:
        return "no token yet" if tokens.fetches.total() == 0 else "token dropped after a 401; fetching"
    if tokens.current is not None and tokens.last_error is None:
        return "token expired; refreshing"
    return f"no valid token: {tokens.last_error}"


def token_state(tokens: TokenCache) -> dict[str, object]:
    """/tokenz for one token cache: never the token itself."""
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
    return state


class Admin:
    """The admin listener's one handler: GET (or HEAD) on four paths. `named`: the config has
    `routes:`, so /tokenz and /readyz speak of each route by name."""

    def __init__(self, routes: Sequence[RouteView], *, named: bool = False) -> None:
        self._routes = routes
        self._named = named
        #: set from SIGTERM on: /readyz answers 503 "draining" so load balancers stop sending
        self.draining = False
        self._exporter = Exporter(routes, named)
        self._paths: dict[str, Callable[[], Answer]] = {
            "/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.metrics, "/tokenz": self.tokenz,
        }

    async def __call__(self, request: Request) -> None:
        route = self._paths.get(request.target.partition("?")[0])
        if route is None:
            status, body, kind = _json({"error": "not_found"}, 404)
        elif request.method not in ("GET", "HEAD"):
            status, body, kind = _json({"error": "method_not_allowed"}, 405)
        else:
            status, body, kind = route()
        headers = [(b"Content-Type", kind.encode())]
        if status == 405:
            headers.append((b"Allow", b"GET, HEAD"))
        request.respond(status, headers, body)

    def refuse(self, request: Request, kind: str) -> None:
        status, body, content_type = _json({"error": "headers_too_large" if kind == "headers_too_large" else "bad_request"},
                                           431 if kind == "headers_too_large" else 400)
        request.respond(status, [(b"Content-Type", content_type.encode())], body)

    def fail(self, request: Request, exc: Exception) -> None:
        status, body, content_type = _json({"error": "internal_error"}, 500)
        request.respond(status, [(b"Content-Type", content_type.encode())], body)

    def healthz(self) -> Answer:
        return _json({"status": "ok"})

    def readyz(self) -> Answer:
        first = self._routes[0][1]
        if self.draining:
            return _json({"ready": False, "reason": "draining", "last_error": first.last_error}, 503)
        reasons = {name: reason for name, tokens, *_ in self._routes
                   if (reason := not_ready_reason(tokens)) is not None}
        if not reasons:
            return _json({"ready": True})
        if not self._named:
            return _json({"ready": False, "reason": reasons[self._routes[0][0]], "last_error": first.last_error}, 503)
        # one of /tokenz's last_error values (the first route's that has one); each route's in "routes"
        last_error = next((tokens.last_error for name, tokens, *_ in self._routes
                           if name in reasons and tokens.last_error), None)
        names = ", ".join(reasons)
        return _json({"ready": False, "reason": f"no valid token for route{'s' if len(reasons) > 1 else ''} {names}",
                      "last_error": last_error,
                      "routes": reasons}, 503)

    def metrics(self) -> Answer:
        body, content_type = self._exporter.render()
        return 200, body, content_type

    def tokenz(self) -> Answer:
        if not self._named:
            return _json(token_state(self._routes[0][1]))
        return _json({"routes": {name: token_state(tokens) for name, tokens, *_ in self._routes}})
