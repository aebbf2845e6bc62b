"""The hot path job (alerts and device twins) as a spec for the kit's transactional loop.

It consumes `telemetry.raw`, `twin.reported`, `twin.desired` and `registry.commands` in its own
consumer group (`fleetstream-hot`, apart from the cold path's) and, per batch, in one Kafka
transaction writes what the batch emitted (`alerts`, `twin.state`, `mqtt.downlink`,
`twin.responses`, `registry.devices`, `audit.log`, `dlq.hot`), the state it changed
(`twin.state`, `alerts.state`, `registry.devices`: the changelogs) and the batch's input
offsets (streams/runtime/job.py). Alerting consumers therefore read with
`isolation.level=read_committed` (librdkafka's default; Java's is read_uncommitted).

Alert rules, the device -> group map and RBAC grants are global tables every instance reads
whole. Instances scale by partition: start more with another `FLEET_HOT_INSTANCE`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.topics import schema_of
from streams.hot.alerts import alert_to_record, rule_from_record
from streams.hot.metrics import hot_metrics
from streams.hot.processor import (
    STAGE,
    Emitted,
    HotCounters,
    HotProcessor,
    alert_states_from_json,
    alert_states_to_json,
)
from streams.hot.twin import from_record, to_record
from streams.registry.agent import RegistryAgent
from streams.registry.devices import DeviceRecord
from streams.registry.rbac import GrantSet, Resource
from streams.runtime.spec import (
    Batch,
    JobSpec,
    Output,
    TableRecord,
    TableSpec,
    dead_letter_output,
)
from streams.runtime.tables import UnreadableRecord

HOT_GROUP = "fleetstream-hot"
TELEMETRY, REPORTED, DESIRED = "telemetry.raw", "twin.reported", "twin.desired"
COMMANDS = "registry.commands"
# Each topic's schema comes from the one catalogue (schemas/topics.py).
INPUTS = {topic: schema_of(topic) for topic in (TELEMETRY, REPORTED, DESIRED, COMMANDS)}
TWIN_STATE, ALERT_STATE = "twin.state", "alerts.state"
ALERTS, DOWNLINK, RESPONSES, DLQ = "alerts", "mqtt.downlink", "twin.responses", "dlq.hot"
RULES, DEVICES, GRANTS, AUDIT = "alerts.rules", "registry.devices", "rbac.grants", "audit.log"
DIGESTS = "telemetry.digests"
OUTPUTS: dict[str, str | None] = {
    **{t: schema_of(t) for t in (AUDIT, ALERTS, TWIN_STATE, DOWNLINK, RESPONSES, DEVICES)},
    ALERT_STATE: None,  # JSON: each rule's state for one device
    DIGESTS: None,  # JSON: a group's readings of a batch in one minute (streams/hot/health.py)
}


@dataclass
class HotState:
    """What one hot instance keeps: the processor (twins, alert state, rules, groups) and the
    registry agent (devices of its partitions, grants)."""

    counters: HotCounters = field(default_factory=HotCounters)
    processor: HotProcessor = field(init=False)
    registry: RegistryAgent = field(default_factory=RegistryAgent)

    def __post_init__(self) -> None:
        self.processor = HotProcessor(self.counters)

    def drop_partitions(self, partitions: set[int]) -> None:
        self.processor.drop_partitions(partitions)
        self.registry.drop_partitions(partitions)

    def status(self) -> dict[str, Any]:
        return {
            "rules": sorted(self.processor.rules),
            "twins": len(self.processor.twins),
            **asdict(self.counters),
            "registry": asdict(self.registry.counters),
        }


# ---------------------------------------------------------------------- tables


def apply_rule(state: HotState, rec: TableRecord) -> None:
    rule = None if rec.record is None else rule_from_record(rec.record)
    state.processor.set_rule(rec.key, rule)


def apply_device(state: HotState, rec: TableRecord) -> None:
    r = rec.record
    group = None if r is None else group_of(str(r["org"]), str(r["project"]), str(r["group"]))
    state.processor.set_device_group(rec.key, group)


def group_of(org: str, project: str, group: str) -> str:
    # The group's full path: group names are unique only within their project.
    return str(Resource(org, project, group))


def apply_grants(state: HotState, rec: TableRecord) -> None:
    grants = None if rec.record is None else GrantSet.from_record(rec.record)
    state.registry.set_grants(rec.key, grants)


def restore_device(state: HotState, rec: TableRecord) -> None:
    device = None if rec.record is None else DeviceRecord.from_record(rec.record)
    state.registry.restore(rec.partition, rec.key, device)


def restore_twin(state: HotState, rec: TableRecord) -> None:
    if rec.record is None:
        state.processor.forget(rec.partition, rec.key)
    else:
        state.processor.restore_twin(rec.partition, from_record(rec.record))


def restore_alerts(state: HotState, rec: TableRecord) -> None:
    if rec.value is None:
        return
    try:
        states = alert_states_from_json(rec.value)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnreadableRecord("invalid_record", f"alert states: {exc!r}") from exc
    state.processor.restore_alert_states(rec.partition, rec.key, states)


TABLES: tuple[TableSpec[HotState], ...] = (
    TableSpec(RULES, "AlertRule", apply_rule),
    # An unreadable device or grant set is as good as none (as it always was here).
    TableSpec(DEVICES, "Device", apply_device, unreadable_deletes=True),
    TableSpec(GRANTS, "GrantSet", apply_grants, unreadable_deletes=True),
    TableSpec(TWIN_STATE, "TwinState", restore_twin, changelog=True),
    TableSpec(ALERT_STATE, None, restore_alerts, changelog=True),
    TableSpec(DEVICES, "Device", restore_device, changelog=True, unreadable_deletes=True),
)


# ---------------------------------------------------------------------- process


def process(state: HotState, batch: Batch) -> Iterator[Output]:
    out = Emitted()
    processor, registry, now = state.processor, state.registry, batch.now_ms
    for item in batch.inputs:
        source = item.source
        if item.dead is not None:
            out.dead.append(item.dead)
            state.counters.dead_lettered += 1
        elif source.topic == TELEMETRY:
            processor.on_telemetry(source, item.record, out)
            reading = item.record
            out.health.add(reading, processor.groups.get(str(reading["device_id"])), now)
        elif source.topic == REPORTED:
            processor.on_reported(source, item.record, now, out)
        elif source.topic == COMMANDS:
            registry.on_command(source, item.record, now, out.devices, out.audits, out.dead)
        else:
            processor.on_desired(source, item.record, now, out)
    for device_id, device in out.devices.items():
        # The batch's registry changes count at once, not when the table brings them back: the
        # device's telemetry (same key, same partition, same instance) may come next.
        processor.set_device_group(device_id, group_of(device.org, device.project, device.group))
    if batch.tick:
        processor.on_heartbeat_tick(now, out)
    return outputs(state, out)


def outputs(state: HotState, out: Emitted) -> Iterator[Output]:
    """What a batch emitted, as records (the order the hot path always wrote them in)."""
    for event in out.alerts:
        yield Output(ALERTS, event.device_id, alert_to_record(event))
    for device_id, twin in out.twins.items():
        yield Output(TWIN_STATE, device_id, to_record(twin))
    for device_id in out.alert_states:
        states = state.processor.alert_states.get(device_id, {})
        yield Output(ALERT_STATE, device_id, alert_states_to_json(states))
    for device_id, record in out.downlinks:
        yield Output(DOWNLINK, device_id, record)
    for response in out.responses:
        yield Output(RESPONSES, response["device_id"], response)
    for device_id, device in out.devices.items():
        yield Output(DEVICES, device_id, device.to_record())
    for audit in out.audits:
        yield Output(AUDIT, audit.device_id or audit.principal, audit.to_record())
    for digest in out.health:
        yield Output(DIGESTS, digest.group, digest.to_json())
    for dead in out.dead:
        yield dead_letter_output(DLQ, dead)


HOT_JOB: JobSpec[HotState] = JobSpec(
    name="hot-worker",
    group=HOT_GROUP,
    inputs=INPUTS,
    outputs=OUTPUTS,
    dead_letters=DLQ,
    stage=STAGE,
    state=HotState,
    process=process,
    tables=TABLES,
    metrics=hot_metrics,
)
