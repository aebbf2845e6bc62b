"""What "up" means for a bridge replica, and when it should heal itself: pure, no I/O.

Connected is not enough: after a Mosquitto restart the bridge resumed its persistent session
while the broker had forgotten its shared subscriptions, and it received nothing more (issue 12).
So a replica is up only while messages go broker -> this bridge -> Kafka: it is connected, its
SUBSCRIBE was granted, and a message it got through the shared subscription (a canary at least,
which the replicas publish every second) was stored in Kafka within the staleness window. The
status file carries the writer's own clock readings, so a wedged writer goes stale too.

Kept apart from ingest/bridge.py so `fleet status` reads it without importing the bridge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

CANARY_INTERVAL_S = 1.0
# No message into Kafka for this long: the replica is not up. Ten canary intervals: a replica
# of N shares the canaries round robin with the others, so a healthy one misses ten in a row
# only if something is wrong.
STALE_AFTER_S = 10.0


def ingesting(status: Mapping[str, Any], now: float) -> bool:
    """True if a replica's last status (see Bridge._write_status) says it ingests at ``now``."""
    try:
        stale = float(status.get("stale_after_s", STALE_AFTER_S))
        stored_at = float(status.get("ingest_ok_at", 0.0))
        written_at = float(status.get("written_at", 0.0))
    except (TypeError, ValueError):
        return False
    return (
        bool(status.get("connected"))
        and bool(status.get("subscribed"))
        and now - stored_at <= stale
        and now - written_at <= stale
    )


class Heal(StrEnum):
    nothing = "nothing"
    resubscribe = "resubscribe"
    give_up = "give_up"  # exit non-zero: a supervisor (or `fleet up`) starts a fresh process


@dataclass
class StallWatch:
    """Connected, but nothing arrives through the subscription: resubscribe once, then give up.

    Only the MQTT side is judged: while messages wait on Kafka (in flight), silence is Kafka's
    doing and resubscribing cannot help; while disconnected, the client reconnects (and every
    connect subscribes again).
    """

    stale_after_s: float = STALE_AFTER_S
    resubscribed_at: float | None = None

    def check(
        self, now: float, last_arrival: float, connected: bool, waiting_on_kafka: bool
    ) -> Heal:
        if not connected or waiting_on_kafka or now - last_arrival <= self.stale_after_s:
            if now - last_arrival <= self.stale_after_s:
                self.resubscribed_at = None  # it recovered
            return Heal.nothing
        if self.resubscribed_at is None:
            self.resubscribed_at = now
            return Heal.resubscribe
        if now - self.resubscribed_at > self.stale_after_s:
            return Heal.give_up
        return Heal.nothing
