"""`python -m streams.hot_worker`: the hot path (alerts and device twins), run by `fleet up`.

It consumes `telemetry.raw`, `twin.reported` and `twin.desired` in its own consumer group
(`fleetstream-hot`, apart from the cold path's) and, per batch, in **one Kafka transaction**
writes what the batch emitted (`alerts`, `twin.state`, `mqtt.downlink`, `twin.responses`,
`dlq.hot`), the state it changed (`twin.state`, `alerts.state`: the changelogs) and the
batch's input offsets. Either all of it is visible to read-committed consumers or none: a
worker killed mid-batch restarts from the last committed offsets with the state committed
with them, and emits the batch once. Alerting consumers therefore read with
`isolation.level=read_committed` (librdkafka's default; Java's is read_uncommitted).

State is rebuilt from the changelogs for the partitions a worker is given (the topics are
co-partitioned: same key, same partition count); alert rules and the device -> group map are
global tables every worker reads whole. Workers scale by partition: start more with another
`FLEET_HOT_INSTANCE`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.process import process_main
from infra.settings import Settings
from schemas.codec import AvroCodec, CodecRegistry, Decoded, load_schema
from streams.alerts import alert_to_record, rule_from_record
from streams.cold import DeadLetter, SourceRecord
from streams.hot import (
    STAGE,
    Emitted,
    HotCounters,
    HotProcessor,
    alert_states_from_json,
    alert_states_to_json,
)
from streams.registry.agent import RegistryAgent
from streams.registry.devices import DeviceRecord
from streams.registry.rbac import GrantSet, Resource
from streams.runtime.status import write_status
from streams.tables import ChangelogReader, GlobalTable, key_text
from streams.transactions import (
    Aborted,
    BatchLoop,
    ConsumerFenced,
    Transactions,
    check_consumed,
    rewind_to_committed,
)
from streams.twin import from_record, to_record

log = logging.getLogger("fleetstream.hot")

HOT_GROUP = "fleetstream-hot"
TELEMETRY, REPORTED, DESIRED = "telemetry.raw", "twin.reported", "twin.desired"
COMMANDS = "registry.commands"
INPUTS = {
    TELEMETRY: "Telemetry",
    REPORTED: "TwinReported",
    DESIRED: "TwinDesired",
    COMMANDS: "RegistryCommand",
}
TWIN_STATE, ALERT_STATE = "twin.state", "alerts.state"
ALERTS, DOWNLINK, RESPONSES, DLQ = "alerts", "mqtt.downlink", "twin.responses", "dlq.hot"
RULES, DEVICES, GRANTS, AUDIT = "alerts.rules", "registry.devices", "rbac.grants", "audit.log"
OUTPUTS = {
    AUDIT: "AuditRecord",
    GRANTS: "GrantSet",
    ALERTS: "Alert",
    TWIN_STATE: "TwinState",
    DOWNLINK: "Downlink",
    RESPONSES: "TwinResponse",
    RULES: "AlertRule",
    DEVICES: "Device",
}


def now_ms() -> int:
    return int(time.time() * 1000)


class HotWorker(BatchLoop):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.counters = HotCounters()
        self.processor = HotProcessor(self.counters)
        self.registry = RegistryAgent()
        registry = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url}))
        self.codecs: dict[str, AvroCodec] = {
            topic: registry.codec(topic, load_schema(schema))
            for topic, schema in {**INPUTS, **OUTPUTS}.items()
        }
        self.rules = GlobalTable(settings, RULES, self._apply_rule)
        self.devices = GlobalTable(settings, DEVICES, self._apply_device)
        self.grants = GlobalTable(settings, GRANTS, self._apply_grants)
        self.changelogs = ChangelogReader(
            settings,
            {
                TWIN_STATE: self._restore_twin,
                ALERT_STATE: self._restore_alerts,
                DEVICES: self._restore_device,
            },
        )
        self.transactions = Transactions(settings, f"{HOT_GROUP}-{settings.hot_instance}")
        self.consumer = self._new_consumer()
        self._fenced = False  # the consumer hit a fatal error: recover() replaces it
        self._owned: set[int] = set()
        self._last_tick = 0.0
        self.transient_errors = 0  # recovered from (issue 12): broker restarts, timeouts
        self.last_transient_error = ""

    def _new_consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.settings.bootstrap_servers,
                "group.id": HOT_GROUP,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # Range assignment gives one worker the same partition numbers of every input,
                # which is what co-partitioned state needs.
                "partition.assignment.strategy": "range",
                # Static membership: a restarted worker takes its partitions back at once
                # instead of waiting out the dead member's session (45 s).
                "group.instance.id": f"{HOT_GROUP}-{self.settings.hot_instance}",
            }
        )

    # ------------------------------------------------------------------ tables

    def _apply_rule(self, msg: Message) -> None:
        rule_id, value = key_text(msg), msg.value()
        if value is None:
            self.processor.set_rule(rule_id, None)
            return
        decoded = self.codecs[RULES].decode(value)
        try:
            if not isinstance(decoded, Decoded):
                raise ValueError(decoded.detail)
            self.processor.set_rule(rule_id, rule_from_record(decoded.record))
        except ValueError as exc:
            log.warning("alert rule %s at offset %d ignored: %s", rule_id, msg.offset(), exc)

    def _apply_device(self, msg: Message) -> None:
        device_id, value = key_text(msg), msg.value()
        decoded = self.codecs[DEVICES].decode(value) if value is not None else None
        if isinstance(decoded, Decoded):
            # The group's full path: group names are unique only within their project.
            record = decoded.record
            group = Resource(str(record["org"]), str(record["project"]), str(record["group"]))
            self.processor.set_device_group(device_id, str(group))
        else:
            self.processor.set_device_group(device_id, None)

    def _apply_grants(self, msg: Message) -> None:
        key, value = key_text(msg), msg.value()
        decoded = self.codecs[GRANTS].decode(value) if value is not None else None
        try:
            grants = GrantSet.from_record(decoded.record) if isinstance(decoded, Decoded) else None
        except ValueError as exc:
            log.warning("grants of %s at offset %d ignored: %s", key, msg.offset(), exc)
            grants = None
        self.registry.set_grants(key, grants)

    def _restore_device(self, msg: Message) -> None:
        value = msg.value()
        decoded = self.codecs[DEVICES].decode(value) if value is not None else None
        record = DeviceRecord.from_record(decoded.record) if isinstance(decoded, Decoded) else None
        self.registry.restore(msg.partition() or 0, key_text(msg), record)

    def _restore_twin(self, msg: Message) -> None:
        device_id, value = key_text(msg), msg.value()
        if value is None:
            self.processor.forget(msg.partition() or 0, device_id)
            return
        decoded = self.codecs[TWIN_STATE].decode(value)
        if isinstance(decoded, Decoded):
            self.processor.restore_twin(msg.partition() or 0, from_record(decoded.record))

    def _restore_alerts(self, msg: Message) -> None:
        value = msg.value()
        if value is not None:
            states = alert_states_from_json(value)
            self.processor.restore_alert_states(msg.partition() or 0, key_text(msg), states)

    # ------------------------------------------------------------------ partitions

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        new = {tp.partition for tp in partitions} - self._owned
        restored = self.changelogs.restore(sorted(new))
        self._owned |= new
        log.info("given partitions %s; %d changelog records restored", sorted(new), restored)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        self.processor.drop_partitions(gone)
        self.registry.drop_partitions(gone)
        self._owned -= gone
        log.info("partitions %s moved away", sorted(gone))

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self.transactions.start()
        self.rules.catch_up()
        self.devices.catch_up()
        self.grants.catch_up()
        self._subscribe()

    def _subscribe(self) -> None:
        self.consumer.subscribe(list(INPUTS), on_assign=self._on_assign, on_revoke=self._on_revoke)

    def step(self) -> None:
        """One batch: consume, process, write outputs + state + offsets in a transaction."""
        self.rules.poll()
        self.devices.poll()
        self.grants.poll()
        batch = self.consumer.consume(self.settings.hot_max_batch, self.settings.hot_poll_ms / 1000)
        check_consumed(batch)
        started = time.perf_counter()
        out = Emitted()
        now = now_ms()
        consumed = False
        for msg in batch:
            if msg.error() is None:
                consumed = True
                self._process(msg, now, out)
        if time.monotonic() - self._last_tick >= 1.0:
            self._last_tick = time.monotonic()
            self.processor.on_heartbeat_tick(now, out)
        processed = time.perf_counter()
        self.counters.process_s += processed - started
        if consumed or out:
            self._commit(out, consumed)
            self.counters.commit_s += time.perf_counter() - processed

    def _process(self, msg: Message, now: int, out: Emitted) -> None:
        topic = msg.topic() or ""
        value = msg.value() or b""  # no input here is compacted: a tombstone is bad input
        source = SourceRecord(topic, msg.partition() or 0, msg.offset() or 0, msg.key(), value)
        decoded = self.codecs[topic].decode(value)
        if not isinstance(decoded, Decoded):
            out.dead.append(DeadLetter(source, str(decoded.reason), decoded.detail, stage=STAGE))
            self.counters.dead_lettered += 1
            return
        if topic == TELEMETRY:
            self.processor.on_telemetry(source, decoded.record, out)
        elif topic == REPORTED:
            self.processor.on_reported(source, decoded.record, now, out)
        elif topic == COMMANDS:
            self.registry.on_command(source, decoded.record, now, out.devices, out.audits, out.dead)
        else:
            self.processor.on_desired(source, decoded.record, now, out)

    def _produce_all(self, out: Emitted, producer: Producer) -> None:
        produce, codecs = producer.produce, self.codecs
        for event in out.alerts:
            produce(
                ALERTS, key=event.device_id, value=codecs[ALERTS].encode(alert_to_record(event))
            )
        for device_id, twin in out.twins.items():
            produce(TWIN_STATE, key=device_id, value=codecs[TWIN_STATE].encode(to_record(twin)))
        for device_id in out.alert_states:
            states = self.processor.alert_states.get(device_id, {})
            produce(ALERT_STATE, key=device_id, value=alert_states_to_json(states))
        for device_id, record in out.downlinks:
            produce(DOWNLINK, key=device_id, value=codecs[DOWNLINK].encode(record))
        for response in out.responses:
            value = codecs[RESPONSES].encode(response)
            produce(RESPONSES, key=response["device_id"], value=value)
        for device_id, device in out.devices.items():
            produce(DEVICES, key=device_id, value=codecs[DEVICES].encode(device.to_record()))
        for audit in out.audits:
            value = codecs[AUDIT].encode(audit.to_record())
            produce(AUDIT, key=audit.device_id or audit.principal, value=value)
        for dead in out.dead:
            produce(DLQ, key=dead.source.key, value=dead.source.value, headers=dead.headers())

    def _commit(self, out: Emitted, consumed: bool) -> None:
        if not self.transactions.commit(
            self.consumer, lambda producer: self._produce_all(out, producer), consumed
        ):
            raise Aborted("hot path transaction aborted")
        self.counters.transactions += 1

    def recover(self) -> None:
        """After a transient failure or an abort: nothing open, and state and positions back
        to what the last commit holds (the changelogs and the committed offsets). Safe to
        call again if it fails half-way: it drops and restores the whole owned state."""
        self.transactions.abort()
        owned = sorted(self._owned)
        self.processor.drop_partitions(owned)
        self.registry.drop_partitions(set(owned))
        if self._fenced:
            self._replace_consumer()
            return
        self.changelogs.restore(owned)
        rewind_to_committed(self.consumer)

    def _replace_consumer(self) -> None:
        """A new consumer for the dead one: it owns nothing until the group assigns it
        partitions (whose state `_on_assign` restores) and starts at the committed offsets."""
        self._owned = set()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the failed consumer: %s", exc)
        self.consumer = self._new_consumer()
        self._subscribe()
        self._fenced = False

    def on_transient(self, exc: BaseException) -> None:
        self._fenced = self._fenced or isinstance(exc, ConsumerFenced)
        self.transient_errors += 1
        self.last_transient_error = str(exc)

    # ------------------------------------------------------------------ status

    @property
    def status_path(self) -> Path:
        return self.settings.run_dir / "hot-worker.json"

    def write_status(self) -> None:
        write_status(
            self.status_path,
            {
                "pid": os.getpid(),
                "ready": True,
                "partitions": sorted(self._owned),
                "rules": sorted(self.processor.rules),
                "twins": len(self.processor.twins),
                **asdict(self.counters),
                "registry": asdict(self.registry.counters),
                "transient_errors": self.transient_errors,
                "last_transient_error": self.last_transient_error,
            },
        )

    def close(self) -> None:
        self.write_status()
        self.consumer.close()
        self.rules.close()
        self.devices.close()
        self.grants.close()
        self.transactions.close()


def main() -> None:
    process_main("hot worker", HotWorker)


if __name__ == "__main__":
    main()
