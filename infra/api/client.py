"""Talking to the hot path from outside it: twins, alert rules, alerts (used by `fleet`).

Everything goes through Kafka, as any client of the platform would: a desired-state change is
a request on `twin.desired` answered on `twin.responses`; the twin is read from `twin.state`;
rules are records on the compacted `alerts.rules`; alerts are read from `alerts`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.api.answers import AnswerListener
from infra.settings import Settings
from schemas.codec import AvroCodec, CodecRegistry, Decoded, load_schema
from schemas.topics import schema_of
from streams.hot.alerts import (
    AlertEvent,
    AlertRule,
    alert_from_record,
    rule_from_record,
    rule_to_record,
)
from streams.hot.twin import Twin, from_record
from streams.ota.artifacts import Artifact
from streams.ota.events import OtaRequest
from streams.ota.model import Rollout
from streams.ota.model import from_record as rollout_from_record
from streams.registry.devices import AuditRecord, DeviceRecord, RegistryCommand, command_to_record
from streams.registry.rbac import GrantSet, Principal
from streams.runtime.tables import key_text, read_to_end

TWIN_STATE, DESIRED, RESPONSES = "twin.state", "twin.desired", "twin.responses"
RULES, ALERTS, DEVICES = "alerts.rules", "alerts", "registry.devices"
COMMANDS, AUDIT, GRANTS = "registry.commands", "audit.log", "rbac.grants"
OTA_REQUESTS, ROLLOUTS, ARTIFACTS = "ota.requests", "ota.rollouts", "ota.artifacts"

_T = TypeVar("_T")


class HotPathError(Exception):
    """The request did not complete (no answer in time, Kafka refused it)."""


@dataclass(frozen=True)
class TwinAnswer:
    """The twin agent's answer to a desired-state change."""

    status: str  # accepted, unchanged, conflict, invalid
    version: int
    detail: str | None

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "unchanged")


class HotPathClient:
    def __init__(self, settings: Settings, timeout: float = 30.0) -> None:
        self.settings = settings
        self.timeout = timeout
        registry = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url}))
        self._registry = registry
        self._codecs: dict[str, AvroCodec] = {}
        self._producer: Producer | None = None
        self._listeners: dict[str, AnswerListener] = {}  # answers topic -> its listener
        self._listeners_lock = threading.Lock()

    def codec(self, topic: str) -> AvroCodec:
        if topic not in self._codecs:
            self._codecs[topic] = self._registry.codec(topic, load_schema(schema_of(topic)))
        return self._codecs[topic]

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": f"fleet-cli-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
            }
        )

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(
                {
                    "bootstrap.servers": self.settings.bootstrap_servers,
                    "enable.idempotence": True,
                    "acks": "all",
                }
            )
        return self._producer

    def _produce_many(self, topic: str, records: Sequence[tuple[str, bytes | None]]) -> None:
        """Write `(key, value)` records and wait until Kafka has every one."""
        producer = self._get_producer()
        failures: list[str] = []
        for key, value in records:
            producer.produce(
                topic,
                key=key,
                value=value,
                on_delivery=lambda err, _m: failures.append(str(err)) if err else None,
            )
            producer.poll(0)
        if producer.flush(self.timeout) or failures:
            raise HotPathError(f"{topic}: not delivered: {failures[:3] or 'timed out'}")

    def _produce(self, topic: str, key: str, value: bytes | None) -> None:
        self._produce_many(topic, [(key, value)])

    def _read_all(self, topic: str) -> list[Message]:
        """Every committed record of `topic`, in partition order."""
        consumer = self._consumer()
        try:
            meta = consumer.list_topics(topic, timeout=self.timeout).topics[topic]
            messages: list[Message] = []
            tps = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
            read_to_end(consumer, tps, messages.append, self.timeout)
            return messages
        finally:
            consumer.close()

    def _decode(self, topic: str, msg: Message) -> dict[str, Any] | None:
        value = msg.value()
        if value is None:
            return None
        decoded = self.codec(topic).decode(value)
        return decoded.record if isinstance(decoded, Decoded) else None

    def _table(self, topic: str, parse: Callable[[dict[str, Any]], _T]) -> dict[str, _T]:
        """A compacted topic read to its end: key -> its last record, parsed (a tombstone
        drops the key)."""
        out: dict[str, _T] = {}
        for msg in self._read_all(topic):
            record = self._decode(topic, msg)
            if record is None:
                out.pop(key_text(msg), None)
            else:
                out[key_text(msg)] = parse(record)
        return out

    # ------------------------------------------------------------------ twins

    def twins(self) -> dict[str, Twin]:
        """Every device's current twin (the compacted `twin.state`, read to its end)."""
        return self._table(TWIN_STATE, from_record)

    def twin(self, device_id: str) -> Twin | None:
        return self.twins().get(device_id)

    def set_desired(
        self, device_id: str, patch: Mapping[str, Any], version: int | None, principal: str = "cli"
    ) -> TwinAnswer:
        """Send a desired patch and wait for the twin agent's answer."""
        return self.set_desired_many({device_id: patch}, version, principal)[device_id]

    def set_desired_many(
        self,
        patches: Mapping[str, Mapping[str, Any]],
        version: int | None = None,
        principal: str = "cli",
    ) -> dict[str, TwinAnswer]:
        """Send one desired patch per device, then wait for every answer (device -> answer)."""
        now = int(time.time() * 1000)
        requests: dict[str, tuple[str, dict[str, Any]]] = {}  # request id -> (key, record)
        by_request: dict[str, str] = {}
        for device_id, patch in patches.items():
            request_id = uuid.uuid4().hex
            by_request[request_id] = device_id
            requests[request_id] = (
                device_id,
                {
                    "device_id": device_id,
                    "request_id": request_id,
                    "expected_version": version,
                    "patch": json.dumps(dict(patch), separators=(",", ":")),
                    "principal": principal,
                    "ts": now,
                },
            )
        answers = self._request(DESIRED, requests, RESPONSES, "request_id", "desired changes")
        return {
            by_request[rid]: TwinAnswer(str(a["status"]), int(a["version"]), a.get("detail"))
            for rid, a in answers.items()
        }

    def _request(
        self,
        topic: str,
        requests: Mapping[str, tuple[str, dict[str, Any]]],
        answers_topic: str,
        id_field: str,
        what: str,
    ) -> dict[str, dict[str, Any]]:
        """Write request records (id -> (key, record)) and wait for the answer to each one: the
        record on `answers_topic` whose `id_field` is its id (infra/api/answers.py)."""
        try:
            listener = self._listener(answers_topic, id_field)
            codec = self.codec(topic)
        except KafkaException as exc:
            raise HotPathError(str(exc)) from exc
        waiter = listener.expect(requests)  # before sending: no answer can slip by
        try:
            self._produce_many(topic, [(k, codec.encode(r)) for k, r in requests.values()])
        except KafkaException as exc:
            listener.forget(waiter)
            raise HotPathError(str(exc)) from exc
        except BaseException:
            listener.forget(waiter)
            raise
        answers = listener.wait(waiter, self.timeout)
        if len(answers) < len(requests):
            raise HotPathError(
                f"{len(requests) - len(answers)} of {len(requests)} {what} unanswered "
                f"within {self.timeout}s (is the stream worker up?)"
            )
        return answers

    def _listener(self, topic: str, id_field: str) -> AnswerListener:
        with self._listeners_lock:
            listener = self._listeners.get(topic)
            if listener is None:
                self.codec(topic)  # registered once, before the listener's thread decodes
                listener = AnswerListener(
                    self.settings,
                    topic,
                    id_field,
                    lambda msg: self._decode(topic, msg),
                    self.timeout,
                )
                self._listeners[topic] = listener
            return listener

    # ------------------------------------------------------------------ registry and grants

    def registry_commands(self, commands: Sequence[RegistryCommand]) -> dict[str, AuditRecord]:
        """Send registry commands; wait for the audit record of each (command id -> record)."""
        requests = {c.command_id: (c.device_id, command_to_record(c)) for c in commands}
        answers = self._request(COMMANDS, requests, AUDIT, "command_id", "registry commands")
        return {cid: AuditRecord.from_record(a) for cid, a in answers.items()}

    def devices(self) -> dict[str, DeviceRecord]:
        """The registry (the compacted `registry.devices`, read to its end)."""
        return self._table(DEVICES, DeviceRecord.from_record)

    def grant_sets(self) -> dict[str, GrantSet]:
        return self._table(GRANTS, GrantSet.from_record)

    def put_grants(self, grants: GrantSet) -> None:
        """Replace a principal's grant set (the caller has authorized the change)."""
        key = grants.principal.key
        self._produce(GRANTS, key, self.codec(GRANTS).encode(grants.to_record()))

    # ------------------------------------------------------------------ alert rules

    def put_rule(self, rule: AlertRule) -> None:
        self._produce(RULES, rule.rule_id, self.codec(RULES).encode(rule_to_record(rule)))

    def delete_rule(self, rule_id: str) -> None:
        self._produce(RULES, rule_id, None)

    def rules(self) -> dict[str, AlertRule]:
        return self._table(RULES, rule_from_record)

    # ------------------------------------------------------------------ alerts and devices

    def alerts(self, since_ms: int = 0) -> list[AlertEvent]:
        """Alert records on `alerts` whose device time is at or after `since_ms`."""
        events = []
        for msg in self._read_all(ALERTS):
            record = self._decode(ALERTS, msg)
            if record is not None and int(record["ts"]) >= since_ms:
                events.append(alert_from_record(record))
        return sorted(events, key=lambda e: (e.ts, e.device_id, e.seq))

    def register_devices(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write `registry.devices` entries (Avro `Device` records), keyed by device id."""
        codec = self.codec(DEVICES)
        self._produce_many(DEVICES, [(r["device_id"], codec.encode(r)) for r in records])

    # ------------------------------------------------------------------ OTA

    def put_artifact(self, artifact: Artifact) -> None:
        """Publish a stored artifact's record on `ota.artifacts` (key: its sha256)."""
        value = self.codec(ARTIFACTS).encode(artifact.to_record())
        self._produce(ARTIFACTS, artifact.artifact_id, value)

    def ota_request(self, request: OtaRequest, principal: Principal) -> AuditRecord:
        """Ask the OTA controller (create, approve, reject, pause, resume, abort) and wait for
        its decision: the audit record answering the request."""
        request_id = uuid.uuid4().hex
        record = request.to_record(request_id, principal, int(time.time() * 1000))
        answers = self._request(
            OTA_REQUESTS,
            {request_id: (request.rollout_id, record)},
            AUDIT,
            "command_id",
            "OTA requests",
        )
        return AuditRecord.from_record(answers[request_id])

    def rollouts(self) -> dict[str, Rollout]:
        return self._table(ROLLOUTS, rollout_from_record)

    def close(self) -> None:
        with self._listeners_lock:
            listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            listener.close()
        if self._producer is not None:
            self._producer.flush(self.timeout)
