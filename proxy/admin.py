"""The admin listener: /healthz, /readyz, /metrics and /tokenz.

Nothing here ever shows a token, a secret or a request's headers: /tokenz gives the token's
SHA-256 fingerprint, never the token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from proxy.metrics import Stats
from proxy.tokens import TokenCache

class TokenState(Protocol):
    @property
    def fetches(self) -> Counter[str]: ...
    def seconds_left(self) -> float | None: ...


class ProxyCollector(Collector):
    """Builds the metric families at scrape time from `Stats` and the token cache."""

    def __init__(self, stats: Stats, tokens: TokenState) -> None:
        self._stats = stats
        self._tokens = tokens

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self._stats
        requests = CounterMetricFamily(
            "ndovu_proxy_requests", "Responses sent to clients, the proxy's own included.",
            labels=("method", "status_class"),
        )
        for (method, status_class), n in sorted(s.requests.items()):
            requests.add_metric((method, status_class), n)
        yield requests
        yield HistogramMetricFamily(
            "ndovu_proxy_upstream_latency_seconds",
            "Time to the upstream's response headers, one observation per attempt.",
            buckets=s.latency_buckets(),
            sum_value=s.latency_sum,
        )
        yield CounterMetricFamily(
            "ndovu_proxy_replays", "Requests replayed after an upstream 401.", value=s.replays
        )
        fetches = CounterMetricFamily(
            "ndovu_proxy_token_fetches", "Token requests to the auth endpoint by result.",
            labels=("result",),
        )
        for result in ("success", "rejected", "error"):
            fetches.add_metric((result,), self._tokens.fetches[result])
        yield fetches
        left = self._tokens.seconds_left()
        yield GaugeMetricFamily(
            "ndovu_proxy_token_expires_in_seconds",
            "Seconds until the current token expires (0 when there is none).",
            value=max(0.0, left) if left is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "ndovu_proxy_in_flight_requests", "Requests being handled now.", value=s.in_flight
        )


TOKENS = web.AppKey("tokens", TokenCache)
REGISTRY = web.AppKey("registry", CollectorRegistry)


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
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ProxyCollector(stats, tokens))
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tokenz", tokenz)
    return app
