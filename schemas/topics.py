"""The Kafka topics of ARCHITECTURE.md, declared once: the topic catalogue.

Names are contracts: consumers outside the platform subscribe to them. Each topic says its
key, its value (``schema``: the Avro schema's name, a ``schemas/avro/<schema>.avsc`` file,
where the value is Avro), its cleanup policy, retention and partition count. Every topic ->
schema map is derived from here (:func:`schema_of`, :data:`SCHEMAS`); creating the topics on
a cluster is the composition root's step (infra/topics.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DAY_MS",
    "SCHEMAS",
    "TOPICS",
    "TOPICS_BY_NAME",
    "TopicSpec",
    "schema_of",
    "topic_names",
]

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    value: str  # what a value holds, in words
    schema: str | None = None  # the Avro schema of the value (schemas/avro/<schema>.avsc)
    cleanup: Literal["delete", "compact"] = "delete"
    retention_ms: int | None = 7 * DAY_MS
    partitions: int | None = None  # None: the stack's default partition count
    max_message_bytes: int | None = None  # None: the broker's default (1 MiB)

    def config(self, min_insync_replicas: int) -> dict[str, str]:
        """The topic-level Kafka config it is created with."""
        config = {
            "cleanup.policy": self.cleanup,
            "min.insync.replicas": str(min_insync_replicas),
        }
        if self.cleanup == "delete" and self.retention_ms is not None:
            config["retention.ms"] = str(self.retention_ms)
        if self.max_message_bytes is not None:
            config["max.message.bytes"] = str(self.max_message_bytes)
        return config


_DLQ = "original bytes + headers"

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("telemetry.raw", "device id", "Avro Telemetry", "Telemetry"),
    TopicSpec("device.events", "device id", "Avro DeviceEvent", "DeviceEvent"),
    TopicSpec("twin.reported", "device id", "Avro reported patch", "TwinReported"),
    TopicSpec("twin.desired", "device id", "Avro desired patch", "TwinDesired"),
    TopicSpec(
        "twin.state", "device id", "Avro TwinState (the full twin)", "TwinState", cleanup="compact"
    ),
    # The twin agent's answers to twin.desired requests (accepted, conflict, ...).
    TopicSpec(
        "twin.responses", "device id", "Avro TwinResponse", "TwinResponse", retention_ms=DAY_MS
    ),
    TopicSpec("alerts", "device id", "Avro Alert", "Alert"),
    # Rules are data: one record per rule id, a tombstone deletes it. Every hot worker reads
    # all of it (a global table), so one partition keeps it ordered.
    TopicSpec(
        "alerts.rules", "rule id", "Avro AlertRule", "AlertRule", cleanup="compact", partitions=1
    ),
    # Changelog of the alert agent's per-device state (co-partitioned with telemetry.raw).
    TopicSpec("alerts.state", "device id", "JSON rule states", cleanup="compact"),
    TopicSpec("mqtt.downlink", "device id", "topic + payload + qos", "Downlink"),
    TopicSpec("registry.devices", "device id", "Avro Device", "Device", cleanup="compact"),
    # Requests to change the registry; the registry agent applies them after authorization.
    TopicSpec("registry.commands", "device id", "Avro RegistryCommand", "RegistryCommand"),
    # Every decision on a command (applied, unchanged, denied, refused), kept a year.
    TopicSpec(
        "audit.log",
        "device id or principal",
        "Avro AuditRecord",
        "AuditRecord",
        retention_ms=365 * DAY_MS,
    ),
    TopicSpec("rbac.grants", "principal", "Avro grant set", "GrantSet", cleanup="compact"),
    # A rollout record carries every device's progress (about 84 bytes each): room for 150k.
    TopicSpec(
        "ota.rollouts",
        "rollout id",
        "Avro Rollout",
        "Rollout",
        cleanup="compact",
        max_message_bytes=16 * 1024 * 1024,
    ),
    # Operators' requests (create, approve, pause, ...), answered on audit.log.
    TopicSpec("ota.requests", "rollout id", "Avro OtaRequest", "OtaRequest"),
    TopicSpec(
        "ota.artifacts",
        "artifact id (sha256)",
        "Avro OtaArtifact",
        "OtaArtifact",
        cleanup="compact",
    ),
    # Per hot batch, a device group's readings in one minute (streams/hot/health.py): what the
    # fleet_health job reads instead of the whole telemetry stream.
    TopicSpec("telemetry.digests", "group path", "JSON health digest", retention_ms=DAY_MS),
    # Per device group, 1-minute health windows (the shipped Faust job fleet_health).
    TopicSpec("fleet.health", "group path@window start", "JSON health window", cleanup="compact"),
    TopicSpec("dlq.ingest", "original key", _DLQ, retention_ms=30 * DAY_MS),
    TopicSpec("dlq.cold", "original key", _DLQ, retention_ms=30 * DAY_MS),
    TopicSpec("dlq.hot", "original key", _DLQ, retention_ms=30 * DAY_MS),
    TopicSpec("dlq.ota", "original key", _DLQ, retention_ms=30 * DAY_MS),
    # Telemetry rows the cold path's quality gate refused (also in the `quarantine` table):
    # original bytes, headers `error` = the rule, `detail` = the reason.
    TopicSpec("dlq.quality", "device id", _DLQ, retention_ms=30 * DAY_MS),
    # `fleet quality release` requests, applied by the cold worker.
    TopicSpec(
        "quality.release", "request id", "Avro QualityRelease", "QualityRelease", partitions=1
    ),
    # The bridges' canaries (ingest/bridge.py): proof that broker -> bridge -> Kafka works.
    TopicSpec("ingest.canary", "bridge replica", "canary JSON", retention_ms=DAY_MS, partitions=1),
    # The schema registry's storage: one ordered journal, kept forever (schema ids live here).
    TopicSpec("_registry.journal", "registry", "registry journal", retention_ms=-1, partitions=1),
    TopicSpec("_registry.snapshots", "registry", "snapshots", retention_ms=-1, partitions=1),
)

TOPICS_BY_NAME: Mapping[str, TopicSpec] = {spec.name: spec for spec in TOPICS}

# Topic -> the Avro schema of its values, for every Avro topic of the catalogue.
SCHEMAS: Mapping[str, str] = {spec.name: spec.schema for spec in TOPICS if spec.schema is not None}


def schema_of(topic: str) -> str:
    """The Avro schema name of ``topic``'s values; KeyError if it is not an Avro topic."""
    try:
        return SCHEMAS[topic]
    except KeyError:
        raise KeyError(f"{topic!r} is no Avro topic of the catalogue (schemas/topics.py)") from None


def topic_names(specs: Iterable[TopicSpec] = TOPICS) -> list[str]:
    return [spec.name for spec in specs]
