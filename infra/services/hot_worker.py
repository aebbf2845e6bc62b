"""The hot-path worker (alerts and twins: streams/hot/job.py on the kit's transactional loop)
as a service of `fleet up`."""

from __future__ import annotations

from collections.abc import Sequence

from infra.services.platform import PlatformProcess
from infra.settings import Settings


class HotWorkerService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        # Shown at the Kafka address it consumes from; it listens on no port of its own.
        super().__init__("hot-worker", settings, settings.kafka_port, "infra.process", "hot-worker")

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        return self.reported_by_me() and bool(self.counters().get("ready"))
