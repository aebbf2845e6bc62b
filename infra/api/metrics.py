"""The API's Prometheus metrics: requests by route and status, and their latency."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric

from streams.runtime.metrics import Buckets

UNMATCHED = "unmatched"  # a path no route serves (404, 405): one label value, not the path


@dataclass
class ApiMetrics:
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    latency: Buckets = field(default_factory=Buckets)

    def observe(self, request: web.Request, status: int, seconds: float) -> None:
        route = request.match_info.route.name if request.match_info.route else None
        self.requests[(route or UNMATCHED, request.method, status)] += 1
        self.latency.observe(seconds)

    def metrics(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "fleetstream_api_requests",
            "API requests answered, by route, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(dict(self.requests).items()):
            family.add_metric([route, method, str(status)], count)
        yield family
        yield self.latency.family("fleetstream_api_request_seconds", "Time to answer a request")
