"""The broker enforcer's Prometheus metrics, read from its counters at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from streams.runtime.metrics import counter_families, gauge

if TYPE_CHECKING:
    from ingest.enforcement import EnforcerCounters


def enforcer_metrics(c: EnforcerCounters) -> Iterator[Metric]:
    yield from counter_families("fleetstream_enforcer", c)
    yield gauge(
        "fleetstream_enforcer_last_end_latency_seconds",
        "From a registry change to the broker's confirmation that the session ended (last)",
        (c.last_end_latency_ms or 0) / 1000,
    )
