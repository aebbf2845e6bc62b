"""The MQTT -> Kafka bridge (ingest/bridge.py) as a background service of `fleet up`."""

from __future__ import annotations

from collections.abc import Sequence

from infra.services.platform import PlatformProcess
from infra.settings import Settings


class BridgeService(PlatformProcess):
    def __init__(self, settings: Settings, replica: int = 0) -> None:
        # Shown at the broker address it consumes from; it listens on no port of its own.
        super().__init__(
            f"bridge-{replica}", settings, settings.mqtt_port, "ingest.bridge", str(replica)
        )

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        return self.reported_by_me() and bool(self.counters().get("connected"))
