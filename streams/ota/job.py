"""The OTA rollout controller as a spec for the kit's transactional loop (streams/runtime/job.py),
run by `fleet up` (`python -m infra.process ota-controller`, which reads the settings).

A thin job around the pure state machine of streams/ota/rollout.py. It consumes operators' requests
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
(an input's in `dead_lettered`, and per reason in `dead_letter_reasons`; a table's in
`table_dead_lettered`, the kit's error channel) and written to `dlq.ota` with its
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
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

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
from streams.runtime.core import key_of
from streams.runtime.metrics import counted, counted_by
from streams.runtime.records import DeadLetter
from streams.runtime.spec import (
    Batch,
    Input,
    JobSpec,
    Output,
    TableRecord,
    TableSpec,
    dead_letter_output,
)

log = logging.getLogger("fleetstream.ota")

OTA_GROUP = "fleetstream-ota"
REQUESTS, EVENTS, ALERTS, TELEMETRY = "ota.requests", "device.events", "alerts", "telemetry.raw"
ROLLOUTS, DOWNLINK, AUDIT = "ota.rollouts", "mqtt.downlink", "audit.log"
DEVICES, GRANTS, ARTIFACTS = "registry.devices", "rbac.grants", "ota.artifacts"
DLQ = "dlq.ota"
STAGE = "ota"  # the dead letters' `source` header
# What the controller's consumer group reads (`fleet status` shows its lag on these); telemetry
# is not decoded: only its keys and timestamps (when a device was last heard of) count.
INPUTS: dict[str, str | None] = {
    REQUESTS: "OtaRequest",
    EVENTS: "DeviceEvent",
    ALERTS: "Alert",
    TELEMETRY: None,
}
OUTPUTS: dict[str, str | None] = {ROLLOUTS: "Rollout", DOWNLINK: "Downlink", AUDIT: "AuditRecord"}


@dataclass
class OtaCounters:
    requests: int = counted("Rollout requests handled (create, approve, pause, ...)")
    reports: int = counted("Device OTA status reports read")
    alerts: int = counted("Raised alerts read (a rollout's health)")
    joins: int = counted("Devices that joined a running rollout")
    commands: int = counted("OTA commands sent to devices")
    audits: int = counted("Audit records written")
    # Rollouts held and those not final: gauges (fleetstream_ota_rollouts has them by state).
    rollouts: int = 0
    active: int = 0
    dead_lettered: int = 0  # input records that could not be decoded: the sum of the reasons
    dead_letter_reasons: dict[str, int] = counted_by(
        "reason", "Records sent to dlq.ota, by reason", metric="dead_lettered"
    )


@dataclass
class OtaState:
    """Every rollout (the controller is one instance), the global tables it plans with, and
    when each device was last heard of."""

    counters: OtaCounters = field(default_factory=OtaCounters)
    rollouts: dict[str, Rollout] = field(default_factory=dict)
    by_device: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    grants: dict[str, GrantSet] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    last_seen: dict[str, int] = field(default_factory=dict)
    joined: list[str] = field(default_factory=list)  # devices that entered or changed
    # The joins of the last batch: given back if that batch is lost (drop_partitions).
    joins_in_flight: list[str] = field(default_factory=list)

    def drop_partitions(self, partitions: set[int]) -> None:
        """Rewind to the last commit: the rollouts are restored whole from `ota.rollouts`,
        and devices that joined in a lost batch join again."""
        if not partitions:
            return
        self.rollouts.clear()
        self.by_device.clear()
        self.joined[:0] = self.joins_in_flight
        self.joins_in_flight = []

    def keep(self, rollout: Rollout) -> None:
        self.rollouts[rollout.rollout_id] = rollout
        for device_id in rollout.devices:
            self.by_device[device_id].add(rollout.rollout_id)

    def dead_letter(self, dead: DeadLetter) -> None:
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

    def status(self) -> dict[str, Any]:
        self.counters.rollouts = len(self.rollouts)
        self.counters.active = sum(1 for r in self.rollouts.values() if not r.final)
        return {
            "states": {rid: str(r.state) for rid, r in self.rollouts.items()},
            **asdict(self.counters),
        }


# ---------------------------------------------------------------- tables


def apply_device(state: OtaState, rec: TableRecord) -> None:
    if rec.record is None:
        state.devices.pop(rec.key, None)
        return
    device = DeviceRecord.from_record(rec.record)
    before = state.devices.get(rec.key)
    state.devices[rec.key] = device
    if before is None or before.resource != device.resource or before.status != device.status:
        state.joined.append(rec.key)


def apply_grants(state: OtaState, rec: TableRecord) -> None:
    if rec.record is None:
        state.grants.pop(rec.key, None)
    else:
        state.grants[rec.key] = GrantSet.from_record(rec.record)


def apply_artifact(state: OtaState, rec: TableRecord) -> None:
    if rec.record is not None:
        state.artifacts[rec.key] = Artifact.from_record(rec.record)


def apply_rollout(state: OtaState, rec: TableRecord) -> None:
    if rec.record is None:
        state.rollouts.pop(rec.key, None)
    else:
        state.keep(from_record(rec.record))


def started(state: OtaState) -> None:
    state.joined.clear()  # the registry as it stands is what planning sees


# ---------------------------------------------------------------- a batch


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


def refusal(record: dict[str, Any], reason: str, now_ms: int) -> AuditRecord:
    return AuditRecord(
        ts_ms=now_ms,
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


def route(
    state: OtaState,
    item: Input,
    events: dict[str, list[Event]],
    audits: list[AuditRecord],
    now_ms: int,
) -> None:
    """One decoded input record, as the events of the rollouts it concerns."""
    topic, record = item.source.topic, item.record
    if topic == REQUESTS:
        state.counters.requests += 1
        event = request_event(record, state.artifacts)
        if isinstance(event, str):
            audits.append(refusal(record, event, now_ms))
        else:
            events[str(record["rollout_id"])].append(event)
    elif topic == EVENTS:
        report = report_from_event(record)
        if report is not None:
            state.counters.reports += 1
            targets = state.by_device.get(report.device_id, set())
            if report.rollout_id is not None and report.rollout_id in state.rollouts:
                targets = {report.rollout_id}
            for rollout_id in targets:
                events[rollout_id].append(report)
    elif topic == ALERTS:
        raised = AlertRaised.from_alert(alert_from_record(record))
        if raised is not None:
            state.counters.alerts += 1
            for rollout_id in state.by_device.get(raised.device_id, set()):
                events[rollout_id].append(raised)


def route_joins(state: OtaState, events: dict[str, list[Event]]) -> None:
    joined, state.joined = state.joined, []
    state.joins_in_flight = joined  # given back by drop_partitions if this batch is lost
    for device_id in joined:
        device = state.devices.get(device_id)
        if device is None:
            continue
        for rollout in state.rollouts.values():
            if (
                rollout.cohorts
                and device_id not in rollout.devices
                and in_target(rollout.target, device)
            ):
                state.counters.joins += 1
                events[rollout.rollout_id].append(DeviceJoined(device_id=device_id))


def control(state: OtaState, batch: Batch) -> Iterator[Output]:
    """A batch: route the inputs (and devices that joined, and the clock's tick) to the
    rollouts they concern, run each rollout's state machine; write the rollouts that changed,
    the commands and audit records they issued, and the dead letters."""
    events: dict[str, list[Event]] = defaultdict(list)
    audits: list[AuditRecord] = []
    dead: list[DeadLetter] = []
    for item in batch.inputs:
        if item.source.topic == TELEMETRY:
            state.last_seen[key_of(item.source.key)] = item.source.timestamp_ms
            continue
        if item.dead is not None:
            letter = item.dead
            if item.source.value is None:  # no input is compacted: bad input
                detail = "a record without a value (tombstone)"
                letter = DeadLetter(item.source, "no_value", detail, stage=STAGE)
            state.dead_letter(letter)
            dead.append(letter)
            continue
        route(state, item, events, audits, batch.now_ms)
    route_joins(state, events)
    if batch.tick:
        tick = Tick(last_seen_ms=dict(state.last_seen))
        for rollout_id, rollout in state.rollouts.items():
            if not rollout.final:
                events[rollout_id].append(tick)
    changed: dict[str, Rollout] = {}
    commands: list[Command] = []
    for rollout_id, rollout_events in events.items():
        result = run(
            state.rollouts.get(rollout_id),
            rollout_events,
            now_ms=batch.now_ms,
            grants=state.grants,
            devices=state.devices,
        )
        commands.extend(result.commands)
        audits.extend(result.audits)
        if result.changed and result.rollout is not None:
            changed[rollout_id] = result.rollout
    for rollout_id, rollout in changed.items():
        state.keep(rollout)  # a lost batch: drop_partitions restores the committed ones
        yield Output(ROLLOUTS, rollout_id, to_record(rollout))
    for command in commands:
        yield Output(DOWNLINK, command.device_id, command.to_downlink())
    for audit in audits:
        yield Output(AUDIT, audit.device_id or audit.principal, audit.to_record())
    for letter in dead:
        yield dead_letter_output(DLQ, letter)
    state.counters.commands += len(commands)
    state.counters.audits += len(audits)


OTA_JOB = JobSpec(
    name="ota-controller",  # its status file: ota-controller.json
    group=OTA_GROUP,  # one instance: transactional id fleetstream-ota-0
    inputs=INPUTS,
    outputs=OUTPUTS,
    dead_letters=DLQ,
    stage=STAGE,
    state=OtaState,
    process=control,
    tables=(
        TableSpec(DEVICES, "Device", apply_device),
        TableSpec(GRANTS, "GrantSet", apply_grants),
        TableSpec(ARTIFACTS, "OtaArtifact", apply_artifact),
        # The controller's changelog: every rollout as last committed, read whole.
        TableSpec(ROLLOUTS, "Rollout", apply_rollout, changelog=True, whole=True),
    ),
    on_start=started,
    metrics=ota_metrics,
)
