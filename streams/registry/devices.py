"""The device registry's pure state transitions (no Kafka, no Faust).

A :data:`RegistryCommand` (provision, update, suspend, revoke, activate) names who issues it
and an idempotency id. :func:`apply` authorizes it with :func:`streams.registry.rbac.authorize`,
checks the transition against the device's current :class:`DeviceRecord` and returns either
:class:`Applied` (the new record) or :class:`Refused`; both carry the :class:`AuditRecord` of
the decision. Statuses move as::

    provisioned --activate--> active <--activate-- suspended
    provisioned|active --suspend--> suspended   (suspend again: unchanged)
    any but revoked --revoke--> revoked         (revoke again: unchanged; never leaves revoked)

An id is provisioned once and never reused (it is the certificate's CN). A command whose id is
the record's ``last_command_id`` (a redelivery) is reported as unchanged, not applied again.
Records, commands and audit records convert to and from the Avro records of
``schemas/avro/{Device,RegistryCommand,AuditRecord}.avsc`` (``to_record``/``from_record``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, TypeAlias

from schemas.records import AvroRecord
from streams.registry.rbac import (
    SEGMENT_PATTERN,
    Action,
    Decision,
    GrantSet,
    Principal,
    Resource,
    authorize,
)

__all__ = [
    "AUDIT_SCHEMA",
    "COMMAND_SCHEMA",
    "DEVICE_SCHEMA",
    "ActivateDevice",
    "Applied",
    "AuditDecision",
    "AuditRecord",
    "CommandKind",
    "DeviceRecord",
    "DeviceStatus",
    "ProvisionDevice",
    "Refused",
    "RegistryCommand",
    "RevokeDevice",
    "SuspendDevice",
    "UpdateDevice",
    "apply",
    "command_from_record",
    "command_to_record",
]

DEVICE_SCHEMA = "Device"
COMMAND_SCHEMA = "RegistryCommand"
AUDIT_SCHEMA = "AuditRecord"

_MAX_SERIAL = 2**160  # RFC 5280: a positive serial of at most 20 octets
_SERIAL = re.compile(r"[1-9][0-9]*")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_MAX_LABELS = 64
_MAX_TEXT = 256


class DeviceStatus(StrEnum):
    provisioned = "provisioned"
    active = "active"
    suspended = "suspended"
    revoked = "revoked"


class CommandKind(StrEnum):
    provision = "provision"
    update = "update"
    suspend = "suspend"
    revoke = "revoke"
    activate = "activate"


class AuditDecision(StrEnum):
    applied = "applied"
    unchanged = "unchanged"  # allowed, and already so (idempotent repeat or redelivery)
    denied = "denied"  # authorization said no
    refused = "refused"  # allowed, but not a valid command or transition


def _frozen_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(labels))


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord(AvroRecord):
    """A device's entry in ``registry.devices``."""

    device_id: str
    org: str
    project: str
    group: str
    region: str
    status: DeviceStatus
    cert_serial: str  # decimal: X.509 serials reach 160 bits
    cert_fingerprint: str  # lower-case hex SHA-256 of the DER certificate
    firmware_version: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ms: int
    updated_ms: int
    last_command_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", DeviceStatus(self.status))
        object.__setattr__(self, "labels", _frozen_labels(self.labels))

    @property
    def resource(self) -> Resource:
        return Resource(self.org, self.project, self.group, self.device_id)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True, kw_only=True)
class _DeviceCommand:
    """What every command carries: its id, who asks, and the device it is about."""

    command_id: str
    principal: Principal
    device_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionDevice(_DeviceCommand):
    kind: ClassVar[CommandKind] = CommandKind.provision
    action: ClassVar[Action] = Action.device_provision

    org: str
    project: str
    group: str
    region: str
    cert_serial: str
    cert_fingerprint: str
    firmware_version: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateDevice(_DeviceCommand):
    """Change what is given (None: unchanged). ``labels`` replaces all labels; ``group`` moves
    the device within its project and needs ``device.update`` on the new group too."""

    kind: ClassVar[CommandKind] = CommandKind.update
    action: ClassVar[Action] = Action.device_update

    group: str | None = None
    region: str | None = None
    firmware_version: str | None = None
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _CommandWithReason(_DeviceCommand):
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SuspendDevice(_CommandWithReason):
    kind: ClassVar[CommandKind] = CommandKind.suspend
    action: ClassVar[Action] = Action.device_suspend


@dataclass(frozen=True, slots=True, kw_only=True)
class RevokeDevice(_CommandWithReason):
    kind: ClassVar[CommandKind] = CommandKind.revoke
    action: ClassVar[Action] = Action.device_revoke


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivateDevice(_DeviceCommand):
    kind: ClassVar[CommandKind] = CommandKind.activate
    action: ClassVar[Action] = Action.device_activate


RegistryCommand: TypeAlias = (
    ProvisionDevice | UpdateDevice | SuspendDevice | RevokeDevice | ActivateDevice
)
_COMMAND_TYPES: dict[CommandKind, type[RegistryCommand]] = {
    CommandKind.provision: ProvisionDevice,
    CommandKind.update: UpdateDevice,
    CommandKind.suspend: SuspendDevice,
    CommandKind.revoke: RevokeDevice,
    CommandKind.activate: ActivateDevice,
}
_OPTIONAL_FIELDS = (
    "org",
    "project",
    "group",
    "region",
    "cert_serial",
    "cert_fingerprint",
    "firmware_version",
    "labels",
    "reason",
)


def command_to_record(command: RegistryCommand) -> dict[str, Any]:
    """The Avro ``RegistryCommand`` record of ``command`` (fields it lacks are null)."""
    record: dict[str, Any] = {
        "command_id": command.command_id,
        "kind": str(command.kind),
        "principal": str(command.principal),
        "device_id": command.device_id,
    }
    for name in _OPTIONAL_FIELDS:
        value = getattr(command, name, None)
        record[name] = dict(value) if isinstance(value, Mapping) else value
    return record


def command_from_record(record: Mapping[str, Any]) -> RegistryCommand:
    """Inverse of :func:`command_to_record`. Raises ValueError for an unknown kind, an invalid
    principal or a provision lacking a required field (send such records to a DLQ)."""
    kind = CommandKind(record["kind"])
    command_type = _COMMAND_TYPES[kind]
    values: dict[str, Any] = {
        "command_id": record["command_id"],
        "principal": Principal.parse(record["principal"]),
        "device_id": record["device_id"],
    }
    for spec in fields(command_type):
        value = record.get(spec.name)
        if spec.name in values or (value is None and spec.name == "labels" and kind == "provision"):
            continue
        if value is None and spec.default is MISSING and spec.default_factory is MISSING:
            raise ValueError(f"{kind} command lacks {spec.name}")
        values[spec.name] = value
    return command_type(**values)


# --------------------------------------------------------------------------- audit


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord(AvroRecord):
    """One decision on a command, as written to ``audit.log``."""

    ts_ms: int  # when
    command_id: str
    command: str  # what was asked
    principal: str  # who
    action: str
    device_id: str | None
    resource: str | None  # None when the device is unknown or the command invalid
    decision: AuditDecision
    authorization: str  # authorize()'s reason: the grant that allowed it, or why none did
    reason: str  # why this decision

    def __post_init__(self) -> None:
        object.__setattr__(self, "decision", AuditDecision(self.decision))

    @property
    def allowed(self) -> bool:
        return self.decision in (AuditDecision.applied, AuditDecision.unchanged)


@dataclass(frozen=True, slots=True)
class Applied:
    """The command was allowed: ``record`` is the device's entry now (the current one itself,
    unchanged, when ``audit.decision`` is ``unchanged``: nothing to write)."""

    record: DeviceRecord
    audit: AuditRecord


@dataclass(frozen=True, slots=True)
class Refused:
    """The command was denied or invalid: the registry stays as it was."""

    audit: AuditRecord


# --------------------------------------------------------------------------- transitions


class _Refusal(Exception):
    def __init__(self, reason: str, decision: AuditDecision = AuditDecision.refused) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decision = decision


def _check_text(name: str, value: object, pattern: re.Pattern[str] | None = None) -> None:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise _Refusal(f"invalid {name} {value!r}: a non-empty string of at most {_MAX_TEXT}")
    if pattern is not None and pattern.fullmatch(value) is None:
        raise _Refusal(f"invalid {name} {value!r}: must match {pattern.pattern}")
    if not value.isprintable():
        raise _Refusal(f"invalid {name} {value!r}: control characters")


def _check_labels(labels: object) -> None:
    if not isinstance(labels, Mapping) or len(labels) > _MAX_LABELS:
        raise _Refusal(f"labels must be a mapping of at most {_MAX_LABELS} entries")
    for key, value in labels.items():
        _check_text("label key", key, _LABEL_KEY)
        if not isinstance(value, str) or len(value) > _MAX_TEXT or not value.isprintable():
            raise _Refusal(f"invalid value for label {key!r}")


def _check_provision(command: ProvisionDevice) -> None:
    _check_text("region", command.region, SEGMENT_PATTERN)
    _check_text("certificate serial", command.cert_serial, _SERIAL)
    if int(command.cert_serial) >= _MAX_SERIAL:
        raise _Refusal("certificate serial longer than 20 octets")
    _check_text("certificate fingerprint", command.cert_fingerprint, _FINGERPRINT)
    if command.firmware_version is not None:
        _check_text("firmware version", command.firmware_version)
    _check_labels(command.labels)


def _provision(command: ProvisionDevice, now_ms: int) -> DeviceRecord:
    _check_provision(command)
    return DeviceRecord(
        device_id=command.device_id,
        org=command.org,
        project=command.project,
        group=command.group,
        region=command.region,
        status=DeviceStatus.provisioned,
        cert_serial=command.cert_serial,
        cert_fingerprint=command.cert_fingerprint,
        firmware_version=command.firmware_version,
        labels=command.labels,
        created_ms=now_ms,
        updated_ms=now_ms,
        last_command_id=command.command_id,
    )


def _update(
    command: UpdateDevice, current: DeviceRecord, grants: Mapping[str, GrantSet]
) -> tuple[DeviceRecord, str]:
    if current.status is DeviceStatus.revoked:
        raise _Refusal("a revoked device cannot be updated")
    changes: dict[str, Any] = {}
    note = ""
    if command.region is not None:
        _check_text("region", command.region, SEGMENT_PATTERN)
        changes["region"] = command.region
    if command.firmware_version is not None:
        _check_text("firmware version", command.firmware_version)
        changes["firmware_version"] = command.firmware_version
    if command.labels is not None:
        _check_labels(command.labels)
        changes["labels"] = command.labels
    if command.group is not None and command.group != current.group:
        try:
            target = Resource(current.org, current.project, command.group, current.device_id)
        except ValueError as exc:
            raise _Refusal(f"invalid group: {exc}") from None
        moved = authorize(command.principal, command.action, target, grants)
        if not moved.allowed:
            raise _Refusal(f"moving to {target}: {moved.reason}", AuditDecision.denied)
        changes["group"] = command.group
        note = f"; move allowed: {moved.reason}"
    updated = replace(current, **changes)
    if updated == current:
        return current, "nothing to change"
    return updated, f"updated {', '.join(sorted(changes))}{note}"


_MOVES: dict[CommandKind, DeviceStatus] = {
    CommandKind.suspend: DeviceStatus.suspended,
    CommandKind.revoke: DeviceStatus.revoked,
    CommandKind.activate: DeviceStatus.active,
}


def _transition(
    command: RegistryCommand,
    current: DeviceRecord | None,
    grants: Mapping[str, GrantSet],
    now_ms: int,
) -> tuple[DeviceRecord, str]:
    """The record after ``command`` and a reason; the current record itself when unchanged."""
    if isinstance(command, ProvisionDevice):
        if current is not None:
            raise _Refusal(f"device {command.device_id} already exists ({current.status})")
        return _provision(command, now_ms), "provisioned"
    assert current is not None  # apply() refuses commands on unknown devices
    if isinstance(command, UpdateDevice):
        record, reason = _update(command, current, grants)
    else:
        status = _MOVES[command.kind]
        if current.status is status:
            return current, f"already {status}"
        if current.status is DeviceStatus.revoked:
            verb = "re-activated" if status is DeviceStatus.active else status
            raise _Refusal(f"a revoked device cannot be {verb}")
        record, reason = replace(current, status=status), f"{current.status} -> {status}"
        if isinstance(command, SuspendDevice | RevokeDevice) and command.reason:
            reason = f"{reason}: {command.reason}"
    if record is current:
        return current, reason
    return replace(record, updated_ms=now_ms, last_command_id=command.command_id), reason


def _target(command: RegistryCommand, current: DeviceRecord | None) -> Resource | None:
    if isinstance(command, ProvisionDevice):
        return Resource(command.org, command.project, command.group, command.device_id)
    return None if current is None else current.resource


def apply(
    command: RegistryCommand,
    current: DeviceRecord | None,
    grants: Mapping[str, GrantSet],
    now_ms: int,
) -> Applied | Refused:
    """Authorize ``command`` and apply it to ``current`` (None: no such device yet).

    Always returns an audit record: denied (by RBAC), refused (invalid command or transition,
    unknown device), unchanged (allowed and already so) or applied. ``current`` must be the
    record of ``command.device_id`` (ValueError otherwise: the caller's lookup is wrong).
    """
    if current is not None and current.device_id != command.device_id:
        raise ValueError(f"record of {current.device_id!r} given for {command.device_id!r}")

    def audit(
        resource: Resource | None, decision: AuditDecision, authorization: str, reason: str
    ) -> AuditRecord:
        return AuditRecord(
            ts_ms=now_ms,
            command_id=command.command_id,
            command=str(command.kind),
            principal=str(command.principal),
            action=str(command.action),
            device_id=command.device_id,
            resource=None if resource is None else str(resource),
            decision=decision,
            authorization=authorization,
            reason=reason,
        )

    not_evaluated = "not evaluated: no resource to authorize against"
    try:
        target = _target(command, current)
    except ValueError as exc:
        return Refused(audit(None, AuditDecision.refused, not_evaluated, f"invalid command: {exc}"))
    if target is None:
        reason = f"unknown device {command.device_id!r}"
        return Refused(audit(None, AuditDecision.refused, not_evaluated, reason))
    decision: Decision = authorize(command.principal, command.action, target, grants)
    if not decision.allowed:
        return Refused(audit(target, AuditDecision.denied, decision.reason, decision.reason))
    if current is not None and current.last_command_id == command.command_id:
        reason = f"command {command.command_id} already applied"
        return Applied(current, audit(target, AuditDecision.unchanged, decision.reason, reason))
    try:
        record, reason = _transition(command, current, grants, now_ms)
    except _Refusal as refusal:
        return Refused(audit(target, refusal.decision, decision.reason, refusal.reason))
    outcome = AuditDecision.unchanged if record is current else AuditDecision.applied
    return Applied(record, audit(target, outcome, decision.reason, reason))
