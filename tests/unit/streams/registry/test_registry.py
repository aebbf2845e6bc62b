"""streams.registry.devices: transitions, the audit record of each decision, Avro round trips."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from schemas.codec import AvroCodec, Decoded, load_schema
from streams.registry.devices import (
    ActivateDevice,
    Applied,
    AuditDecision,
    AuditRecord,
    DeviceRecord,
    DeviceStatus,
    ProvisionDevice,
    Refused,
    RegistryCommand,
    RevokeDevice,
    SuspendDevice,
    UpdateDevice,
    apply,
    command_from_record,
    command_to_record,
)
from streams.registry.rbac import GrantSet, Principal, Resource, Role, index_grants

ADMIN, OPERATOR, VIEWER = Principal.user("ada"), Principal.user("oscar"), Principal.service("viz")
GRANTS = index_grants(
    [
        GrantSet.of(ADMIN, (Role.admin, Resource("acme"))),
        GrantSet.of(OPERATOR, (Role.operator, Resource("acme", "plant-1", "sensors"))),
        GrantSet.of(VIEWER, (Role.viewer, Resource("acme"))),
    ]
)
SERIAL = str(2**150 + 7)  # bigger than an Avro long
FINGERPRINT = "ab" * 32
NOW = 1_700_000_000_000


def provision(who: Principal = ADMIN, command_id: str = "c-1", **changes: Any) -> ProvisionDevice:
    fields: dict[str, Any] = {
        "command_id": command_id,
        "principal": who,
        "device_id": "d-1",
        "org": "acme",
        "project": "plant-1",
        "group": "sensors",
        "region": "eu-west-1",
        "cert_serial": SERIAL,
        "cert_fingerprint": FINGERPRINT,
        "firmware_version": "1.0.0",
        "labels": {"site": "north"},
    }
    return ProvisionDevice(**{**fields, **changes})


def provisioned() -> DeviceRecord:
    outcome = apply(provision(), None, GRANTS, NOW)
    assert isinstance(outcome, Applied)
    return outcome.record


def test_provision_creates_the_record_and_audits_the_grant() -> None:
    outcome = apply(provision(), None, GRANTS, NOW)
    assert isinstance(outcome, Applied)
    record, audit = outcome.record, outcome.audit
    assert record.status is DeviceStatus.provisioned
    assert (record.created_ms, record.updated_ms, record.cert_serial) == (NOW, NOW, SERIAL)
    assert record.resource == Resource("acme", "plant-1", "sensors", "d-1")
    assert audit == AuditRecord(
        ts_ms=NOW,
        command_id="c-1",
        command="provision",
        principal="user:ada",
        action="device.provision",
        device_id="d-1",
        resource="org/acme/project/plant-1/group/sensors/device/d-1",
        decision=AuditDecision.applied,
        authorization="grant admin on org/acme allows device.provision on "
        "org/acme/project/plant-1/group/sensors/device/d-1",
        reason="provisioned",
    )


def test_provisioning_an_existing_id_is_refused_but_a_redelivery_is_unchanged() -> None:
    current = provisioned()
    again = apply(provision(command_id="c-2"), current, GRANTS, NOW + 1)
    assert isinstance(again, Refused)
    assert again.audit.decision is AuditDecision.refused
    assert "already exists" in again.audit.reason
    redelivered = apply(provision(), current, GRANTS, NOW + 1)
    assert isinstance(redelivered, Applied)
    assert redelivered.record is current
    assert redelivered.audit.decision is AuditDecision.unchanged


@pytest.mark.parametrize("who", [VIEWER, OPERATOR, Principal.user("stranger")])
def test_provision_without_the_grant_is_denied(who: Principal) -> None:
    outcome = apply(provision(who), None, GRANTS, NOW)
    assert isinstance(outcome, Refused)
    assert outcome.audit.decision is AuditDecision.denied
    assert outcome.audit.reason.startswith("no grant covers device.provision")


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"cert_fingerprint": "AB" * 32}, "fingerprint"),
        ({"cert_serial": "0"}, "serial"),
        ({"cert_serial": str(2**160)}, "20 octets"),
        ({"device_id": "broker"}, "invalid command"),
        ({"group": "a/b"}, "invalid command"),
        ({"labels": {"": "x"}}, "label key"),
    ],
)
def test_invalid_provisions_are_refused(changes: dict[str, Any], why: str) -> None:
    outcome = apply(provision(**changes), None, GRANTS, NOW)
    assert isinstance(outcome, Refused)
    assert why in outcome.audit.reason
    assert outcome.audit.decision is AuditDecision.refused


def test_lifecycle_transitions_and_their_audit_decisions() -> None:
    record = provisioned()

    def cmd(kind: Any, cid: str, who: Principal, **kw: Any) -> RegistryCommand:
        command: RegistryCommand = kind(command_id=cid, principal=who, device_id="d-1", **kw)
        return command

    steps: list[tuple[RegistryCommand, str, str]] = [
        (cmd(ActivateDevice, "a1", OPERATOR), "applied", "active"),
        (cmd(SuspendDevice, "s1", OPERATOR), "applied", "suspended"),
        (cmd(SuspendDevice, "s2", OPERATOR), "unchanged", "suspended"),
        (cmd(ActivateDevice, "a2", OPERATOR), "applied", "active"),
        (cmd(RevokeDevice, "r1", OPERATOR), "denied", "active"),
        (cmd(RevokeDevice, "r2", ADMIN, reason="lost"), "applied", "revoked"),
        (cmd(RevokeDevice, "r3", ADMIN), "unchanged", "revoked"),
        (cmd(ActivateDevice, "a3", ADMIN), "refused", "revoked"),
        (cmd(UpdateDevice, "u1", ADMIN, region="x"), "refused", "revoked"),
    ]
    reasons = []
    for i, (command, decision, status) in enumerate(steps, start=1):
        outcome = apply(command, record, GRANTS, NOW + i)
        reasons.append(outcome.audit.reason)
        assert outcome.audit.decision == decision, (command, outcome.audit)
        assert outcome.audit.command_id == command.command_id
        if isinstance(outcome, Applied):
            if decision == "applied":
                assert outcome.record.updated_ms == NOW + i
                assert outcome.record.last_command_id == command.command_id
            else:
                assert outcome.record is record
            record = outcome.record
        assert record.status == status
    assert reasons[-2:] == [
        "a revoked device cannot be re-activated",
        "a revoked device cannot be updated",
    ]
    assert reasons[5] == "active -> revoked: lost"


def test_commands_on_unknown_devices_are_refused() -> None:
    outcome = apply(
        SuspendDevice(command_id="s", principal=ADMIN, device_id="d-9"), None, GRANTS, NOW
    )
    assert isinstance(outcome, Refused)
    assert outcome.audit.resource is None
    assert "unknown device" in outcome.audit.reason
    with pytest.raises(ValueError, match="given for"):
        apply(
            SuspendDevice(command_id="s", principal=ADMIN, device_id="d-9"),
            provisioned(),
            GRANTS,
            NOW,
        )


def test_update_changes_fields_and_a_move_needs_the_new_group() -> None:
    current = provisioned()
    update = UpdateDevice(
        command_id="u1", principal=OPERATOR, device_id="d-1", firmware_version="1.1", labels={}
    )
    outcome = apply(update, current, GRANTS, NOW + 5)
    assert isinstance(outcome, Applied)
    assert outcome.audit.decision is AuditDecision.applied
    assert outcome.record == replace(
        current, firmware_version="1.1", labels={}, updated_ms=NOW + 5, last_command_id="u1"
    )
    same = replace(update, command_id="u2")
    assert apply(same, outcome.record, GRANTS, NOW + 6).audit.decision is AuditDecision.unchanged
    move = UpdateDevice(command_id="m", principal=OPERATOR, device_id="d-1", group="pumps")
    denied = apply(move, current, GRANTS, NOW)
    assert isinstance(denied, Refused)
    assert denied.audit.decision is AuditDecision.denied
    moved = apply(replace(move, principal=ADMIN), current, GRANTS, NOW)
    assert isinstance(moved, Applied)
    assert moved.record.group == "pumps"


def codec(name: str) -> AvroCodec:
    return AvroCodec(load_schema(name), 1)


def round_trip(name: str, record: dict[str, Any]) -> dict[str, Any]:
    decoded = codec(name).decode(codec(name).encode(record))
    assert isinstance(decoded, Decoded)
    return decoded.record


def test_device_and_audit_records_round_trip_through_avro() -> None:
    record = provisioned()
    assert DeviceRecord.from_record(round_trip("Device", record.to_record())) == record
    audit = apply(provision(VIEWER), None, GRANTS, NOW).audit
    assert AuditRecord.from_record(round_trip("AuditRecord", audit.to_record())) == audit


@pytest.mark.parametrize(
    "command",
    [
        provision(),
        UpdateDevice(command_id="u", principal=ADMIN, device_id="d-1", labels={"a": "b"}),
        UpdateDevice(command_id="u", principal=ADMIN, device_id="d-1", region="r"),
        SuspendDevice(command_id="s", principal=Principal.orchestrator(), device_id="d-1"),
        RevokeDevice(command_id="r", principal=ADMIN, device_id="d-1", reason="stolen"),
        ActivateDevice(command_id="a", principal=ADMIN, device_id="d-1"),
    ],
)
def test_commands_round_trip_through_avro(command: RegistryCommand) -> None:
    assert command_from_record(round_trip("RegistryCommand", command_to_record(command))) == command


def test_a_provision_record_missing_fields_is_not_a_command() -> None:
    record = {**command_to_record(provision()), "org": None}
    with pytest.raises(ValueError, match="lacks org"):
        command_from_record(record)
