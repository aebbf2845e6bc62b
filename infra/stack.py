"""The platform stack on one machine: what `fleet up`, `down` and `status` act on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from infra.pki import MAX_BRIDGE_REPLICAS
from infra.services.api import ApiService
from infra.services.base import Service, ServiceError, ServiceStatus
from infra.services.bridge import BridgeService
from infra.services.enforcer import EnforcerService
from infra.services.hot_worker import HotWorkerService
from infra.services.kafka import KafkaBroker
from infra.services.mosquitto import Mosquitto
from infra.services.ota import OtaControllerService
from infra.services.registry import SchemaRegistry
from infra.services.worker import ColdWorkerService
from infra.settings import Settings
from infra.topics import consumer_lag, ensure_topics, list_topics


@dataclass(frozen=True)
class StackStatus:
    services: list[ServiceStatus]
    topics: dict[str, int] = field(default_factory=dict)
    consumer_lag: dict[str, int] = field(default_factory=dict)

    @property
    def all_up(self) -> bool:
        return all(s.state == "up" for s in self.services)

    def to_dict(self) -> dict[str, object]:
        return {
            "services": [s.to_dict() for s in self.services],
            "topics": [{"name": n, "partitions": p} for n, p in self.topics.items()],
            "consumer_lag": self.consumer_lag,
        }


# Consumer groups whose lag `fleet status` shows: the cold and hot paths', the bridge's downlink.
LAG_GROUPS = (
    ("fleetstream-cold", ("telemetry.raw", "device.events", "twin.state", "ota.rollouts")),
    ("fleetstream-hot", ("telemetry.raw", "twin.reported", "twin.desired", "registry.commands")),
    ("fleetstream-ota", ("ota.requests", "device.events", "alerts")),
    ("bridge-downlink", ("mqtt.downlink",)),
)


class Stack:
    """Kafka broker(s), the schema registry and Mosquitto, started in dependency order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.brokers = [KafkaBroker(settings, i) for i in range(settings.brokers)]
        self.registry = SchemaRegistry(settings)
        self.mosquitto = Mosquitto(settings)
        self.enforcer = EnforcerService(settings)
        self.bridges = [BridgeService(settings, i) for i in range(settings.bridge_replicas)]
        # Replicas beyond FLEET_BRIDGE_REPLICAS: retired by `up` if they ever ran here.
        self.spare_bridges = [
            BridgeService(settings, i) for i in range(settings.bridge_replicas, MAX_BRIDGE_REPLICAS)
        ]
        self.bridge = self.bridges[0]
        self.cold_worker = ColdWorkerService(settings)
        self.hot_worker = HotWorkerService(settings)
        self.ota = OtaControllerService(settings)
        self.api = ApiService(settings)

    @property
    def services(self) -> Sequence[Service]:
        return [
            *self.brokers,
            self.registry,
            self.mosquitto,
            self.enforcer,
            *self.bridges,
            self.cold_worker,
            self.hot_worker,
            self.ota,
            self.api,
        ]

    def up(self) -> StackStatus:
        """Start what is not running and return once everything answers (idempotent)."""
        self._check_broker_count()
        timeout = self.settings.startup_timeout_s
        # Brokers of a multi-node quorum only answer together: spawn all, then wait.
        for broker in self.brokers:
            broker.launch()
        for broker in self.brokers:
            broker.wait_ready(timeout)
        ensure_topics(self.settings)
        self.registry.start(timeout)
        self.mosquitto.start(timeout)
        for spare in self.spare_bridges:
            if spare.has_run():
                spare.retire()  # fewer replicas than before: no share of messages left behind
        self.enforcer.launch()
        for bridge in self.bridges:
            bridge.launch()
        self.hot_worker.launch()
        self.ota.launch()
        self.api.launch()
        self.cold_worker.start(timeout)
        for bridge in self.bridges:
            bridge.wait_ready(timeout)
        self.hot_worker.wait_ready(timeout)
        self.ota.wait_ready(timeout)
        self.api.wait_ready(timeout)
        self.enforcer.wait_ready(timeout)
        return self.status()

    def down(self) -> list[str]:
        """Stop, in reverse order, what `up` started; return the names stopped."""
        platform = (
            self.api,
            *self.bridges,
            *self.spare_bridges,  # one still running from a larger scale
            self.hot_worker,
            self.ota,
            self.cold_worker,
            self.enforcer,
            self.mosquitto,
            self.registry,
        )
        stopped = [s.name for s in platform if s.stop()]
        # Brokers of a quorum stop together: one by one, the last would wait on a lost quorum.
        for broker in self.brokers:
            broker.terminate()
        stopped += [b.name for b in reversed(self.brokers) if b.stop()]
        return stopped

    def status(self) -> StackStatus:
        services = [s.status() for s in self.services]
        kafka_up = any(s.state == "up" for s in services if s.name.startswith("kafka"))
        topics = list_topics(self.settings) if kafka_up else {}
        lag = (
            {group: consumer_lag(self.settings, group, sources) for group, sources in LAG_GROUPS}
            if kafka_up
            else {}
        )
        return StackStatus(services=services, topics=topics, consumer_lag=lag)

    def _check_broker_count(self) -> None:
        """A state folder formatted for N brokers cannot be started with another N."""
        kafka_dir = self.settings.state_dir / "kafka"
        formatted = sorted(p.name for p in kafka_dir.glob("kafka-*") if (p / "data").exists())
        if formatted and len(formatted) != self.settings.brokers:
            raise ServiceError(
                f"{kafka_dir} holds a {len(formatted)}-broker cluster; start it with "
                f"--brokers {len(formatted)}, or use another FLEET_STATE_DIR"
            )
