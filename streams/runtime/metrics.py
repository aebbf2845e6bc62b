"""Prometheus metrics of a platform process, from the counters its loop already keeps.

A loop (or any worker) describes what it counted as metric families in a `metrics()` method;
the composition root makes one :class:`prometheus_client.CollectorRegistry` per process,
registers ``Collect(worker.metrics)`` on it and serves it on the process's metrics port
(:func:`serve_metrics`). Nothing is counted twice: the status file and the metrics read the
same counters. Names follow Prometheus' conventions: ``fleetstream_<area>_<what>_total`` for
counters, ``_seconds`` for durations, no unit suffix on record counts.

:class:`Buckets` is a histogram for the hot paths (the bridge's per-message latencies, a job's
per-batch sizes): one bisect and two additions per observation, no lock (each is observed from
one thread, the process's loop; a scrape reads a copy), exposed as a Prometheus histogram.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger("fleetstream.metrics")

# Upper bounds (seconds) of latency histograms: 1 ms to 10 s.
LATENCY_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Upper bounds of batch-size histograms (records).
BATCH_BOUNDS = (1, 10, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000)

MetricsSource = Callable[[], Iterable[Metric]]


class Collect:
    """A prometheus-client collector over a function that yields metric families."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._source()


@dataclass
class Buckets:
    """Observations counted per bucket (not cumulative; the exposition makes them so)."""

    bounds: tuple[float, ...] = LATENCY_BOUNDS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.total  # a copy: the loop goes on meanwhile
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter; `name` without `_total` (prometheus-client adds it)."""
    return CounterMetricFamily(name, doc, value=value)


def counted(doc: str, *, metric: str = "") -> int:
    """A field of a counters dataclass, from 0: the counter ``<prefix>_<metric or the field's
    name>`` of :func:`counter_families`, ``doc`` its help. The status file and the metrics
    read the same field; what it counts is said once, here."""
    return field(default=0, metadata={"doc": doc, "metric": metric})


def counted_by(
    label: str,
    doc: str,
    *,
    metric: str = "",
    start: Callable[[], dict[str, int]] = dict,
) -> dict[str, int]:
    """A field of counts by ``label`` value (a dict, ``start()`` at first): one labelled
    counter of :func:`counter_families`."""
    return field(default_factory=start, metadata={"doc": doc, "metric": metric, "label": label})


def counter_families(prefix: str, counters: Any) -> Iterator[Metric]:
    """Every :func:`counted` and :func:`counted_by` field of a counters dataclass as a metric
    family; other fields (gauges, totals a labelled family already sums) are left out."""
    for f in fields(counters):
        doc = f.metadata.get("doc")
        if doc is None:
            continue
        name = f"{prefix}_{f.metadata['metric'] or f.name}"
        value = getattr(counters, f.name)
        label = f.metadata.get("label")
        yield (
            counter(name, doc, value)
            if label is None
            else labelled_counter(name, doc, label, value)
        )


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)


def _labelled(family: _Family, values: Mapping[str, float]) -> _Family:
    """``family`` with one sample per label value, in label order."""
    for key, value in sorted(dict(values).items()):
        family.add_metric([key], value)
    return family


def labelled_counter(
    name: str, doc: str, label: str, values: Mapping[str, float]
) -> CounterMetricFamily:
    return _labelled(CounterMetricFamily(name, doc, labels=[label]), values)


def labelled_gauge(
    name: str, doc: str, label: str, values: Mapping[str, float]
) -> GaugeMetricFamily:
    return _labelled(GaugeMetricFamily(name, doc, labels=[label]), values)


class Closeable(Protocol):
    def shutdown(self) -> None: ...


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Closeable | None:
    """Serve `registry` on http://host:port/metrics from a daemon thread; None if `port` is 0
    (metrics off) or taken. A taken port is logged, not fatal: the process's work matters
    more than its metrics, and Prometheus shows the target down."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("metrics not served on %s:%d: %s", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
