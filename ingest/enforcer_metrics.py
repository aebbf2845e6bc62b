"""The broker enforcer's Prometheus metrics, read from its counters at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from streams.runtime.metrics import counter, gauge

if TYPE_CHECKING:
    from ingest.enforcement import EnforcerCounters


def enforcer_metrics(c: EnforcerCounters) -> Iterator[Metric]:
    for name, doc in (
        ("records", "Registry records applied"),
        ("undecodable", "Registry records that are not a Device"),
        ("revoked", "Certificate serials revoked"),
        ("held", "Certificate serials put on hold"),
        ("released", "Holds lifted"),
        ("reloads", "Broker reloads (SIGHUP)"),
        ("sessions_ended", "Device sessions ended"),
        ("errors", "Failed reconciliations (retried)"),
        ("crl_refreshes", "CRL refreshes"),
    ):
        yield counter(f"fleetstream_enforcer_{name}", doc, getattr(c, name))
    yield gauge(
        "fleetstream_enforcer_last_end_latency_seconds",
        "From a registry change to the broker's confirmation that the session ended (last)",
        (c.last_end_latency_ms or 0) / 1000,
    )
