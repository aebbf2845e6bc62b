"""Alert rules: the pure core (no Kafka, no Faust). Rules are data; state is per device and rule.

Kinds of rule (:class:`RuleKind`), each scoped to a device group or one device:

- ``above``: raised when the metric is ``> threshold``, resolved when it is
  ``<= clear_threshold``;
- ``below``: raised when ``< threshold``, resolved when ``>= clear_threshold``;
- ``rate_of_change``: the metric's change per second between consecutive readings (device
  time, ``ts``); raised when ``|rate| > threshold``, resolved when ``|rate| <= clear_threshold``.
  Two readings further apart than ``window_s`` give no rate (the later one becomes the new
  baseline), so a device back from a long silence is not judged on a stale value;
- ``missing_heartbeat``: raised by :func:`check_heartbeat` (called on a timer) once the device
  has been silent for more than ``heartbeat_s`` (by ``received_at``, the bridge's clock, against
  the caller's ``now_ms``); resolved by the device's next reading. A device never seen is not
  judged (its state holds no last reading).

``clear_threshold`` defaults to ``threshold``; set apart from it, it is a hysteresis band: a
metric that flaps inside the band neither resolves a raised alert nor re-raises a resolved one.
Only transitions emit events, so an alert is one ``raised`` and (later) one ``resolved``.

Ordering: :func:`evaluate` ignores a reading whose ``seq`` is not greater than the last one the
state saw (replays and readings interleaved by bridge replicas), so state only moves forward. A
reading without a (finite, numeric) value for the rule's metric advances ``seq`` and counts as a
heartbeat but changes nothing else.

Alert ids are deterministic: a UUID5 of (device id, rule id, the seq that raised it), so a replay
of the same telemetry yields the same ids; the ``resolved`` record carries the raised one's id.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

__all__ = [
    "ALERT_RULE_SCHEMA",
    "ALERT_SCHEMA",
    "AlertEvent",
    "AlertRule",
    "AlertState",
    "AlertStatus",
    "RuleKind",
    "ScopeType",
    "Severity",
    "alert_from_record",
    "alert_id",
    "alert_to_record",
    "check_heartbeat",
    "evaluate",
    "metric_value",
    "rule_applies",
    "rule_from_record",
    "rule_to_record",
]

ALERT_SCHEMA = "Alert"  # schemas/avro/Alert.avsc, value of topic `alerts`
ALERT_RULE_SCHEMA = "AlertRule"  # schemas/avro/AlertRule.avsc

_ALERT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fleetstream/alerts")
_ENVELOPE = frozenset({"device_id", "seq", "ts", "received_at", "extra"})


class RuleKind(StrEnum):
    above = "above"
    below = "below"
    rate_of_change = "rate_of_change"
    missing_heartbeat = "missing_heartbeat"


class ScopeType(StrEnum):
    group = "group"
    device = "device"


class Severity(StrEnum):
    info = "info"
    warning = "warning"
    critical = "critical"


class AlertStatus(StrEnum):
    raised = "raised"
    resolved = "resolved"


def _finite(value: float | None, name: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True)
class AlertRule:
    """One rule; invalid combinations raise ValueError at construction."""

    rule_id: str
    scope_type: ScopeType
    scope: str
    metric: str
    kind: RuleKind
    threshold: float = 0.0
    clear_threshold: float | None = None  # None: the threshold (no hysteresis band)
    window_s: float | None = None  # rate_of_change: longest gap a rate is taken over
    heartbeat_s: float | None = None  # missing_heartbeat: silence before raising
    severity: Severity = Severity.warning

    def __post_init__(self) -> None:
        if not self.rule_id or not self.scope:
            raise ValueError("rule_id and scope must be non-empty")
        if not self.metric and self.kind is not RuleKind.missing_heartbeat:
            raise ValueError(f"rule {self.rule_id}: a {self.kind} rule needs a metric")
        for name in ("threshold", "clear_threshold", "window_s", "heartbeat_s"):
            _finite(getattr(self, name), f"rule {self.rule_id}: {name}")
        clear = self.clear
        if self.kind is RuleKind.above and clear > self.threshold:
            raise ValueError(f"rule {self.rule_id}: above needs clear_threshold <= threshold")
        if self.kind is RuleKind.below and clear < self.threshold:
            raise ValueError(f"rule {self.rule_id}: below needs clear_threshold >= threshold")
        if self.kind is RuleKind.rate_of_change and not 0 <= clear <= self.threshold:
            raise ValueError(
                f"rule {self.rule_id}: rate_of_change needs 0 <= clear_threshold <= threshold"
            )
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError(f"rule {self.rule_id}: window_s must be positive")
        if self.kind is RuleKind.missing_heartbeat and not (self.heartbeat_s or 0) > 0:
            raise ValueError(f"rule {self.rule_id}: missing_heartbeat needs heartbeat_s > 0")

    @property
    def clear(self) -> float:
        """Where a raised alert resolves."""
        return self.threshold if self.clear_threshold is None else self.clear_threshold


@dataclass(frozen=True)
class AlertState:
    """One device's state for one rule; keep it per (device id, rule id)."""

    device_id: str | None = None  # set by the first reading
    last_seq: int = -1  # -1: no reading yet
    alert_id: str | None = None  # the active alert, if one is raised
    last_value: float | None = None  # rate_of_change: the baseline reading's value...
    last_ts: int | None = None  # ... and its device time (ms)
    last_seen_ms: int | None = None  # received_at of the last reading (heartbeat)

    @property
    def active(self) -> bool:
        return self.alert_id is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the hot worker's `alerts.state` changelog, one per device and batch).
        Flat fields: ``dataclasses.asdict``'s recursive copy cost 13x as much."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class AlertEvent:
    """One lifecycle record (Avro ``Alert``)."""

    alert_id: str
    device_id: str
    rule_id: str
    status: AlertStatus
    metric: str
    value: float | None
    threshold: float
    severity: Severity
    seq: int
    ts: int


def alert_id(device_id: str, rule_id: str, seq: int) -> str:
    """The id of the alert ``rule_id`` raised on ``device_id`` at ``seq`` (stable on replay)."""
    return str(uuid.uuid5(_ALERT_NAMESPACE, json.dumps([device_id, rule_id, seq])))


def rule_applies(rule: AlertRule, device_id: str, group: str | None) -> bool:
    """Whether ``rule`` watches the device ``device_id`` of group ``group`` (None: no group)."""
    if rule.scope_type is ScopeType.device:
        return rule.scope == device_id
    return group is not None and rule.scope == group


def metric_value(reading: Mapping[str, Any], metric: str) -> float | None:
    """The reading's finite value for ``metric`` (a Telemetry field or an ``extra`` key)."""
    if metric in _ENVELOPE:
        return None
    value = reading.get(metric)
    if value is None:
        extra = reading.get("extra")
        value = extra.get(metric) if isinstance(extra, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _event(
    rule: AlertRule,
    status: AlertStatus,
    id_: str,
    device_id: str,
    value: float | None,
    threshold: float,
    seq: int,
    ts: int,
) -> AlertEvent:
    return AlertEvent(
        alert_id=id_,
        device_id=device_id,
        rule_id=rule.rule_id,
        status=status,
        metric=rule.metric,
        value=value,
        threshold=threshold,
        severity=rule.severity,
        seq=seq,
        ts=ts,
    )


def _trips(rule: AlertRule, x: float) -> bool:
    if rule.kind is RuleKind.above:
        return x > rule.threshold
    if rule.kind is RuleKind.below:
        return x < rule.threshold
    return abs(x) > rule.threshold


def _clears(rule: AlertRule, x: float) -> bool:
    if rule.kind is RuleKind.above:
        return x <= rule.clear
    if rule.kind is RuleKind.below:
        return x >= rule.clear
    return abs(x) <= rule.clear


def evaluate(
    rule: AlertRule, state: AlertState, reading: Mapping[str, Any]
) -> tuple[AlertState, list[AlertEvent]]:
    """Feed one telemetry record (``Telemetry`` shape) to ``rule``: the new state and events."""
    seq = int(reading["seq"])
    if seq <= state.last_seq:
        return state, []  # stale: a replay, or overtaken by a newer reading
    device_id = str(reading["device_id"])
    ts = int(reading["ts"])
    received = reading.get("received_at")
    seen = ts if received is None else int(received)
    state = replace(state, device_id=device_id, last_seq=seq, last_seen_ms=seen)

    if rule.kind is RuleKind.missing_heartbeat:
        if state.alert_id is None:
            return state, []
        heartbeat = rule.heartbeat_s or 0.0
        resolved = _event(
            rule, AlertStatus.resolved, state.alert_id, device_id, None, heartbeat, seq, ts
        )
        return replace(state, alert_id=None), [resolved]

    value = metric_value(reading, rule.metric)
    if value is None:
        return state, []
    observed = value
    if rule.kind is RuleKind.rate_of_change:
        before, before_ts = state.last_value, state.last_ts
        state = replace(state, last_value=value, last_ts=ts)
        if before is None or before_ts is None or ts <= before_ts:
            return state, []
        gap_ms = ts - before_ts
        if rule.window_s is not None and gap_ms > rule.window_s * 1000:
            return state, []
        observed = (value - before) * 1000 / gap_ms

    if state.alert_id is None and _trips(rule, observed):
        id_ = alert_id(device_id, rule.rule_id, seq)
        raised = _event(rule, AlertStatus.raised, id_, device_id, observed, rule.threshold, seq, ts)
        return replace(state, alert_id=id_), [raised]
    if state.alert_id is not None and _clears(rule, observed):
        resolved = _event(
            rule, AlertStatus.resolved, state.alert_id, device_id, observed, rule.clear, seq, ts
        )
        return replace(state, alert_id=None), [resolved]
    return state, []


def check_heartbeat(
    rule: AlertRule, state: AlertState, now_ms: int
) -> tuple[AlertState, list[AlertEvent]]:
    """Raise ``rule`` (missing_heartbeat) once if the device is silent for over heartbeat_s."""
    if (
        rule.kind is not RuleKind.missing_heartbeat
        or state.alert_id is not None
        or state.device_id is None
        or state.last_seen_ms is None
    ):
        return state, []
    heartbeat = rule.heartbeat_s or 0.0
    silent_ms = now_ms - state.last_seen_ms
    if silent_ms <= heartbeat * 1000:
        return state, []
    id_ = alert_id(state.device_id, rule.rule_id, state.last_seq)
    raised = _event(
        rule,
        AlertStatus.raised,
        id_,
        state.device_id,
        silent_ms / 1000,
        heartbeat,
        state.last_seq,
        now_ms,
    )
    return replace(state, alert_id=id_), [raised]


# ---------------------------------------------------------------------------- Avro records


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def alert_to_record(event: AlertEvent) -> dict[str, Any]:
    """The Avro ``Alert`` record."""
    return {
        "alert_id": event.alert_id,
        "device_id": event.device_id,
        "rule_id": event.rule_id,
        "status": event.status.value,
        "metric": event.metric,
        "value": _float(event.value),
        "threshold": float(event.threshold),
        "severity": event.severity.value,
        "seq": event.seq,
        "ts": event.ts,
    }


def alert_from_record(record: Mapping[str, Any]) -> AlertEvent:
    return AlertEvent(
        alert_id=str(record["alert_id"]),
        device_id=str(record["device_id"]),
        rule_id=str(record["rule_id"]),
        status=AlertStatus(record["status"]),
        metric=str(record["metric"]),
        value=_float(record.get("value")),
        threshold=float(record["threshold"]),
        severity=Severity(record.get("severity", Severity.warning.value)),
        seq=int(record["seq"]),
        ts=int(record["ts"]),
    )


def rule_to_record(rule: AlertRule) -> dict[str, Any]:
    """The Avro ``AlertRule`` record."""
    return {
        "rule_id": rule.rule_id,
        "scope_type": rule.scope_type.value,
        "scope": rule.scope,
        "metric": rule.metric,
        "kind": rule.kind.value,
        "threshold": float(rule.threshold),
        "clear_threshold": _float(rule.clear_threshold),
        "window_s": _float(rule.window_s),
        "heartbeat_s": _float(rule.heartbeat_s),
        "severity": rule.severity.value,
    }


def rule_from_record(record: Mapping[str, Any]) -> AlertRule:
    """The rule in an Avro ``AlertRule`` record (or its JSON); ValueError if it is invalid."""
    return AlertRule(
        rule_id=str(record["rule_id"]),
        scope_type=ScopeType(record["scope_type"]),
        scope=str(record["scope"]),
        metric=str(record.get("metric", "")),
        kind=RuleKind(record["kind"]),
        threshold=float(record.get("threshold", 0.0)),
        clear_threshold=_float(record.get("clear_threshold")),
        window_s=_float(record.get("window_s")),
        heartbeat_s=_float(record.get("heartbeat_s")),
        severity=Severity(record.get("severity", Severity.warning.value)),
    )
