"""A Faust job worker's Prometheus metrics, read from its app's monitor (Faust's default sensor)
at each scrape: messages in and out by topic, events, send errors, and its lag (end offset less
committed offset, per input topic)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from streams.runtime.metrics import counter, labelled_counter, labelled_gauge


def faust_metrics(app: Any) -> Iterator[Metric]:
    monitor = app.monitor
    yield labelled_counter(
        "fleetstream_faust_messages_received",
        "Messages the job's agents consumed, by topic",
        "topic",
        dict(monitor.messages_received_by_topic or {}),
    )
    yield labelled_counter(
        "fleetstream_faust_messages_sent",
        "Messages the job produced, by topic",
        "topic",
        dict(monitor.messages_sent_by_topic or {}),
    )
    yield counter("fleetstream_faust_events", "Events processed by the job", monitor.events_total)
    yield counter(
        "fleetstream_faust_send_errors", "Produce requests that failed", monitor.send_errors
    )
    ends = dict(monitor.tp_end_offsets or {})
    committed = dict(monitor.tp_committed_offsets or {})
    lag: dict[str, float] = {}
    for tp, end in ends.items():
        lag[tp.topic] = lag.get(tp.topic, 0) + max(end - committed.get(tp, 0), 0)
    yield labelled_gauge(
        "fleetstream_faust_lag", "Records behind the end of each input topic", "topic", lag
    )
