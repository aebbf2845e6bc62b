"""The bridge's pure parts: an MQTT message to its Kafka record; a downlink to its MQTT topic."""

from __future__ import annotations

import json

import pytest

from ingest.bridge import DLQ_TOPIC, route_message, subscriptions
from ingest.downlink import DownlinkRefused, MqttOut, to_mqtt
from schemas.codec import AvroCodec, Decoded, load_schema
from schemas.downlink import downlink_record

CODECS = {
    "telemetry": AvroCodec(load_schema("Telemetry"), schema_id=1),
    "events": AvroCodec(load_schema("DeviceEvent"), schema_id=2),
    "state/reported": AvroCodec(load_schema("TwinReported"), schema_id=4),
    "ota/status": AvroCodec(load_schema("DeviceEvent"), schema_id=2),
}
DOWNLINK = AvroCodec(load_schema("Downlink"), schema_id=3)
NOW = 1_700_000_000_123


def test_telemetry_becomes_an_avro_record_keyed_by_the_topic_device() -> None:
    payload = json.dumps({"seq": 7, "ts": NOW - 5, "temperature": 20.5, "device_id": "x"}).encode()
    out = route_message("devices/d-1/telemetry", payload, NOW, CODECS)
    assert (out.topic, out.key, out.reason) == ("telemetry.raw", b"d-1", None)
    decoded = CODECS["telemetry"].decode(out.value)
    assert isinstance(decoded, Decoded)
    assert decoded.record["device_id"] == "d-1"  # from the topic, not the payload
    assert (decoded.record["seq"], decoded.record["received_at"]) == (7, NOW)


def test_events_go_to_device_events() -> None:
    payload = json.dumps({"seq": 1, "ts": NOW, "type": "reboot"}).encode()
    assert route_message("devices/d-1/events", payload, NOW, CODECS).topic == "device.events"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/d-1/telemetry", b"\xff\xfe", "not_json"),
        ("devices/d-1/telemetry", b'{"ts": 1}', "missing_field"),
        ("devices/d-1/unknown", b"{}", "bad_topic"),
        ("elsewhere", b"{}", "bad_topic"),
    ],
)
def test_what_cannot_be_accepted_is_dead_lettered_with_its_bytes(
    topic: str, payload: bytes, reason: str
) -> None:
    out = route_message(topic, payload, NOW, CODECS)
    headers = dict(out.headers)
    assert (out.topic, out.value, out.reason) == (DLQ_TOPIC, payload, reason)
    assert headers["error"] == reason.encode()
    assert headers["mqtt_topic"] == topic.encode()
    assert headers["received_at"] == str(NOW).encode()


def test_subscriptions_are_shared_by_the_ingest_group() -> None:
    assert subscriptions() == [
        "$share/ingest/devices/+/telemetry",
        "$share/ingest/devices/+/events",
        "$share/ingest/devices/+/state/reported",
        "$share/ingest/devices/+/ota/status",
    ]


def test_reported_state_goes_to_twin_reported_as_canonical_json() -> None:
    payload = json.dumps({"seq": 3, "ts": NOW, "reported": {"led": "on", "fw": {"v": 2}}})
    out = route_message("devices/d-1/state/reported", payload.encode(), NOW, CODECS)
    decoded = CODECS["state/reported"].decode(out.value)
    assert isinstance(decoded, Decoded)
    assert (out.topic, decoded.record["seq"]) == ("twin.reported", 3)
    assert json.loads(decoded.record["patch"]) == {"led": "on", "fw": {"v": 2}}


def test_ota_status_becomes_a_device_event() -> None:
    payload = {"seq": 9, "ts": NOW, "status": "failed", "reason": "bad signature", "version": 2}
    out = route_message("devices/d-1/ota/status", json.dumps(payload).encode(), NOW, CODECS)
    decoded = CODECS["ota/status"].decode(out.value)
    assert isinstance(decoded, Decoded)
    assert out.topic == "device.events"
    assert decoded.record["type"] == "ota_status"
    assert decoded.record["message"] == "bad signature"
    assert decoded.record["attributes"] == {
        "status": "failed",
        "reason": "bad signature",
        "version": "2",
    }


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/d-1/state/reported", {"seq": 1, "ts": NOW}, "missing_field"),
        ("devices/d-1/state/reported", {"seq": 1, "ts": NOW, "reported": [1]}, "wrong_type"),
        ("devices/d-1/ota/status", {"seq": 1, "ts": NOW}, "missing_field"),
        ("devices/d-1/ota/status", {"seq": 1, "ts": NOW, "status": "ok", "x": [1]}, "wrong_type"),
    ],
)
def test_bad_twin_and_ota_reports_are_dead_lettered(
    topic: str, payload: dict[str, object], reason: str
) -> None:
    assert route_message(topic, json.dumps(payload).encode(), NOW, CODECS).reason == reason


def test_a_downlink_reaches_the_topic_of_its_key() -> None:
    value = DOWNLINK.encode(downlink_record("d-1", "ota/command", b"go", qos=1))
    assert to_mqtt(b"d-1", value, DOWNLINK) == MqttOut("devices/d-1/ota/command", b"go", 1)


@pytest.mark.parametrize(
    ("key", "record"),
    [
        (b"d-1", downlink_record("d-2", "state/desired", b"x")),  # another device
        (b"d-1", {**downlink_record("d-1", "x", b"x"), "topic": "devices/d-1/#"}),  # wildcard
        (b"d-1", downlink_record("d-1", "x", b"x", qos=3)),
    ],
)
def test_a_downlink_outside_its_device_is_refused(key: bytes, record: dict[str, object]) -> None:
    assert isinstance(to_mqtt(key, DOWNLINK.encode(record), DOWNLINK), DownlinkRefused)


def test_garbage_downlink_is_refused_not_raised() -> None:
    assert isinstance(to_mqtt(b"d-1", b"\x00\x00\x00\x00\x03garbage", DOWNLINK), DownlinkRefused)
    assert isinstance(to_mqtt(None, b"", DOWNLINK), DownlinkRefused)
