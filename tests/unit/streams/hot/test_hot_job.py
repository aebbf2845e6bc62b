"""The hot job through the kit's harness (no Kafka): its spec's tables, process and outputs,
and its tables' error channel (a corrupt record is dead-lettered with where it was read)."""

from __future__ import annotations

import json
from typing import Any

from streams.hot.alerts import AlertRule, RuleKind, ScopeType, rule_to_record
from streams.hot.health import FUTURE_SKEW_MS
from streams.hot.job import (
    ALERT_STATE,
    ALERTS,
    COMMANDS,
    DEVICES,
    DIGESTS,
    DLQ,
    HOT_JOB,
    RULES,
    TELEMETRY,
    TWIN_STATE,
    HotState,
)
from streams.registry.devices import command_to_record
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.runtime.testing import JobHarness
from tests.support.records import provision_command
from tests.support.records import telemetry_reading as reading

HOT = AlertRule("hot", ScopeType.device, "d-1", "temperature", RuleKind.above, 80, 75)
GROUPED = AlertRule(
    "grouped", ScopeType.group, "org/o/project/p/group/g", "temperature", RuleKind.above, 80, 75
)


def device(device_id: str, group: str = "g") -> dict[str, Any]:
    return {
        "device_id": device_id,
        "org": "o",
        "project": "p",
        "group": group,
        "region": "eu",
        "status": "active",
        "cert_serial": "1",
        "cert_fingerprint": "f",
        "firmware_version": None,
        "labels": {},
        "created_ms": 1,
        "updated_ms": 1,
        "last_command_id": None,
    }


def test_a_rule_and_a_hot_reading_raise_an_alert_and_store_its_state() -> None:
    harness = JobHarness(HOT_JOB)
    harness.table(RULES, "hot", rule_to_record(HOT))
    run = harness.run((TELEMETRY, "d-1", reading("d-1", 1, 90.0)), now_ms=5_000)
    [alert] = run.on(ALERTS)
    assert alert.key == "d-1"
    assert isinstance(alert.value, dict)
    assert alert.value["status"] == "raised"
    assert [o.key for o in run.on(ALERT_STATE)] == ["d-1"]
    assert run.on(TWIN_STATE) == []
    assert run.dead_letters == []


def test_group_rules_follow_the_registry_table() -> None:
    harness = JobHarness(HOT_JOB)
    harness.table(RULES, "grouped", rule_to_record(GROUPED))
    harness.table(DEVICES, "d-1", device("d-1"))
    assert harness.state.processor.groups == {"d-1": "org/o/project/p/group/g"}
    run = harness.run((TELEMETRY, "d-1", reading("d-1", 1, 90.0)))
    assert [o.value["rule_id"] for o in run.on(ALERTS) if isinstance(o.value, dict)] == ["grouped"]


def test_a_corrupt_rule_is_dead_lettered_with_where_it_was_read_and_the_rest_applies() -> None:
    harness = JobHarness(HOT_JOB)
    harness.table(RULES, "broken", b"\x00\x00\x00\x00\x07garbage", partition=1)
    harness.table(RULES, "hot", rule_to_record(HOT))
    run = harness.run((TELEMETRY, "d-1", reading("d-1", 1, 90.0)))

    assert sorted(harness.state.processor.rules) == ["hot"]
    assert len(run.on(ALERTS)) == 1
    [dead] = run.dead_letters
    headers = dict(dead.headers())
    assert headers["topic"] == RULES.encode()
    assert headers["partition"] == b"1"
    assert headers["offset"] == b"0"
    assert headers["source"] == b"hot"
    assert dead.source.key == b"broken"
    assert dead.source.value == b"\x00\x00\x00\x00\x07garbage"
    assert harness.table_dead_lettered == 1


def test_a_corrupt_device_counts_as_no_device_and_is_dead_lettered() -> None:
    harness = JobHarness(HOT_JOB)
    harness.table(DEVICES, "d-1", device("d-1"))
    harness.table(DEVICES, "d-1", b"not avro")
    assert harness.state.processor.groups == {}
    # Read by the global table and the changelog alike, refused once.
    assert harness.table_dead_lettered == 1


def test_a_corrupt_alert_state_changelog_record_no_longer_stops_the_worker() -> None:
    harness = JobHarness(HOT_JOB)
    harness.table(ALERT_STATE, "d-1", b"{not json", partition=3)
    [dead] = harness.run().dead_letters
    assert (dead.source.topic, dead.source.partition, dead.reason) == (
        ALERT_STATE,
        3,
        "invalid_record",
    )


def test_an_input_that_does_not_decode_goes_to_dlq_hot() -> None:
    run = JobHarness(HOT_JOB).run((TELEMETRY, "d-1", b"\x01junk"))
    [dead] = run.on(DLQ)
    assert dead.value == b"\x01junk"
    assert dict(dead.headers or [])["source"] == b"hot"
    assert run.state.counters.dead_lettered == 1


def test_the_status_keeps_the_keys_fleet_status_reads() -> None:
    state = HotState()
    status = state.status()
    for key in ("rules", "twins", "telemetry", "dead_lettered", "registry"):
        assert key in status


def test_a_batch_s_readings_go_out_as_one_health_digest_per_group_and_minute() -> None:
    harness = JobHarness(HOT_JOB)
    harness.table(DEVICES, "d-1", device("d-1"))
    harness.table(DEVICES, "d-2", device("d-2", group="h"))
    run = harness.run(
        (TELEMETRY, "d-1", reading("d-1", 1, 20.0)),
        (TELEMETRY, "d-1", reading("d-1", 2, 30.0)),
        (TELEMETRY, "d-2", reading("d-2", 1, None)),
        (TELEMETRY, "d-3", reading("d-3", 61, 10.0)),  # unregistered, the next minute
        (TELEMETRY, "d-1", reading("d-1", 3 + FUTURE_SKEW_MS // 1000, 50.0)),  # clock ahead
    )
    digests = {o.key: json.loads(o.value) for o in run.on(DIGESTS) if isinstance(o.value, bytes)}
    assert digests == {
        "o/p/g": {
            "group": "o/p/g",
            "window_start_ms": 0,
            "devices": ["d-1"],
            "messages": 2,
            "metrics": {"temperature": {"count": 2, "min": 20.0, "max": 30.0, "sum": 50.0}},
        },
        "o/p/h": {
            "group": "o/p/h",
            "window_start_ms": 0,
            "devices": ["d-2"],
            "messages": 1,
            "metrics": {},
        },
        "unregistered": {
            "group": "unregistered",
            "window_start_ms": 60_000,
            "devices": ["d-3"],
            "messages": 1,
            "metrics": {"temperature": {"count": 1, "min": 10.0, "max": 10.0, "sum": 10.0}},
        },
    }


def test_a_device_provisioned_in_a_batch_has_its_group_for_the_next_reading() -> None:
    # The registry table brings the entry back later; its telemetry may come first.
    harness = JobHarness(HOT_JOB)
    alice = Principal.user("alice")
    harness.table(
        "rbac.grants", alice.key, GrantSet.of(alice, (Role.admin, Resource("o"))).to_record()
    )
    provision = provision_command(alice, "d-9", org="o", project="p", group="g")
    harness.run((COMMANDS, "d-9", command_to_record(provision)))
    run = harness.run((TELEMETRY, "d-9", reading("d-9", 1, 20.0)))
    assert [o.key for o in run.on(DIGESTS)] == ["o/p/g"]
