"""The hot job's own Prometheus metrics (its spec's `metrics`), read from its state at each
scrape: alerts raised and resolved, twin changes, twins converged (reported = desired)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from streams.hot.twin import delta
from streams.runtime.metrics import counter, gauge, labelled_counter

if TYPE_CHECKING:
    from streams.hot.job import HotState


def hot_metrics(state: HotState) -> Iterator[Metric]:
    c = state.counters
    yield counter("fleetstream_hot_telemetry", "Telemetry records read", c.telemetry)
    yield counter("fleetstream_hot_alerts_raised", "Alerts raised", c.alerts_raised)
    yield counter("fleetstream_hot_alerts_resolved", "Alerts resolved", c.alerts_resolved)
    yield counter("fleetstream_hot_twin_changes", "Accepted twin changes", c.twin_changes)
    yield counter(
        "fleetstream_hot_twin_conflicts", "Twin updates refused (stale version)", c.conflicts
    )
    yield counter(
        "fleetstream_hot_stale_ignored", "Records older than the device's last seq", c.stale_ignored
    )
    yield counter("fleetstream_hot_dead_lettered", "Input records sent to dlq.hot", c.dead_lettered)
    twins = list(state.processor.twins.values())  # a copy: the loop goes on meanwhile
    yield gauge("fleetstream_hot_twins", "Device twins this worker holds", len(twins))
    yield gauge(
        "fleetstream_hot_twins_converged",
        "Twins whose reported state matches the desired one (empty delta)",
        sum(1 for twin in twins if not delta(twin)),
    )
    r = state.registry.counters
    yield counter("fleetstream_registry_commands", "Registry commands handled", r.commands)
    yield labelled_counter(
        "fleetstream_registry_decisions",
        "Registry commands decided, by decision (applied, unchanged, denied, refused)",
        "decision",
        r.decisions,
    )
    yield counter(
        "fleetstream_registry_malformed", "Registry commands that could not be read", r.malformed
    )
