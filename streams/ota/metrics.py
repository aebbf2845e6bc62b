"""The OTA controller's Prometheus metrics, read from its counters and rollouts at each scrape:
rollouts by state, their devices by progress, requests, reports, commands, dead letters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from streams.ota.model import Progress, Rollout, RolloutState
from streams.runtime.metrics import counter_families, labelled_gauge

if TYPE_CHECKING:
    from streams.ota.job import OtaState


def by_state(rollouts: Mapping[str, Rollout]) -> tuple[dict[str, int], dict[str, int]]:
    """Pure: rollouts per state and their devices per progress (every state, 0 included, so
    the series stay put)."""
    copied = list(dict(rollouts).values())  # a copy: the loop goes on meanwhile
    states = {s.value: 0 for s in RolloutState}
    states.update(Counter(str(r.state) for r in copied))
    progress = {p.value: 0 for p in Progress}
    progress.update(Counter(str(d.status) for r in copied for d in r.devices.values()))
    return states, progress


def ota_metrics(state: OtaState) -> Iterator[Metric]:
    """The OTA job's own series (its spec's ``metrics``; the loop adds transactions and
    transient errors)."""
    c = state.counters
    states, progress = by_state(state.rollouts)
    yield labelled_gauge("fleetstream_ota_rollouts", "Rollouts by state", "state", states)
    yield labelled_gauge(
        "fleetstream_ota_devices", "Devices of the rollouts by progress", "progress", progress
    )
    yield from counter_families("fleetstream_ota", c)
