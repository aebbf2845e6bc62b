"""The registry agent over decoded commands: authorized, applied, audited, restorable."""

from __future__ import annotations

from streams.registry.agent import RegistryAgent
from streams.registry.devices import (
    AuditDecision,
    AuditRecord,
    DeviceRecord,
    DeviceStatus,
    ProvisionDevice,
    SuspendDevice,
    command_to_record,
)
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.runtime.records import DeadLetter, SourceRecord
from tests.support.records import provision_command

SOURCE = SourceRecord("registry.commands", 2, 41, b"d-1", b"")
ALICE = Principal.user("alice")


def provision(command_id: str = "c1", who: Principal = ALICE) -> ProvisionDevice:
    return provision_command(who, command_id=command_id)


def run(
    agent: RegistryAgent, command: ProvisionDevice | SuspendDevice
) -> tuple[dict[str, DeviceRecord], list[AuditRecord], list[DeadLetter]]:
    devices: dict[str, DeviceRecord] = {}
    audits: list[AuditRecord] = []
    dead: list[DeadLetter] = []
    agent.on_command(SOURCE, command_to_record(command), 1_000, devices, audits, dead)
    return devices, audits, dead


def operator_agent() -> RegistryAgent:
    agent = RegistryAgent()
    agent.set_grants(ALICE.key, GrantSet.of(ALICE, (Role.admin, Resource("acme", "p1"))))
    return agent


def test_without_a_grant_the_command_is_denied_and_audited() -> None:
    devices, audits, dead = run(RegistryAgent(), provision())
    assert devices == {}
    assert dead == []
    assert [a.decision for a in audits] == [AuditDecision.denied]
    assert "alice" in audits[0].principal


def test_an_allowed_provision_creates_the_entry_and_one_audit_record() -> None:
    agent = operator_agent()
    devices, audits, _ = run(agent, provision())
    assert devices["d-1"].status is DeviceStatus.provisioned
    assert agent.devices["d-1"] == devices["d-1"]
    assert agent.partition_of["d-1"] == SOURCE.partition
    assert [a.decision for a in audits] == [AuditDecision.applied]
    assert agent.counters.decisions[AuditDecision.applied] == 1


def test_a_redelivered_command_is_unchanged_and_writes_no_entry() -> None:
    agent = operator_agent()
    run(agent, provision())
    devices, audits, _ = run(agent, provision())
    assert devices == {}
    assert [a.decision for a in audits] == [AuditDecision.unchanged]


def test_the_next_command_sees_the_previous_one_without_waiting_for_kafka() -> None:
    agent = operator_agent()
    run(agent, provision())
    suspend = SuspendDevice(command_id="c2", principal=ALICE, device_id="d-1", reason="stolen")
    devices, audits, _ = run(agent, suspend)
    assert devices["d-1"].status is DeviceStatus.suspended
    assert audits[0].decision is AuditDecision.applied


def test_restored_entries_are_dropped_with_their_partition() -> None:
    agent = operator_agent()
    devices, _, _ = run(agent, provision())
    fresh = RegistryAgent()
    fresh.restore(2, "d-1", devices["d-1"])
    fresh.restore(3, "d-2", devices["d-1"])
    fresh.drop_partitions({2})
    assert set(fresh.devices) == {"d-2"}


def test_an_unreadable_command_is_a_dead_letter_not_an_audit() -> None:
    agent = RegistryAgent()
    devices: dict[str, DeviceRecord] = {}
    audits: list[AuditRecord] = []
    dead: list[DeadLetter] = []
    bad = {**command_to_record(provision()), "principal": "nobody at all"}
    agent.on_command(SOURCE, bad, 1_000, devices, audits, dead)
    assert audits == []
    assert [d.reason for d in dead] == ["invalid_command"]
    assert dict(dead[0].headers())["source"] == b"registry"
