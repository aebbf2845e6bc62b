"""The OTA rollout controller, run by `fleet up` (`python -m infra.services.ota`, which reads the
settings and gives it an :class:`OtaConfig`).

A thin loop around the pure state machine of streams/ota/rollout.py. It consumes operators' requests
(`ota.requests`), devices' status reports (`device.events`, type `ota_status`), raised alerts
(`alerts`) and telemetry arrival times (`telemetry.raw`, keys and timestamps only: nothing is
decoded), in its own consumer group, `fleetstream-ota`. Per batch, in **one Kafka
transaction**, it writes the rollouts that changed (`ota.rollouts`, compacted: the
controller's changelog), the OTA commands they issued (`mqtt.downlink` ->
`devices/<id>/ota/command`), the audit records (`audit.log`, which also answer the requests)
and the batch's offsets. A controller killed mid-cohort restarts from the last commit with
the rollouts committed with it: no command is sent twice.

Rollouts span many devices, so they are not partitioned by device: the controller is one
process (a static group member) holding every rollout; its inputs are small (one status
report per device per command). The registry (`registry.devices`), grants (`rbac.grants`)
and artifacts (`ota.artifacts`) are global tables. A device entering a rollout's target
(provisioned, moved or re-activated) is a join, so it gets the update too.

**Errors.** A record that cannot be decoded, on an input or a table topic, is counted
(`dead_lettered`, and per reason in `dead_letter_reasons`) and written to `dlq.ota` with its
original key and bytes and the headers of the platform's dead letters (`error`, `detail`,
`source` = `ota`, `topic`, `partition`, `offset`), in the next transaction. It changes nothing:
a corrupt table record is not a deletion (only a tombstone, a record without a value, is), and
a corrupt rollout does not replace the last good one. A value-less record on an input topic
(none is compacted) is bad input too (`no_value`). Table topics are read again from their start
by every process, so a restarted controller dead-letters a corrupt table record again (the same
topic/partition/offset headers); within one process it is written once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from prometheus_client.core import Metric

from schemas.codec import AvroCodec, CodecRegistry, Decoded, load_schema
from streams.hot.alerts import alert_from_record
from streams.ota.artifacts import Artifact
from streams.ota.events import (
    Abort,
    AlertRaised,
    Approve,
    Command,
    CreateRollout,
    DeviceJoined,
    Event,
    Pause,
    Resume,
    Tick,
    report_from_event,
)
from streams.ota.metrics import ota_metrics
from streams.ota.model import ApprovalDecision, Rollout, from_record, to_record
from streams.ota.plan import RolloutPlan, in_target
from streams.ota.rollout import run
from streams.registry.devices import AuditDecision, AuditRecord, DeviceRecord
from streams.registry.rbac import GrantSet, Principal, Resource
from streams.runtime.clients import KafkaConfig
from streams.runtime.loop import BatchLoop
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.status import write_status
from streams.runtime.tables import GlobalTable, key_text, read_to_end
from streams.runtime.transactions import (
    Aborted,
    ConsumerFenced,
    Transactions,
    check_consumed,
    rewind_to_committed,
)

log = logging.getLogger("fleetstream.ota")

OTA_GROUP = "fleetstream-ota"
REQUESTS, EVENTS, ALERTS, TELEMETRY = "ota.requests", "device.events", "alerts", "telemetry.raw"
ROLLOUTS, DOWNLINK, AUDIT = "ota.rollouts", "mqtt.downlink", "audit.log"
DEVICES, GRANTS, ARTIFACTS = "registry.devices", "rbac.grants", "ota.artifacts"
DLQ = "dlq.ota"
STAGE = "ota"  # the dead letters' `source` header
# What the controller's consumer group reads (`fleet status` shows its lag on these).
INPUTS = (REQUESTS, EVENTS, ALERTS, TELEMETRY)
SCHEMAS = {
    REQUESTS: "OtaRequest",
    EVENTS: "DeviceEvent",
    ALERTS: "Alert",
    ROLLOUTS: "Rollout",
    DOWNLINK: "Downlink",
    AUDIT: "AuditRecord",
    DEVICES: "Device",
    GRANTS: "GrantSet",
    ARTIFACTS: "OtaArtifact",
}
TICK_S = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class OtaConfig:
    """What the controller needs of the platform's settings (infra/services/ota.py builds it)."""

    bootstrap_servers: str
    registry_url: str
    run_dir: Path


def source_record(msg: Message) -> SourceRecord:
    """Where ``msg`` came from, with its key and original bytes (what a dead letter keeps)."""
    return SourceRecord(
        msg.topic() or "", msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value()
    )


def decode_record(
    codec: AvroCodec, source: SourceRecord, *, compacted: bool
) -> dict[str, object] | DeadLetter | None:
    """Pure: the record in ``source``; None for a tombstone (a record without a value on a
    ``compacted`` topic: a deletion); a :class:`DeadLetter` (stage ``ota``) for what cannot be
    decoded, and for a record without a value on a topic that is not compacted."""
    if source.value is None:
        if compacted:
            return None
        return DeadLetter(source, "no_value", "a record without a value (tombstone)", stage=STAGE)
    decoded = codec.decode(source.value)
    if isinstance(decoded, Decoded):
        return decoded.record
    return DeadLetter(source, str(decoded.reason), decoded.detail, stage=STAGE)


@dataclass
class OtaCounters:
    requests: int = 0
    reports: int = 0
    alerts: int = 0
    joins: int = 0
    commands: int = 0
    audits: int = 0
    transactions: int = 0
    rollouts: int = 0
    active: int = 0
    dead_lettered: int = 0  # records that could not be decoded, sent to dlq.ota
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    events: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    audits: list[AuditRecord] = field(default_factory=list)  # answers the controller itself gives
    dead: list[DeadLetter] = field(default_factory=list)  # input records that could not be read


def request_event(record: dict[str, object], artifacts: dict[str, Artifact]) -> Event | str:
    """The event an `ota.requests` record asks for, or why it cannot be one."""
    kind = str(record["kind"])
    request_id = str(record["request_id"])
    try:
        principal = Principal.parse(str(record["principal"]))
    except ValueError as exc:
        return f"invalid principal: {exc}"
    comment = record.get("comment")
    note = None if comment is None else str(comment)
    if kind == "create":
        artifact = artifacts.get(str(record.get("artifact_id")))
        if artifact is None:
            return f"unknown artifact {record.get('artifact_id')!r}"
        try:
            target = Resource.parse(str(record.get("target")))
            plan_text = record.get("plan")
            plan = (
                RolloutPlan()
                if plan_text is None
                else RolloutPlan.from_record(json.loads(str(plan_text)))
            )
        except (ValueError, KeyError, TypeError) as exc:
            return f"invalid rollout: {exc}"
        return CreateRollout(
            request_id=request_id,
            principal=principal,
            rollout_id=str(record["rollout_id"]),
            artifact=artifact,
            target=target,
            plan=plan,
        )
    if kind in ("approve", "reject"):
        decision = ApprovalDecision.approved if kind == "approve" else ApprovalDecision.rejected
        return Approve(request_id=request_id, principal=principal, decision=decision, comment=note)
    if kind == "pause":
        return Pause(request_id=request_id, principal=principal)
    if kind == "resume":
        return Resume(request_id=request_id, principal=principal)
    return Abort(request_id=request_id, principal=principal, reason=note)


class OtaWorker(BatchLoop):
    def __init__(self, config: OtaConfig) -> None:
        self.config = config
        self.counters = OtaCounters()
        registry = CodecRegistry(SchemaRegistryClient({"url": config.registry_url}))
        self.codecs: dict[str, AvroCodec] = {
            topic: registry.codec(topic, load_schema(schema)) for topic, schema in SCHEMAS.items()
        }
        self.rollouts: dict[str, Rollout] = {}
        self.by_device: dict[str, set[str]] = defaultdict(set)  # device -> its rollouts
        self.devices: dict[str, DeviceRecord] = {}
        self.grants: dict[str, GrantSet] = {}
        self.artifacts: dict[str, Artifact] = {}
        self.last_seen: dict[str, int] = {}
        self._joined: list[str] = []
        self._joins_in_flight: list[str] = []
        # Dead letters of table and changelog records (read outside the transactions): written
        # with the next batch, given back by recover() if it is lost, and each written once.
        self._table_dead: list[DeadLetter] = []
        self._table_dead_in_flight: list[DeadLetter] = []
        self._table_dead_seen: set[tuple[str, int, int]] = set()
        self.transient_errors = 0  # recovered from (issue 12): broker restarts, timeouts
        self.last_transient_error = ""
        kafka = KafkaConfig(config.bootstrap_servers, config.registry_url, "ota-controller")
        self.device_table = GlobalTable(kafka, DEVICES, self._apply_device)
        self.grant_table = GlobalTable(kafka, GRANTS, self._apply_grants)
        self.artifact_table = GlobalTable(kafka, ARTIFACTS, self._apply_artifact)
        self.transactions = Transactions(kafka, f"{OTA_GROUP}-0")
        self.consumer = self._new_consumer()
        self._fenced = False  # the consumer hit a fatal error: recover() replaces it
        self._last_tick = 0.0

    def _new_consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.config.bootstrap_servers,
                "group.id": OTA_GROUP,
                "group.instance.id": f"{OTA_GROUP}-0",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )

    # ------------------------------------------------------------------ tables

    def _dead_letter(self, dead: DeadLetter) -> None:
        self.counters.dead_lettered += 1
        reasons = self.counters.dead_letter_reasons
        reasons[dead.reason] = reasons.get(dead.reason, 0) + 1
        log.warning(
            "dead-lettered %s[%d]@%d: %s (%s)",
            dead.source.topic,
            dead.source.partition,
            dead.source.offset,
            dead.reason,
            dead.detail,
        )

    def _decode_table(self, topic: str, msg: Message) -> dict[str, object] | DeadLetter | None:
        """A compacted topic's record, None for a tombstone, or its dead letter (kept for the
        next transaction, once per record in this process)."""
        source = source_record(msg)
        result = decode_record(self.codecs[topic], source, compacted=True)
        if isinstance(result, DeadLetter):
            where = (source.topic, source.partition, source.offset)
            if where not in self._table_dead_seen:
                self._table_dead_seen.add(where)
                self._table_dead.append(result)
                self._dead_letter(result)
        return result

    def _apply_device(self, msg: Message) -> None:
        record = self._decode_table(DEVICES, msg)
        device_id = key_text(msg)
        if isinstance(record, DeadLetter):
            return
        if record is None:
            self.devices.pop(device_id, None)
            return
        device = DeviceRecord.from_record(record)
        before = self.devices.get(device_id)
        self.devices[device_id] = device
        if before is None or before.resource != device.resource or before.status != device.status:
            self._joined.append(device_id)

    def _apply_grants(self, msg: Message) -> None:
        record = self._decode_table(GRANTS, msg)
        if isinstance(record, DeadLetter):
            return
        if record is None:
            self.grants.pop(key_text(msg), None)
        else:
            self.grants[key_text(msg)] = GrantSet.from_record(record)

    def _apply_artifact(self, msg: Message) -> None:
        record = self._decode_table(ARTIFACTS, msg)
        if isinstance(record, dict):
            self.artifacts[key_text(msg)] = Artifact.from_record(record)

    def _restore_rollouts(self) -> None:
        """Every rollout, as last committed (the compacted `ota.rollouts`)."""
        self.rollouts.clear()
        self.by_device.clear()
        reader = Consumer(
            {
                "bootstrap.servers": self.config.bootstrap_servers,
                "group.id": f"{OTA_GROUP}-restore",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
            }
        )
        try:
            meta = reader.list_topics(ROLLOUTS, timeout=30).topics[ROLLOUTS]
            tps = [TopicPartition(ROLLOUTS, p) for p in sorted(meta.partitions)]

            def apply(msg: Message) -> None:
                record = self._decode_table(ROLLOUTS, msg)
                if isinstance(record, DeadLetter):
                    return  # the last good state of that rollout stays
                if record is None:
                    self.rollouts.pop(key_text(msg), None)
                else:
                    self._keep(from_record(record))

            read_to_end(reader, tps, apply, 60)
        finally:
            reader.close()

    def _keep(self, rollout: Rollout) -> None:
        self.rollouts[rollout.rollout_id] = rollout
        for device_id in rollout.devices:
            self.by_device[device_id].add(rollout.rollout_id)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self.transactions.start()
        self.device_table.catch_up()
        self.grant_table.catch_up()
        self.artifact_table.catch_up()
        self._joined.clear()  # the registry as it stands is what planning sees
        self._restore_rollouts()
        self.consumer.subscribe(list(INPUTS))

    def step(self) -> None:
        self.device_table.poll()
        self.grant_table.poll()
        self.artifact_table.poll()
        messages = self.consumer.consume(5000, 0.05)
        check_consumed(messages)
        batch = Batch()
        consumed = False
        for msg in messages:
            if msg.error() is None:
                consumed = True
                self._route(msg, batch)
        self._route_joins(batch)
        if time.monotonic() - self._last_tick >= TICK_S:
            self._last_tick = time.monotonic()
            tick = Tick(last_seen_ms=dict(self.last_seen))
            for rollout_id, rollout in self.rollouts.items():
                if not rollout.final:
                    batch.events[rollout_id].append(tick)
        if consumed or batch.events or batch.audits or batch.dead or self._table_dead:
            self._apply(batch, consumed)

    def _route(self, msg: Message, batch: Batch) -> None:
        topic = msg.topic()
        if topic == TELEMETRY:
            _kind, stamp = msg.timestamp()
            self.last_seen[key_text(msg)] = stamp
            return
        record = decode_record(self.codecs[topic or ""], source_record(msg), compacted=False)
        if record is None:
            return  # unreachable: no input is compacted
        if isinstance(record, DeadLetter):
            self._dead_letter(record)
            batch.dead.append(record)
            return
        if topic == REQUESTS:
            self.counters.requests += 1
            event = request_event(record, self.artifacts)
            if isinstance(event, str):
                batch.audits.append(self._refusal(record, event))
            else:
                batch.events[str(record["rollout_id"])].append(event)
        elif topic == EVENTS:
            report = report_from_event(record)
            if report is not None:
                self.counters.reports += 1
                targets = self.by_device.get(report.device_id, set())
                if report.rollout_id is not None and report.rollout_id in self.rollouts:
                    targets = {report.rollout_id}
                for rollout_id in targets:
                    batch.events[rollout_id].append(report)
        elif topic == ALERTS:
            raised = AlertRaised.from_alert(alert_from_record(record))
            if raised is not None:
                self.counters.alerts += 1
                for rollout_id in self.by_device.get(raised.device_id, set()):
                    batch.events[rollout_id].append(raised)

    def _route_joins(self, batch: Batch) -> None:
        joined, self._joined = self._joined, []
        self._joins_in_flight = joined  # given back by recover() if this batch is lost
        for device_id in joined:
            device = self.devices.get(device_id)
            if device is None:
                continue
            for rollout in self.rollouts.values():
                if (
                    rollout.cohorts
                    and device_id not in rollout.devices
                    and in_target(rollout.target, device)
                ):
                    self.counters.joins += 1
                    batch.events[rollout.rollout_id].append(DeviceJoined(device_id=device_id))

    def _refusal(self, record: dict[str, object], reason: str) -> AuditRecord:
        return AuditRecord(
            ts_ms=now_ms(),
            command_id=str(record["request_id"]),
            command=f"ota.{record['kind']}",
            principal=str(record["principal"]),
            action="ota.create" if record["kind"] == "create" else "ota.control",
            device_id=None,
            resource=None if record.get("target") is None else str(record["target"]),
            decision=AuditDecision.refused,
            authorization="not evaluated: the request is invalid",
            reason=reason,
        )

    def _apply(self, batch: Batch, consumed: bool) -> None:
        now = now_ms()
        changed: dict[str, Rollout] = {}
        commands: list[Command] = []
        audits = list(batch.audits)
        dead = [*batch.dead, *self._table_dead]
        self._table_dead_in_flight, self._table_dead = self._table_dead, []
        for rollout_id, events in batch.events.items():
            result = run(
                self.rollouts.get(rollout_id),
                events,
                now_ms=now,
                grants=self.grants,
                devices=self.devices,
            )
            commands.extend(result.commands)
            audits.extend(result.audits)
            if result.changed and result.rollout is not None:
                changed[rollout_id] = result.rollout

        def produce(producer: Producer) -> None:
            codecs = self.codecs
            for rollout_id, rollout in changed.items():
                producer.produce(
                    ROLLOUTS, key=rollout_id, value=codecs[ROLLOUTS].encode(to_record(rollout))
                )
            for command in commands:
                value = codecs[DOWNLINK].encode(command.to_downlink())
                producer.produce(DOWNLINK, key=command.device_id, value=value)
            for audit in audits:
                value = codecs[AUDIT].encode(audit.to_record())
                producer.produce(AUDIT, key=audit.device_id or audit.principal, value=value)
            for letter in dead:
                producer.produce(
                    DLQ, key=letter.source.key, value=letter.source.value, headers=letter.headers()
                )

        if not self.transactions.commit(self.consumer, produce, consumed):
            raise Aborted("OTA transaction aborted")
        for rollout in changed.values():
            self._keep(rollout)
        self.counters.transactions += 1
        self.counters.commands += len(commands)
        self.counters.audits += len(audits)
        self._joins_in_flight = []
        self._table_dead_in_flight = []

    def recover(self) -> None:
        """After a transient failure or an abort: nothing open, rollouts and positions back
        to what the last commit holds; devices that joined in the lost batch join again."""
        self.transactions.abort()
        self._joined[:0] = self._joins_in_flight
        self._joins_in_flight = []
        self._table_dead[:0] = self._table_dead_in_flight
        self._table_dead_in_flight = []
        self._restore_rollouts()
        if self._fenced:
            # A new consumer for the dead one: it starts at the committed offsets.
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the failed consumer: %s", exc)
            self.consumer = self._new_consumer()
            self.consumer.subscribe(list(INPUTS))
            self._fenced = False
            return
        rewind_to_committed(self.consumer)

    def on_transient(self, exc: BaseException) -> None:
        self._fenced = self._fenced or isinstance(exc, ConsumerFenced)
        self.transient_errors += 1
        self.last_transient_error = str(exc)

    # ------------------------------------------------------------------ status

    @property
    def status_path(self) -> Path:
        return self.config.run_dir / "ota-controller.json"

    def write_status(self) -> None:
        self.counters.rollouts = len(self.rollouts)
        self.counters.active = sum(1 for r in self.rollouts.values() if not r.final)
        write_status(
            self.status_path,
            {
                "pid": os.getpid(),
                "ready": True,
                "states": {rid: str(r.state) for rid, r in self.rollouts.items()},
                **asdict(self.counters),
                "transient_errors": self.transient_errors,
                "last_transient_error": self.last_transient_error,
            },
        )

    def metrics(self) -> Iterator[Metric]:
        return ota_metrics(self.counters, self.rollouts, self.transient_errors)

    def close(self) -> None:
        self.write_status()
        self.consumer.close()
        for table in (self.device_table, self.grant_table, self.artifact_table):
            table.close()
        self.transactions.close()
