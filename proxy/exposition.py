"""The Prometheus families of /metrics, built at scrape time from `Stats` and the token cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
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


def registry(stats: Stats, tokens: TokenState) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(ProxyCollector(stats, tokens))
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST
