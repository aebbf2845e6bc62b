"""The Kafka topics of ARCHITECTURE.md, declared once, created idempotently.

Names are contracts: consumers outside the platform subscribe to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from infra.settings import Settings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    value: str
    cleanup: Literal["delete", "compact"] = "delete"
    retention_ms: int | None = 7 * DAY_MS
    partitions: int | None = None  # None: the stack's default partition count
    max_message_bytes: int | None = None  # None: the broker's default (1 MiB)

    def config(self, settings: Settings) -> dict[str, str]:
        config = {
            "cleanup.policy": self.cleanup,
            "min.insync.replicas": str(settings.min_insync_replicas),
        }
        if self.cleanup == "delete" and self.retention_ms is not None:
            config["retention.ms"] = str(self.retention_ms)
        if self.max_message_bytes is not None:
            config["max.message.bytes"] = str(self.max_message_bytes)
        return config


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("telemetry.raw", "device id", "Avro Telemetry"),
    TopicSpec("device.events", "device id", "Avro DeviceEvent"),
    TopicSpec("twin.reported", "device id", "Avro reported patch"),
    TopicSpec("twin.desired", "device id", "Avro desired patch"),
    TopicSpec("twin.state", "device id", "Avro TwinState (the full twin)", cleanup="compact"),
    # The twin agent's answers to twin.desired requests (accepted, conflict, ...).
    TopicSpec("twin.responses", "device id", "Avro TwinResponse", retention_ms=DAY_MS),
    TopicSpec("alerts", "device id", "Avro Alert"),
    # Rules are data: one record per rule id, a tombstone deletes it. Every hot worker reads
    # all of it (a global table), so one partition keeps it ordered.
    TopicSpec("alerts.rules", "rule id", "Avro AlertRule", cleanup="compact", partitions=1),
    # Changelog of the alert agent's per-device state (co-partitioned with telemetry.raw).
    TopicSpec("alerts.state", "device id", "JSON rule states", cleanup="compact"),
    TopicSpec("mqtt.downlink", "device id", "topic + payload + qos"),
    TopicSpec("registry.devices", "device id", "Avro Device", cleanup="compact"),
    # Requests to change the registry; the registry agent applies them after authorization.
    TopicSpec("registry.commands", "device id", "Avro RegistryCommand"),
    # Every decision on a command (applied, unchanged, denied, refused), kept a year.
    TopicSpec("audit.log", "device id or principal", "Avro AuditRecord", retention_ms=365 * DAY_MS),
    TopicSpec("rbac.grants", "principal", "Avro grant set", cleanup="compact"),
    # A rollout record carries every device's progress (about 84 bytes each): room for 150k.
    TopicSpec(
        "ota.rollouts",
        "rollout id",
        "Avro Rollout",
        cleanup="compact",
        max_message_bytes=16 * 1024 * 1024,
    ),
    # Operators' requests (create, approve, pause, ...), answered on audit.log.
    TopicSpec("ota.requests", "rollout id", "Avro OtaRequest"),
    TopicSpec("ota.artifacts", "artifact id (sha256)", "Avro OtaArtifact", cleanup="compact"),
    # Per device group, 1-minute health windows (the shipped Faust job fleet_health).
    TopicSpec("fleet.health", "group path@window start", "JSON health window", cleanup="compact"),
    TopicSpec("dlq.ingest", "original key", "original bytes + headers", retention_ms=30 * DAY_MS),
    TopicSpec("dlq.cold", "original key", "original bytes + headers", retention_ms=30 * DAY_MS),
    TopicSpec("dlq.hot", "original key", "original bytes + headers", retention_ms=30 * DAY_MS),
    # The bridges' canaries (ingest/bridge.py): proof that broker -> bridge -> Kafka works.
    TopicSpec("ingest.canary", "bridge replica", "canary JSON", retention_ms=DAY_MS, partitions=1),
    # The schema registry's storage: one ordered journal, kept forever (schema ids live here).
    TopicSpec("_registry.journal", "registry", "registry journal", retention_ms=-1, partitions=1),
    TopicSpec("_registry.snapshots", "registry", "snapshots", retention_ms=-1, partitions=1),
)


def topic_names(specs: Iterable[TopicSpec] = TOPICS) -> list[str]:
    return [spec.name for spec in specs]


def ensure_topics(
    settings: Settings, specs: Sequence[TopicSpec] = TOPICS, timeout: float = 30.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions or settings.default_partitions,
            replication_factor=settings.replication_factor,
            config=spec.config(settings),
        )
        for spec in specs
        if spec.name not in existing
    ]
    if not missing:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            # Another `fleet up` may have created it meanwhile: that is success too.
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    return created


def list_topics(settings: Settings, timeout: float = 5.0) -> dict[str, int]:
    """Topic name -> partition count, internal topics left out."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    meta = admin.list_topics(timeout=timeout)
    return {
        name: len(topic.partitions)
        for name, topic in sorted(meta.topics.items())
        if not name.startswith("__")
    }


def consumer_lag(
    settings: Settings, group: str, topics: Sequence[str], timeout: float = 5.0
) -> int:
    """Records of `topics` the consumer group has not committed yet (end offset - committed)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    try:
        meta = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in meta.topics
            for p in meta.topics[topic].partitions
        ]
        lag = 0
        for tp in consumer.committed(partitions, timeout=timeout):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()
