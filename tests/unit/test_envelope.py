"""Envelope checks on what a device sent, before Avro: one test per reject reason."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.envelope import (
    MAX_PAYLOAD_BYTES,
    Accepted,
    Rejected,
    RejectReason,
    parse_uplink_topic,
    validate,
    validate_event,
    validate_telemetry,
)
from schemas.codec import AvroCodec, Decoded, load_schema

NOW = 1_700_000_000_123


def payload(**fields: Any) -> bytes:
    return json.dumps({"seq": 1, "ts": NOW - 5, **fields}).encode()


def reason(result: Accepted | Rejected) -> RejectReason | None:
    return result.reason if isinstance(result, Rejected) else None


def test_telemetry_becomes_a_record() -> None:
    result = validate("telemetry", "dev-1", payload(temperature=21, rssi=-70.5), NOW)
    assert result == Accepted(
        "telemetry",
        {
            "device_id": "dev-1",
            "seq": 1,
            "ts": NOW - 5,
            "received_at": NOW,
            "temperature": 21.0,
            "humidity": None,
            "battery": None,
            "vibration_rms": None,
            "extra": {"rssi": -70.5},
        },
    )


def test_the_device_id_comes_from_the_topic_not_the_payload() -> None:
    parsed = parse_uplink_topic("devices/dev-1/telemetry")
    assert parsed == ("dev-1", "telemetry")
    device_id, kind = parsed
    result = validate(kind, device_id, payload(device_id="dev-2", received_at=0), NOW)
    assert isinstance(result, Accepted)
    assert (result.record["device_id"], result.record["received_at"]) == ("dev-1", NOW)
    assert result.record["extra"] == {}


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/d1/state/reported", ("d1", "state/reported")),
        ("devices/d1/ota/status", ("d1", "ota/status")),
        ("devices/d1", None),
        ("devices//telemetry", None),
        ("devices/d1/state/", None),
        ("things/d1/telemetry", None),
    ],
)
def test_parse_uplink_topic(topic: str, expected: tuple[str, str] | None) -> None:
    assert parse_uplink_topic(topic) == expected


def test_an_event_becomes_a_record() -> None:
    body = payload(type="reboot", message="watchdog", attributes={"fw": "1.2.3"})
    result = validate("events", "dev-1", body, NOW)
    assert isinstance(result, Accepted)
    assert result.record["type"] == "reboot"
    assert result.record["attributes"] == {"fw": "1.2.3"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", RejectReason.not_json),
        (b'{"seq": 1, "ts": 2, "temperature": NaN}', RejectReason.not_json),
        (b"\xff\xfe\xfa", RejectReason.not_json),
        (b"[1, 2]", RejectReason.not_object),
        (json.dumps({"ts": NOW}).encode(), RejectReason.missing_field),
        (json.dumps({"seq": 1}).encode(), RejectReason.missing_field),
        (payload(temperature="hot"), RejectReason.wrong_type),
        (payload(humidity=True), RejectReason.wrong_type),
        (payload(firmware="1.2.3"), RejectReason.wrong_type),
        (payload(big=10**400), RejectReason.wrong_type),
        (payload(seq=-1), RejectReason.bad_seq),
        (payload(seq=2**63), RejectReason.bad_seq),
        (payload(seq=True), RejectReason.bad_seq),
        (payload(seq="1"), RejectReason.bad_seq),
        (payload(ts=1.5), RejectReason.bad_timestamp),
        (payload(ts=-1), RejectReason.bad_timestamp),
        (payload(ts=2**62), RejectReason.bad_timestamp),
        (payload(pad="x" * MAX_PAYLOAD_BYTES), RejectReason.oversize),
    ],
)
def test_telemetry_reject_reasons(body: bytes, expected: RejectReason) -> None:
    assert reason(validate_telemetry("dev-1", body, NOW)) == expected


def test_the_wrong_type_detail_names_the_key() -> None:
    result = validate_telemetry("dev-1", payload(firmware="1.2.3"), NOW)
    assert isinstance(result, Rejected)
    assert "'firmware'" in result.detail


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (payload(), RejectReason.missing_field),
        (payload(type=3), RejectReason.wrong_type),
        (payload(type=""), RejectReason.wrong_type),
        (payload(type="reboot", message=["x"]), RejectReason.wrong_type),
        (payload(type="reboot", attributes={"n": 1}), RejectReason.wrong_type),
        (payload(type="reboot", attributes="x"), RejectReason.wrong_type),
        (payload(type="reboot", reason="watchdog"), RejectReason.wrong_type),
        (b'{"seq": 1, "ts": 2, "type": "\\ud800"}', RejectReason.wrong_type),
    ],
)
def test_event_reject_reasons(body: bytes, expected: RejectReason) -> None:
    assert reason(validate_event("dev-1", body, NOW)) == expected


def test_an_unknown_kind_is_a_bad_topic() -> None:
    assert reason(validate("state/desired", "dev-1", payload(), NOW)) == RejectReason.bad_topic


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "-leading-dash", "x" * 65])
def test_an_invalid_device_id_is_refused(device_id: str) -> None:
    result = validate("telemetry", device_id, payload(), NOW)
    assert reason(result) == RejectReason.unknown_device_id


metrics = st.dictionaries(
    st.text(min_size=1).filter(lambda k: k not in {"seq", "ts", "device_id", "received_at"}),
    st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False),
    max_size=6,
)


@settings(deadline=None)
@given(fields=metrics, seq=st.integers(0, 2**63 - 1))
def test_accepted_telemetry_round_trips_through_avro(fields: dict[str, Any], seq: int) -> None:
    result = validate_telemetry("dev-1", payload(**fields, seq=seq), NOW)
    assert isinstance(result, Accepted)
    codec = AvroCodec(load_schema("Telemetry"), 1)
    assert codec.decode(codec.encode(result.record)) == Decoded(1, result.record)


@settings(deadline=None)
@given(kind=st.sampled_from(["telemetry", "events"]), body=st.binary(max_size=256))
def test_garbage_payloads_never_raise(kind: str, body: bytes) -> None:
    assert isinstance(validate(kind, "dev-1", body, NOW), Accepted | Rejected)
