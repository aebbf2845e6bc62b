"""The hot path's processing, without Kafka: alerts and device twins over decoded records.

:class:`HotProcessor` holds the state one hot worker owns (twins and alert-rule state of the
devices in its partitions) plus the two global tables every worker reads whole (alert rules,
and the registry's device -> group map). Each ``on_*`` method takes one decoded record and
returns what it emits into an :class:`Emitted` collector: alert lifecycle records, changed
twins, downlinks to devices, answers to desired-state requests, dead letters. The hot job
(streams/hot/job.py, on the kit's loop) writes a batch's emissions, its changed state and its
input offsets in one Kafka transaction, so a crash anywhere replays the batch against the
state as it was before it: nothing is emitted twice and nothing is lost.

Per-device order is by the device's sequence number (readings of one device may arrive
interleaved across bridge replicas, or replayed): the pure cores (streams/hot/alerts.py,
streams/hot/twin.py) ignore what is older than what they saw.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.downlink import downlink_record
from streams.hot.alerts import (
    AlertEvent,
    AlertRule,
    AlertState,
    RuleKind,
    ScopeType,
    check_heartbeat,
    evaluate,
)
from streams.hot.health import HealthDigests
from streams.hot.twin import (
    Accepted,
    Conflict,
    Twin,
    TwinDocumentError,
    apply_desired,
    apply_reported,
    delta,
)
from streams.registry.devices import AuditRecord, DeviceRecord
from streams.runtime.metrics import counted
from streams.runtime.records import DeadLetter, SourceRecord

log = logging.getLogger("fleetstream.hot")

DESIRED_SUBTOPIC = "state/desired"
STAGE = "hot"


@dataclass
class Emitted:
    """What one batch produces; the worker writes it all in the batch's transaction."""

    alerts: list[AlertEvent] = field(default_factory=list)
    twins: dict[str, Twin] = field(default_factory=dict)  # device id -> its newest twin
    downlinks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (device, rec)
    responses: list[dict[str, Any]] = field(default_factory=list)  # TwinResponse records
    alert_states: set[str] = field(default_factory=set)  # devices whose rule state changed
    dead: list[DeadLetter] = field(default_factory=list)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)  # registry entries changed
    audits: list[AuditRecord] = field(default_factory=list)  # registry decisions
    health: HealthDigests = field(default_factory=HealthDigests)  # for fleet_health

    def __bool__(self) -> bool:
        return bool(
            self.alerts
            or self.twins
            or self.downlinks
            or self.responses
            or self.alert_states
            or self.dead
            or self.devices
            or self.audits
            or self.health
        )


@dataclass
class HotCounters:
    telemetry: int = counted("Telemetry records read")
    reported: int = counted("Reported twin states read")
    desired: int = counted("Desired twin states read")
    alerts_raised: int = counted("Alerts raised")
    alerts_resolved: int = counted("Alerts resolved")
    twin_changes: int = counted("Accepted twin changes")
    conflicts: int = counted("Twin updates refused (stale version)", metric="twin_conflicts")
    stale_ignored: int = counted("Records older than the device's last seq")
    dead_lettered: int = counted("Input records sent to dlq.hot")
    restored_twins: int = counted("Twins restored from twin.state at a start")
    restored_alert_states: int = counted("Alert states restored from alerts.state at a start")


def desired_message(twin: Twin, now_ms: int) -> bytes:
    """The payload devices get on ``devices/<id>/state/desired`` (AWS shadow's delta shape)."""
    body = {"version": twin.version, "state": delta(twin), "timestamp": now_ms}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def alert_states_to_json(states: Mapping[str, AlertState]) -> bytes:
    """One device's rule states as the `alerts.state` changelog value."""
    return json.dumps({rule: s.to_dict() for rule, s in states.items()}).encode()


def alert_states_from_json(value: bytes) -> dict[str, AlertState]:
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("alerts.state value must be a JSON object")
    return {str(rule): AlertState.from_dict(s) for rule, s in data.items()}


class HotProcessor:
    """State and logic of one hot worker; I/O-free so it tests without services."""

    def __init__(self, counters: HotCounters | None = None) -> None:
        self.counters = counters or HotCounters()
        self.twins: dict[str, Twin] = {}
        self.alert_states: dict[str, dict[str, AlertState]] = {}
        self.partition_of: dict[str, int] = {}  # device -> the partition its state lives in
        self.rules: dict[str, AlertRule] = {}
        self.groups: dict[str, str] = {}  # device -> device group (from the registry)
        self._by_device: dict[str, list[AlertRule]] = {}
        self._by_group: dict[str, list[AlertRule]] = {}
        self._heartbeat_rules: list[AlertRule] = []

    # ------------------------------------------------------------------ global tables

    def set_rule(self, rule_id: str, rule: AlertRule | None) -> None:
        """Add, replace (rule) or delete (None) a rule."""
        if rule is None:
            self.rules.pop(rule_id, None)
        else:
            self.rules[rule_id] = rule
        self._index_rules()

    def set_device_group(self, device_id: str, group: str | None) -> None:
        """`group` is the group's full path (`org/<o>/project/<p>/group/<g>`), which is what a
        group-scoped rule names: group names repeat across projects and organizations."""
        if group is None:
            self.groups.pop(device_id, None)
        else:
            self.groups[device_id] = group

    def _index_rules(self) -> None:
        self._by_device, self._by_group = {}, {}
        for rule in self.rules.values():
            index = self._by_device if rule.scope_type is ScopeType.device else self._by_group
            index.setdefault(rule.scope, []).append(rule)
        self._heartbeat_rules = [
            r for r in self.rules.values() if r.kind is RuleKind.missing_heartbeat
        ]

    def rules_for(self, device_id: str) -> list[AlertRule]:
        """The rules watching ``device_id``: its own and its group's."""
        own = self._by_device.get(device_id, [])
        group = self.groups.get(device_id)
        shared = self._by_group.get(group, []) if group is not None else []
        return own + shared if own and shared else own or shared

    # ------------------------------------------------------------------ owned state

    def restore_twin(self, partition: int, twin: Twin) -> None:
        self.twins[twin.device_id] = twin
        self.partition_of[twin.device_id] = partition
        self.counters.restored_twins += 1

    def restore_alert_states(
        self, partition: int, device_id: str, states: dict[str, AlertState]
    ) -> None:
        self.alert_states[device_id] = states
        self.partition_of[device_id] = partition
        self.counters.restored_alert_states += 1

    def forget(self, partition: int, device_id: str) -> None:
        """A tombstone in a changelog: the device's state is gone."""
        self.twins.pop(device_id, None)
        self.alert_states.pop(device_id, None)
        self.partition_of.pop(device_id, None)

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Partitions moved to another worker: their state is its now."""
        gone = set(partitions)
        for device_id in [d for d, p in self.partition_of.items() if p in gone]:
            self.forget(-1, device_id)

    # ------------------------------------------------------------------ inputs

    def on_telemetry(self, source: SourceRecord, reading: Mapping[str, Any], out: Emitted) -> None:
        self.counters.telemetry += 1
        device_id = str(reading["device_id"])
        rules = self.rules_for(device_id)
        if not rules:
            return
        states = self.alert_states.setdefault(device_id, {})
        self.partition_of[device_id] = source.partition
        changed = False
        for rule in rules:
            before = states.get(rule.rule_id, AlertState())
            after, events = evaluate(rule, before, reading)
            if after is not before:
                states[rule.rule_id] = after
                changed = True
            self._emit_alerts(events, out)
        if changed:
            out.alert_states.add(device_id)

    def on_heartbeat_tick(self, now_ms: int, out: Emitted) -> None:
        """Raise missing-heartbeat alerts for owned devices silent too long."""
        if not self._heartbeat_rules:
            return
        for device_id, states in self.alert_states.items():
            for rule in self.rules_for(device_id):
                if rule.kind is not RuleKind.missing_heartbeat or rule.rule_id not in states:
                    continue
                after, events = check_heartbeat(rule, states[rule.rule_id], now_ms)
                if events:
                    states[rule.rule_id] = after
                    out.alert_states.add(device_id)
                    self._emit_alerts(events, out)

    def _emit_alerts(self, events: list[AlertEvent], out: Emitted) -> None:
        for event in events:
            if event.status == "raised":
                self.counters.alerts_raised += 1
            else:
                self.counters.alerts_resolved += 1
        out.alerts.extend(events)

    def _twin(self, device_id: str, partition: int) -> Twin:
        self.partition_of[device_id] = partition
        return self.twins.get(device_id) or Twin(device_id=device_id)

    def _changed(self, twin: Twin, out: Emitted, now_ms: int) -> None:
        self.twins[twin.device_id] = twin
        out.twins[twin.device_id] = twin
        self.counters.twin_changes += 1
        self._send_delta(twin, out, now_ms)

    @staticmethod
    def _send_delta(twin: Twin, out: Emitted, now_ms: int) -> None:
        """Tell the device what it lacks (nothing when reported matches desired)."""
        if not delta(twin):
            return
        payload = desired_message(twin, now_ms)
        command_id = f"twin-{twin.device_id}-{twin.version}"
        record = downlink_record(
            twin.device_id, DESIRED_SUBTOPIC, payload, qos=1, command_id=command_id
        )
        out.downlinks.append((twin.device_id, record))

    def on_reported(
        self, source: SourceRecord, record: Mapping[str, Any], now_ms: int, out: Emitted
    ) -> None:
        """A device's reported patch (TwinReported); a bad patch is dead-lettered."""
        self.counters.reported += 1
        device_id = str(record["device_id"])
        twin = self._twin(device_id, source.partition)
        try:
            patch = json.loads(record["patch"])
            if not isinstance(patch, dict):
                raise TwinDocumentError("invalid", "reported patch must be a JSON object")
            result = apply_reported(twin, patch, int(record["seq"]), now_ms)
        except (ValueError, TwinDocumentError) as exc:
            reason = exc.reason if isinstance(exc, TwinDocumentError) else "invalid"
            out.dead.append(DeadLetter(source, f"twin_{reason}", str(exc), stage=STAGE))
            self.counters.dead_lettered += 1
            return
        if not isinstance(result, Accepted):
            self.counters.stale_ignored += 1
            return
        if result.changed:
            self._changed(result.twin, out, now_ms)
        else:
            # Only seq advanced: keep it so an older report stays refused. A device reports
            # its whole state when it (re)connects: answer with the delta it still lacks
            # (a desired change made before it ever had a session would be lost otherwise).
            self.twins[device_id] = result.twin
            out.twins[device_id] = result.twin
            self._send_delta(result.twin, out, now_ms)

    def on_desired(
        self, source: SourceRecord, record: Mapping[str, Any], now_ms: int, out: Emitted
    ) -> None:
        """A desired-state request (TwinDesired): applied or refused, always answered."""
        self.counters.desired += 1
        device_id = str(record["device_id"])
        twin = self._twin(device_id, source.partition)
        expected = record.get("expected_version")

        def answer(status: str, version: int, detail: str | None = None) -> None:
            out.responses.append(
                {
                    "request_id": str(record["request_id"]),
                    "device_id": device_id,
                    "status": status,
                    "version": version,
                    "detail": detail,
                    "ts": now_ms,
                }
            )

        try:
            patch = json.loads(record["patch"])
            result = apply_desired(twin, patch, None if expected is None else int(expected), now_ms)
        except (ValueError, TwinDocumentError) as exc:
            answer("invalid", twin.version, str(exc))
            return
        if isinstance(result, Conflict):
            self.counters.conflicts += 1
            answer(
                "conflict",
                twin.version,
                f"twin is at version {result.current_version}, "
                f"the update names {result.expected_version}",
            )
            return
        if result.changed:
            self._changed(result.twin, out, now_ms)
            answer("accepted", result.twin.version)
        else:
            answer("unchanged", twin.version)
