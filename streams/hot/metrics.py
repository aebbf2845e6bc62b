"""The hot job's own Prometheus metrics (its spec's `metrics`), read from its state at each
scrape: alerts raised and resolved, twin changes, twins converged (reported = desired)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from streams.hot.twin import delta
from streams.runtime.metrics import counter_families, gauge

if TYPE_CHECKING:
    from streams.hot.job import HotState


def hot_metrics(state: HotState) -> Iterator[Metric]:
    c = state.counters
    yield from counter_families("fleetstream_hot", c)
    twins = list(state.processor.twins.values())  # a copy: the loop goes on meanwhile
    yield gauge("fleetstream_hot_twins", "Device twins this worker holds", len(twins))
    yield gauge(
        "fleetstream_hot_twins_converged",
        "Twins whose reported state matches the desired one (empty delta)",
        sum(1 for twin in twins if not delta(twin)),
    )
    yield from counter_families("fleetstream_registry", state.registry.counters)
