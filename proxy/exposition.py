"""The Prometheus families of /metrics, built at scrape time from `Stats` and the token cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from proxy.metrics import Stats


class TokenState(Protocol):
    @property
    def fetches(self) -> Counter[str]: ...
    def seconds_left(self) -> float | None: ...


class ConnectionCount(Protocol):
    opened: int


RouteFigures = tuple[str, TokenState, Stats, ConnectionCount]


class ProxyCollector(Collector):
    """Builds the metric families at scrape time from each route's `Stats` and token cache.
    With `named` routes every family has a `route` label (routes that share a token cache
    show the same token figures)."""

    def __init__(self, routes: Sequence[RouteFigures], *, named: bool) -> None:
        self._routes = routes
        self._named = named

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        route = ("route",) if self._named else ()

        def labels(name: str, *values: str) -> list[str]:
            return [*values, name] if self._named else list(values)

        requests = CounterMetricFamily(
            "ndovu_proxy_requests", "Responses sent to clients, the proxy's own included.",
            labels=("method", "status_class", *route),
        )
        latency = HistogramMetricFamily(
            "ndovu_proxy_upstream_latency_seconds",
            "Time to the upstream's response headers, one observation per attempt.",
            labels=route,
        )
        replays = CounterMetricFamily("ndovu_proxy_replays", "Requests replayed after an upstream 401.", labels=route)
        fetches = CounterMetricFamily(
            "ndovu_proxy_token_fetches", "Token requests to the auth endpoint by result.",
            labels=("result", *route),
        )
        expires = GaugeMetricFamily(
            "ndovu_proxy_token_expires_in_seconds",
            "Seconds until the current token expires (0 when there is none).", labels=route,
        )
        in_flight = GaugeMetricFamily("ndovu_proxy_in_flight_requests", "Requests being handled now.", labels=route)
        opened = CounterMetricFamily(
            "ndovu_proxy_upstream_connections_opened",
            "Connections opened to the upstream (over https, one TLS handshake each).", labels=route,
        )
        for name, tokens, s, pool in self._routes:
            for (method, status_class), n in sorted(s.requests.items()):
                requests.add_metric(labels(name, method, status_class), n)
            latency.add_metric(labels(name), buckets=s.latency_buckets(), sum_value=s.latency_sum)
            replays.add_metric(labels(name), s.replays)
            for result in ("success", "rejected", "error"):
                fetches.add_metric(labels(name, result), tokens.fetches[result])
            left = tokens.seconds_left()
            expires.add_metric(labels(name), max(0.0, left) if left is not None else 0.0)
            in_flight.add_metric(labels(name), s.in_flight)
            opened.add_metric(labels(name), pool.opened)
        yield from (requests, latency, replays, fetches, expires, in_flight, opened)


def registry(routes: Sequence[RouteFigures], *, named: bool) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(ProxyCollector(routes, named=named))
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST
