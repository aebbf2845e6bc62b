"""Hot path processing: rule scoping, alerts, heartbeats, twins, dead letters, owned state."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.hot.alerts import (
    AlertRule,
    AlertState,
    AlertStatus,
    RuleKind,
    ScopeType,
    alert_id,
)
from streams.hot.processor import (
    DESIRED_SUBTOPIC,
    Emitted,
    HotProcessor,
    alert_states_from_json,
    alert_states_to_json,
)
from streams.hot.twin import MAX_DEPTH, Twin, delta
from streams.runtime.records import SourceRecord
from tests.support.records import nested

HOT = AlertRule("hot", ScopeType.group, "sensors", "temperature", RuleKind.above, 80, 75)
MINE = AlertRule("mine", ScopeType.device, "d-1", "battery", RuleKind.below, 10, 15)
SILENT = AlertRule(
    "silent", ScopeType.group, "sensors", "", RuleKind.missing_heartbeat, heartbeat_s=30
)


def src(partition: int = 0, offset: int = 0) -> SourceRecord:
    return SourceRecord("t", partition, offset, b"k", b"v")


def reading(device: str, seq: int, **values: float | None) -> dict[str, Any]:
    envelope = {"device_id": device, "seq": seq, "ts": seq * 1000, "received_at": seq * 1000 + 5}
    return envelope | values


def proc(*rules: AlertRule, groups: dict[str, str] | None = None) -> HotProcessor:
    p = HotProcessor()
    for rule in rules:
        p.set_rule(rule.rule_id, rule)
    for device, group in (groups or {}).items():
        p.set_device_group(device, group)
    return p


def feed(p: HotProcessor, device: str, temps: list[float], partition: int = 0) -> Emitted:
    out = Emitted()
    for seq, t in enumerate(temps, start=1):
        p.on_telemetry(src(partition), reading(device, seq, temperature=t), out)
    return out


def desire(
    p: HotProcessor,
    patch: Any,
    expected: int | None = None,
    device: str = "d-1",
    now: int = 100,
    request: str = "r-1",
) -> Emitted:
    out = Emitted()
    raw = patch if isinstance(patch, str | bytes) else json.dumps(patch)
    record: dict[str, Any] = {"device_id": device, "request_id": request, "patch": raw}
    record["expected_version"] = expected
    p.on_desired(src(), record, now, out)
    return out


def report(p: HotProcessor, patch: Any, seq: int, device: str = "d-1", now: int = 200) -> Emitted:
    out = Emitted()
    raw = patch if isinstance(patch, str | bytes) else json.dumps(patch)
    p.on_reported(src(), {"device_id": device, "seq": seq, "patch": raw}, now, out)
    return out


def statuses(out: Emitted) -> list[tuple[str, str, int]]:
    return [(e.device_id, e.status.value, e.seq) for e in out.alerts]


# ---------------------------------------------------------------------------- rule scoping


def test_group_rule_applies_only_to_devices_of_that_group() -> None:
    p = proc(HOT, groups={"d-1": "sensors", "d-2": "pumps"})
    out = feed(p, "d-1", [90])
    out_other = feed(p, "d-2", [90])
    out_none = feed(p, "d-3", [90])  # no group at all
    assert statuses(out) == [("d-1", "raised", 1)]
    assert not out_other
    assert not out_none
    assert "d-2" not in p.alert_states


def test_same_named_groups_of_two_tenants_do_not_share_rules() -> None:
    # Group rules name the group's path: "sensors" of acme/p1 is not "sensors" of other/p9.
    ours = AlertRule(
        "hot-acme", ScopeType.group, "org/acme/project/p1/group/sensors", "temperature",
        RuleKind.above, 80, 75,
    )  # fmt: skip
    p = proc(
        ours,
        groups={
            "d-1": "org/acme/project/p1/group/sensors",
            "d-2": "org/other/project/p9/group/sensors",
        },
    )
    assert statuses(feed(p, "d-1", [90])) == [("d-1", "raised", 1)]
    assert not feed(p, "d-2", [90])


def test_device_rule_applies_only_to_its_device() -> None:
    p = proc(MINE)
    out = Emitted()
    p.on_telemetry(src(), reading("d-1", 1, battery=5), out)
    p.on_telemetry(src(), reading("d-2", 1, battery=5), out)
    assert statuses(out) == [("d-1", "raised", 1)]


def test_rules_for_combines_device_and_group_rules() -> None:
    p = proc(HOT, MINE, SILENT, groups={"d-1": "sensors", "d-2": "sensors"})
    assert {r.rule_id for r in p.rules_for("d-1")} == {"hot", "mine", "silent"}
    assert {r.rule_id for r in p.rules_for("d-2")} == {"hot", "silent"}
    p.set_device_group("d-1", None)
    assert [r.rule_id for r in p.rules_for("d-1")] == ["mine"]
    assert p.rules_for("d-9") == []


def test_group_change_moves_a_device_between_rule_sets() -> None:
    p = proc(HOT, groups={"d-1": "pumps"})
    assert p.rules_for("d-1") == []
    p.set_device_group("d-1", "sensors")
    assert p.rules_for("d-1") == [HOT]


def test_deleting_a_rule_stops_it() -> None:
    p = proc(HOT, MINE, groups={"d-1": "sensors"})
    p.set_rule("hot", None)
    assert p.rules_for("d-1") == [MINE]
    assert not feed(p, "d-1", [90]).alerts
    p.set_rule("missing", None)  # deleting an unknown rule is harmless
    assert p.rules == {"mine": MINE}


def test_replacing_a_rule_reindexes_it() -> None:
    p = proc(HOT, groups={"d-1": "sensors"})
    moved = AlertRule("hot", ScopeType.device, "d-2", "temperature", RuleKind.above, 80)
    p.set_rule("hot", moved)
    assert p.rules_for("d-1") == []
    assert p.rules_for("d-2") == [moved]


# ---------------------------------------------------------------------------- alerts


def test_crossing_with_hysteresis_raises_once_and_resolves_once() -> None:
    p = proc(HOT, groups={"d-1": "sensors"})
    out = feed(p, "d-1", [70, 81, 90, 79, 81, 76, 74, 70])
    assert statuses(out) == [("d-1", "raised", 2), ("d-1", "resolved", 7)]
    raised, resolved = out.alerts
    assert raised.alert_id == resolved.alert_id == alert_id("d-1", "hot", 2)
    assert out.alert_states == {"d-1"}
    assert (p.counters.telemetry, p.counters.alerts_raised, p.counters.alerts_resolved) == (
        8,
        1,
        1,
    )
    assert not p.alert_states["d-1"]["hot"].active
    assert p.partition_of["d-1"] == 0


def test_replayed_reading_changes_no_state_and_emits_nothing() -> None:
    p = proc(HOT, groups={"d-1": "sensors"})
    feed(p, "d-1", [90])
    out = Emitted()
    p.on_telemetry(src(), reading("d-1", 1, temperature=90), out)
    assert not out
    assert p.counters.alerts_raised == 1


@given(st.lists(st.floats(0, 100), max_size=30))
def test_alerts_alternate_and_counters_match(temps: list[float]) -> None:
    p = proc(HOT, groups={"d-1": "sensors"})
    out = feed(p, "d-1", temps)
    kinds = [e.status for e in out.alerts]
    assert kinds == [AlertStatus.raised, AlertStatus.resolved] * (len(kinds) // 2) + (
        [AlertStatus.raised] if len(kinds) % 2 else []
    )
    assert p.counters.alerts_raised == kinds.count(AlertStatus.raised)
    assert p.counters.alerts_resolved == kinds.count(AlertStatus.resolved)
    assert p.counters.telemetry == len(temps)


def test_heartbeat_tick_raises_once_for_a_silent_device() -> None:
    p = proc(SILENT, groups={"d-1": "sensors", "d-2": "sensors"})
    feed(p, "d-1", [20])  # seen at 1005
    out = Emitted()
    p.on_telemetry(src(), reading("d-2", 2, temperature=20), out)  # seen at 2005
    out = Emitted()
    p.on_heartbeat_tick(31_500, out)  # d-1 silent 30.495 s, d-2 29.495 s
    assert statuses(out) == [("d-1", "raised", 1)]
    assert out.alerts[0].rule_id == "silent"
    assert out.alert_states == {"d-1"}
    again = Emitted()
    p.on_heartbeat_tick(32_500, again)  # d-1 stays raised; d-2 now silent too
    assert statuses(again) == [("d-2", "raised", 2)]
    later = Emitted()
    p.on_heartbeat_tick(99_000, later)
    assert not later
    assert p.counters.alerts_raised == 2


def test_next_reading_resolves_a_missing_heartbeat() -> None:
    p = proc(SILENT, groups={"d-1": "sensors"})
    feed(p, "d-1", [20])
    p.on_heartbeat_tick(60_000, Emitted())
    out = Emitted()
    p.on_telemetry(src(), reading("d-1", 2), out)
    assert statuses(out) == [("d-1", "resolved", 2)]


def test_heartbeat_tick_without_heartbeat_rules_or_readings_does_nothing() -> None:
    p = proc(HOT, groups={"d-1": "sensors"})
    feed(p, "d-1", [20])
    out = Emitted()
    p.on_heartbeat_tick(10**12, out)
    assert not out
    p.set_rule("silent", SILENT)  # a rule the device has no state for yet: not judged
    p.on_heartbeat_tick(10**12, out)
    assert not out


# ---------------------------------------------------------------------------- desired


def test_desired_accepted_emits_twin_downlink_and_answer() -> None:
    p = HotProcessor()
    out = desire(p, {"led": "on", "cfg": {"rate": 5}}, expected=0, now=123)
    twin = out.twins["d-1"]
    assert twin.version == 1
    assert p.twins["d-1"] is twin
    assert out.responses == [
        {
            "request_id": "r-1",
            "device_id": "d-1",
            "status": "accepted",
            "version": 1,
            "detail": None,
            "ts": 123,
        }
    ]
    [(device, record)] = out.downlinks
    assert device == "d-1"
    assert record["topic"] == f"devices/d-1/{DESIRED_SUBTOPIC}" == "devices/d-1/state/desired"
    assert record["qos"] == 1
    assert record["command_id"] == "twin-d-1-1"
    body = json.loads(record["payload"])
    assert body["version"] == 1
    assert body["state"] == delta(twin) == {"led": "on", "cfg": {"rate": 5}}
    assert body["timestamp"] == 123
    assert (p.counters.desired, p.counters.twin_changes) == (1, 1)


def test_desired_command_id_is_stable_on_replay() -> None:
    first = desire(HotProcessor(), {"led": "on"})
    second = desire(HotProcessor(), {"led": "on"})
    assert first.downlinks == second.downlinks


def test_desired_that_changes_nothing_is_unchanged() -> None:
    p = HotProcessor()
    desire(p, {"led": "on"})
    out = desire(p, {"led": "on"}, request="r-2")
    assert [(r["request_id"], r["status"], r["version"]) for r in out.responses] == [
        ("r-2", "unchanged", 1)
    ]
    assert not out.twins
    assert not out.downlinks


def test_desired_with_stale_expected_version_conflicts() -> None:
    p = HotProcessor()
    desire(p, {"led": "on"})
    out = desire(p, {"led": "off"}, expected=0)
    [response] = out.responses
    assert (response["status"], response["version"]) == ("conflict", 1)
    assert "version 1" in response["detail"]
    assert not out.twins
    assert not out.downlinks
    assert p.twins["d-1"].desired == {"led": "on"}
    assert p.counters.conflicts == 1


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"on"', "null", b"\xff"])
def test_desired_invalid_patch_is_answered_invalid(raw: str | bytes) -> None:
    p = HotProcessor()
    out = desire(p, raw)
    [response] = out.responses
    assert (response["status"], response["version"]) == ("invalid", 0)
    assert response["detail"]
    assert not out.twins
    assert not out.downlinks
    assert not out.dead
    assert "d-1" not in p.twins


# ---------------------------------------------------------------------------- reported


def test_report_closing_the_delta_emits_twin_and_no_downlink() -> None:
    p = HotProcessor()
    desire(p, {"led": "on"})
    out = report(p, {"led": "on", "fw": "1.2"}, seq=1)
    twin = out.twins["d-1"]
    assert twin.reported == {"led": "on", "fw": "1.2"}
    assert (twin.version, twin.last_reported_seq) == (2, 1)
    assert delta(twin) == {}
    assert not out.downlinks
    assert p.counters.reported == 1


def test_report_leaving_a_delta_resends_it() -> None:
    p = HotProcessor()
    desire(p, {"led": "on", "rate": 5})
    out = report(p, {"led": "on"}, seq=1)
    [(_, record)] = out.downlinks
    assert json.loads(record["payload"])["state"] == {"rate": 5}
    assert record["command_id"] == "twin-d-1-2"


def test_older_report_is_ignored_and_does_not_regress() -> None:
    p = HotProcessor()
    report(p, {"led": "on"}, seq=5)
    out = report(p, {"led": "off"}, seq=4)
    replay = report(p, {"led": "off"}, seq=5)
    assert not out
    assert not replay
    assert p.twins["d-1"].reported == {"led": "on"}
    assert p.twins["d-1"].last_reported_seq == 5
    assert p.counters.stale_ignored == 2


def test_unchanged_report_with_pending_delta_resends_it() -> None:
    p = HotProcessor()
    report(p, {"led": "off"}, seq=1)
    desire(p, {"led": "on"})  # the device had no session then
    out = report(p, {"led": "off"}, seq=2)  # it reconnects and reports its whole state
    twin = out.twins["d-1"]
    assert (twin.version, twin.last_reported_seq) == (2, 2)
    [(_, record)] = out.downlinks
    assert json.loads(record["payload"])["state"] == {"led": "on"}
    assert p.counters.twin_changes == 2  # the seq-only advance is no change
    assert not report(p, {"led": "off"}, seq=2)  # and the older seq now stays refused


def test_unchanged_report_without_delta_sends_nothing() -> None:
    p = HotProcessor()
    report(p, {"led": "on"}, seq=1)
    out = report(p, {"led": "on"}, seq=2)
    assert out.twins["d-1"].last_reported_seq == 2
    assert not out.downlinks


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "twin_invalid"),
        ("[1]", "twin_invalid"),
        ('{"a": NaN}', "twin_invalid"),
        (json.dumps(nested(MAX_DEPTH + 1)), "twin_too_deep"),
    ],
)
def test_bad_reported_patch_is_dead_lettered(raw: str, reason: str) -> None:
    p = HotProcessor()
    record = {"device_id": "d-1", "seq": 1, "patch": raw}
    source = src(partition=3, offset=42)
    out = Emitted()
    p.on_reported(source, record, 200, out)
    [dead] = out.dead
    assert (dead.source, dead.reason, dead.stage) == (source, reason, "hot")
    headers = dict(dead.headers())
    assert headers["error"] == reason.encode()
    assert headers["source"] == b"hot"
    assert (headers["partition"], headers["offset"]) == (b"3", b"42")
    assert not out.twins
    assert not out.downlinks
    assert p.counters.dead_lettered == 1
    assert "d-1" not in p.twins


def test_patch_at_the_depth_limit_is_accepted() -> None:
    out = report(HotProcessor(), nested(MAX_DEPTH), seq=1)
    assert not out.dead
    assert out.twins["d-1"].reported == nested(MAX_DEPTH)


# ---------------------------------------------------------------------------- owned state


def test_drop_partitions_forgets_exactly_their_devices() -> None:
    p = proc(HOT, groups={"d-1": "sensors", "d-2": "sensors", "d-3": "sensors"})
    feed(p, "d-1", [90], partition=0)
    feed(p, "d-2", [90], partition=1)
    p.on_reported(src(2), {"device_id": "d-3", "seq": 1, "patch": "{}"}, 1, Emitted())
    p.restore_twin(1, Twin("d-4", desired={"a": 1}, version=1))
    p.drop_partitions([1, 2])
    assert set(p.alert_states) == {"d-1"}
    assert set(p.twins) == set()
    assert p.partition_of == {"d-1": 0}
    p.drop_partitions([])
    assert p.partition_of == {"d-1": 0}


def test_restored_active_alert_resolves_rather_than_reraising() -> None:
    first = proc(HOT, groups={"d-1": "sensors"})
    feed(first, "d-1", [90, 95])
    saved = alert_states_to_json(first.alert_states["d-1"])

    p = proc(HOT, groups={"d-1": "sensors"})
    p.restore_alert_states(4, "d-1", alert_states_from_json(saved))
    assert p.partition_of["d-1"] == 4
    assert p.counters.restored_alert_states == 1
    out = Emitted()
    p.on_telemetry(src(4), reading("d-1", 2, temperature=99), out)  # a replay: ignored
    p.on_telemetry(src(4), reading("d-1", 3, temperature=99), out)  # still hot: no re-raise
    p.on_telemetry(src(4), reading("d-1", 4, temperature=70), out)
    assert statuses(out) == [("d-1", "resolved", 4)]
    assert out.alerts[0].alert_id == alert_id("d-1", "hot", 1)


def test_restored_twin_continues_versions_and_refuses_older_reports() -> None:
    p = HotProcessor()
    p.restore_twin(2, Twin("d-1", desired={"led": "on"}, version=7, last_reported_seq=10))
    assert p.counters.restored_twins == 1
    assert not report(p, {"led": "off"}, seq=9)
    assert desire(p, {"led": "off"}, expected=6).responses[0]["status"] == "conflict"
    out = desire(p, {"led": "off"}, expected=7)
    assert out.twins["d-1"].version == 8
    assert out.downlinks[0][1]["command_id"] == "twin-d-1-8"


def test_forget_drops_a_devices_state() -> None:
    p = proc(HOT, groups={"d-1": "sensors"})
    feed(p, "d-1", [90])
    report(p, {"a": 1}, seq=1)
    p.forget(0, "d-1")
    assert (p.twins, p.alert_states, p.partition_of) == ({}, {}, {})


states = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.builds(
        AlertState,
        device_id=st.none() | st.text(max_size=8),
        last_seq=st.integers(-1, 2**40),
        alert_id=st.none() | st.uuids().map(str),
        last_value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        last_ts=st.none() | st.integers(0, 2**42),
        last_seen_ms=st.none() | st.integers(0, 2**42),
    ),
    max_size=5,
)


@given(states)
def test_alert_states_json_round_trip(value: dict[str, AlertState]) -> None:
    assert alert_states_from_json(alert_states_to_json(value)) == value


def test_alert_states_from_json_refuses_a_non_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        alert_states_from_json(b"[]")
