"""Request figures kept as plain numbers on the hot path.

Counting with ints and a bucket list costs a few hundred nanoseconds a request; the
Prometheus families (proxy.admin) are only built when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter

#: upstream latency buckets in seconds: a loopback hop is ~0.1 ms, a partner call tens of ms
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: methods counted by name; any other is counted as "other" so clients cannot grow the label set
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Stats:
    """What the forwarder counts. Single-threaded (the event loop), so no locks."""

    __slots__ = ("requests", "in_flight", "replays", "_bucket_counts", "_latency_sum", "_latency_count")

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.in_flight = 0
        self.replays = 0
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0

    def count_response(self, method: str, status: int) -> None:
        if method not in KNOWN_METHODS:
            method = "other"
        self.requests[(method, _STATUS_CLASS.get(status // 100, "5xx"))] += 1

    def observe_upstream(self, seconds: float) -> None:
        self._bucket_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds
        self._latency_count += 1

    def latency_buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as Prometheus wants them."""
        out, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._bucket_counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out

    @property
    def latency_sum(self) -> float:
        return self._latency_sum
