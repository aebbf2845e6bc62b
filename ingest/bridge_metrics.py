"""A bridge replica's Prometheus metrics, read from its counters at each scrape, and the two
latency histograms it keeps per message (streams/runtime/metrics.py `Buckets`: one bisect per
observation, on the bridge's event loop)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from streams.runtime.metrics import Buckets, counter, counter_families, gauge

if TYPE_CHECKING:
    from ingest.bridge import Bridge


@dataclass
class BridgeTimings:
    # From a message's arrival at the bridge to Kafka's delivery report (acks=all).
    kafka_delivery: Buckets = field(default_factory=Buckets)
    # From a message's arrival to its PUBACK written to the broker.
    puback: Buckets = field(default_factory=Buckets)


def bridge_metrics(bridge: Bridge) -> Iterator[Metric]:
    c = bridge.counters
    yield from counter_families("fleetstream_bridge", c)
    yield counter(
        "fleetstream_bridge_downlink_sent", "Downlink messages published", bridge.downlink.sent
    )
    yield bridge.timings.kafka_delivery.family(
        "fleetstream_bridge_kafka_delivery_seconds",
        "From a message's arrival at the bridge to Kafka's delivery report",
    )
    yield bridge.timings.puback.family(
        "fleetstream_bridge_puback_seconds", "From a message's arrival to its PUBACK"
    )
    yield gauge(
        "fleetstream_bridge_inflight", "Messages received and not yet acked", bridge.inflight
    )
    yield gauge(
        "fleetstream_bridge_last_delivery_timestamp_seconds",
        "When Kafka last took a message of this bridge (epoch seconds)",
        bridge.last_delivery_at,
    )
    yield gauge(
        "fleetstream_bridge_connected", "1 if connected to the broker", int(bridge.connected)
    )
