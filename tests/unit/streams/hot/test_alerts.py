"""Alert rules: thresholds with hysteresis, rate of change, heartbeats, ordering by seq, Avro."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import AvroCodec, Decoded, load_schema
from streams.hot.alerts import (
    AlertEvent,
    AlertRule,
    AlertState,
    AlertStatus,
    RuleKind,
    ScopeType,
    Severity,
    alert_from_record,
    alert_id,
    alert_to_record,
    check_heartbeat,
    evaluate,
    rule_applies,
    rule_from_record,
    rule_to_record,
)

HOT = AlertRule("hot", ScopeType.group, "sensors", "temperature", RuleKind.above, 80, 75)
FAST = AlertRule(
    "fast", ScopeType.device, "d-1", "vibration_rms", RuleKind.rate_of_change, 2.0, window_s=10
)
SILENT = AlertRule(
    "silent", ScopeType.group, "sensors", "", RuleKind.missing_heartbeat, heartbeat_s=30
)


def reading(seq: int, value: float | None = None, metric: str = "temperature") -> dict[str, object]:
    return {
        "device_id": "d-1",
        "seq": seq,
        "ts": seq * 1000,
        "received_at": seq * 1000 + 5,
        metric: value,
    }


def run(
    rule: AlertRule, values: Iterable[float | None], state: AlertState | None = None
) -> tuple[AlertState, list[AlertEvent]]:
    state, events = state or AlertState(), []
    for seq, value in enumerate(values, start=1):
        state, new = evaluate(rule, state, reading(seq, value, rule.metric or "temperature"))
        events += new
    return state, events


def statuses(events: list[AlertEvent]) -> list[tuple[str, int]]:
    return [(e.status.value, e.seq) for e in events]


def test_crossing_raises_once_flapping_in_the_band_is_quiet_and_clearing_resolves_once() -> None:
    _, events = run(HOT, [70, 81, 90, 79, 81, 76, 85, 74, 70, 76, 79])
    assert statuses(events) == [("raised", 2), ("resolved", 8)]
    raised, resolved = events
    assert raised.alert_id == resolved.alert_id == alert_id("d-1", "hot", 2)
    assert (raised.value, raised.threshold, resolved.threshold) == (81, 80, 75)


@given(st.lists(st.none() | st.floats(0, 100), max_size=40))
def test_events_alternate_raised_and_resolved(values: list[float | None]) -> None:
    state, events = run(HOT, values)
    kinds = [e.status for e in events]
    assert kinds == [AlertStatus.raised, AlertStatus.resolved] * (len(kinds) // 2) + (
        [AlertStatus.raised] if len(kinds) % 2 else []
    )
    assert state.active == (len(kinds) % 2 == 1)


def test_below_rule() -> None:
    low = AlertRule("low", ScopeType.device, "d-1", "battery", RuleKind.below, 10, 15)
    _, events = run(low, [50, 9, 12, 8, 16])
    assert statuses(events) == [("raised", 2), ("resolved", 5)]


def test_stale_and_replayed_readings_are_ignored() -> None:
    state, events = run(HOT, [70, 81])
    assert evaluate(HOT, state, reading(1, 10)) == (state, [])  # older: no resolve
    assert evaluate(HOT, state, reading(2, 81)) == (state, [])  # replay: no second raise
    replay_state, replay = run(HOT, [70, 81])
    assert (replay_state, replay) == (state, events)  # same ids on replay


def test_rate_of_change_per_second_over_consecutive_readings() -> None:
    # ts = seq seconds; 5 -> 8 in one second is 3/s; a gap > window_s gives no rate
    state, events = run(FAST, [1, 2, 5, 5.5, 5.0])
    assert statuses(events) == [("raised", 3), ("resolved", 4)]
    assert events[0].value == pytest.approx(3.0)
    state, events = evaluate(FAST, state, reading(40, 50.0, "vibration_rms"))
    assert events == []
    assert state.last_value == 50.0


def test_missing_heartbeat_raises_once_and_the_next_reading_resolves() -> None:
    state, _ = run(SILENT, [None, None])  # last seen: seq 2, received at 2005
    assert check_heartbeat(SILENT, state, 32_005) == (state, [])  # exactly 30 s: not yet
    state, events = check_heartbeat(SILENT, state, 40_000)
    assert statuses(events) == [("raised", 2)]
    assert events[0].value == pytest.approx(37.995)
    assert check_heartbeat(SILENT, state, 90_000) == (state, [])  # raised once
    state, events = evaluate(SILENT, state, reading(3))
    assert statuses(events) == [("resolved", 3)]
    assert not state.active
    assert check_heartbeat(SILENT, AlertState(), 10**12) == (AlertState(), [])  # never seen


def test_scope_and_rule_validation() -> None:
    assert rule_applies(HOT, "d-9", "sensors")
    assert not rule_applies(HOT, "d-9", "pumps")
    assert rule_applies(FAST, "d-1", None)
    assert not rule_applies(FAST, "d-2", None)
    with pytest.raises(ValueError, match="clear_threshold"):
        AlertRule("bad", ScopeType.device, "d-1", "temperature", RuleKind.above, 80, 85)
    with pytest.raises(ValueError, match="heartbeat_s"):
        AlertRule("bad", ScopeType.device, "d-1", "", RuleKind.missing_heartbeat)


def test_alert_and_rule_round_trip_through_avro() -> None:
    _, events = run(HOT, [90])
    alerts = AvroCodec(load_schema("Alert"), schema_id=1)
    decoded = alerts.decode(alerts.encode(alert_to_record(events[0])))
    assert isinstance(decoded, Decoded)
    assert alert_from_record(decoded.record) == events[0]
    rules = AvroCodec(load_schema("AlertRule"), schema_id=2)
    critical = AlertRule(
        "c", ScopeType.device, "d", "x", RuleKind.below, 1, severity=Severity.critical
    )
    for rule in (HOT, FAST, SILENT, critical):
        decoded = rules.decode(rules.encode(rule_to_record(rule)))
        assert isinstance(decoded, Decoded)
        assert rule_from_record(decoded.record) == rule
