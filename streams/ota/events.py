"""What a rollout reacts to (operators' requests, device reports, alerts, telemetry, the timer,
devices joining its target) and what it produces (:class:`Command` for ``mqtt.downlink``,
audit records, gathered in a :class:`Step`). Command ids are UUID5s of (rollout id, device id,
action): the same on every replay."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from schemas.downlink import downlink_record
from streams.hot.alerts import AlertEvent, AlertStatus, Severity
from streams.ota.artifacts import Artifact
from streams.ota.model import ApprovalDecision, CommandAction, OtaStatus, Rollout
from streams.ota.plan import RolloutPlan
from streams.registry.devices import AuditRecord
from streams.registry.rbac import Principal, Resource

OTA_COMMAND_SUBTOPIC = "ota/command"  # devices/<id>/ota/command
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fleetstream/ota")


@dataclass(frozen=True, slots=True, kw_only=True)
class OtaRequest:
    """An operator's request on ``ota.requests`` (create, approve, reject, pause, resume,
    abort), as the API, the CLI and the demo send it; :func:`streams.ota.job.request_event`
    reads it back."""

    rollout_id: str
    kind: str
    artifact_id: str | None = None
    target: str | None = None
    plan: Mapping[str, Any] | None = None
    comment: str | None = None

    def to_record(self, request_id: str, principal: Principal, ts_ms: int) -> dict[str, Any]:
        """The Avro ``OtaRequest`` record (the plan as JSON text)."""
        return {
            "request_id": request_id,
            "rollout_id": self.rollout_id,
            "kind": self.kind,
            "principal": str(principal),
            "artifact_id": self.artifact_id,
            "target": self.target,
            "plan": None if self.plan is None else json.dumps(dict(self.plan)),
            "comment": self.comment,
            "ts": ts_ms,
        }


def command_id(rollout_id: str, device_id: str, action: CommandAction) -> str:
    """The id of ``action`` for ``device_id`` in ``rollout_id``: the same on every replay."""
    return str(uuid.uuid5(NAMESPACE, json.dumps([rollout_id, device_id, str(action)])))


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRollout:
    request_id: str
    principal: Principal
    rollout_id: str
    artifact: Artifact
    target: Resource
    plan: RolloutPlan = field(default_factory=RolloutPlan)


@dataclass(frozen=True, slots=True, kw_only=True)
class Approve:
    request_id: str
    principal: Principal
    decision: ApprovalDecision = ApprovalDecision.approved
    comment: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Pause:
    request_id: str
    principal: Principal


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    request_id: str
    principal: Principal


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    request_id: str
    principal: Principal
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceReport:
    """A device's ``ota/status`` report (see :func:`report_from_event`)."""

    device_id: str
    status: OtaStatus
    seq: int
    version: str | None = None
    reason: str | None = None
    command_id: str | None = None
    rollout_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertRaised:
    device_id: str
    severity: Severity
    alert_id: str

    @classmethod
    def from_alert(cls, alert: AlertEvent) -> AlertRaised | None:
        """The event of an ``alerts`` record; None for a resolved alert."""
        if alert.status is not AlertStatus.raised:
            return None
        return cls(device_id=alert.device_id, severity=alert.severity, alert_id=alert.alert_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry:
    """Telemetry from ``device_id`` received at ``seen_ms`` (the bridge's ``received_at``)."""

    device_id: str
    seen_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """The timer (the step's ``now_ms`` is the time); ``last_seen_ms`` may carry the latest
    telemetry time of devices, as :class:`Telemetry` events would."""

    last_seen_ms: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceJoined:
    """``device_id`` entered the rollout's target (new, moved in, or activated)."""

    device_id: str


OperatorEvent: TypeAlias = CreateRollout | Approve | Pause | Resume | Abort
Event: TypeAlias = OperatorEvent | DeviceReport | AlertRaised | Telemetry | Tick | DeviceJoined


def report_from_event(record: Mapping[str, Any]) -> DeviceReport | None:
    """The report in a ``device.events`` record (Avro ``DeviceEvent`` of type ``ota_status``,
    attributes as the bridge keeps them); None for other events and unknown statuses."""
    if record.get("type") != "ota_status":
        return None
    attributes: Mapping[str, str] = record.get("attributes") or {}
    try:
        status = OtaStatus(str(attributes.get("status")))
    except ValueError:
        return None
    return DeviceReport(
        device_id=str(record["device_id"]),
        status=status,
        seq=int(record["seq"]),
        version=attributes.get("version"),
        reason=attributes.get("reason") or record.get("message"),
        command_id=attributes.get("command_id"),
        rollout_id=attributes.get("rollout_id"),
    )


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Command:
    """An OTA command for one device; ``payload`` is its canonical JSON (same bytes on replay)."""

    rollout_id: str
    device_id: str
    command_id: str
    action: CommandAction
    payload: bytes

    @property
    def document(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value

    def to_downlink(self) -> dict[str, Any]:
        """The Avro ``Downlink`` record for ``mqtt.downlink`` (key: the device id)."""
        return downlink_record(
            self.device_id, OTA_COMMAND_SUBTOPIC, self.payload, qos=1, command_id=self.command_id
        )


@dataclass(frozen=True, slots=True)
class Step:
    """What one :func:`step` / :func:`run` produced. ``rollout`` is the input itself when
    nothing changed (and None when there is no rollout, e.g. a refused create)."""

    rollout: Rollout | None
    commands: tuple[Command, ...] = ()
    audits: tuple[AuditRecord, ...] = ()
    changed: bool = False

    @property
    def effects(self) -> tuple[Command | AuditRecord, ...]:
        return (*self.commands, *self.audits)


def canonical_json(document: Mapping[str, Any]) -> str:
    """Compact JSON with sorted keys: the same document always gives the same bytes."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def install_document(rollout: Rollout, device_id: str) -> dict[str, Any]:
    """The ``install`` command for ``device_id`` (its payload is this, as canonical JSON)."""
    artifact = rollout.artifact.to_record()
    artifact["signature"] = base64.b64encode(rollout.artifact.signature).decode("ascii")
    return {
        "action": str(CommandAction.install),
        "artifact": artifact,
        "command_id": command_id(rollout.rollout_id, device_id, CommandAction.install),
        "kind": str(rollout.artifact.kind),
        "rollout_id": rollout.rollout_id,
        "version": rollout.artifact.version,
    }


def install_parts(rollout: Rollout) -> tuple[str, str]:
    """The canonical install payload before and after its command id (the one part that
    differs between devices), so a cohort of 100 000 is not encoded 100 000 times."""
    marker = "\x00command-id\x00"
    document = install_document(rollout, "-")
    document["command_id"] = marker
    head, tail = canonical_json(document).split(json.dumps(marker))
    return head, tail
