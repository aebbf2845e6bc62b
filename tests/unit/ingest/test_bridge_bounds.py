"""The bridge's bounded dead letters, canary routing and health rule: pure parts, no services."""

from __future__ import annotations

import hashlib
import json

from confluent_kafka import KafkaError

from ingest.bridge import (
    CANARY_TOPIC,
    DLQ_HEAD_BYTES,
    DLQ_TOPIC,
    DLQ_WHOLE_MAX_BYTES,
    HEADER_MAX_BYTES,
    Incoming,
    canary_payload,
    dead_letter,
    route_message,
    unproducible,
)
from ingest.health import STALE_AFTER_S, Heal, StallWatch, ingesting
from ingest.kafka_delivery import permanent_for_record
from schemas.codec import AvroCodec, load_schema

CODECS = {
    "telemetry": AvroCodec(load_schema("Telemetry"), schema_id=1),
    "events": AvroCodec(load_schema("DeviceEvent"), schema_id=2),
    "state/reported": AvroCodec(load_schema("TwinReported"), schema_id=4),
    "ota/status": AvroCodec(load_schema("DeviceEvent"), schema_id=2),
}
NOW_MS = 1_700_000_000_123


def _huge(size: int) -> bytes:
    return (b'{"seq": 1, "ts": 1, "pad": "' + b"x" * size + b'"}')[:size]


def test_an_oversize_payload_is_dead_lettered_in_a_bounded_form() -> None:
    payload = _huge(1_000_000)
    out = route_message("devices/d-1/telemetry", payload, NOW_MS, CODECS)
    headers = dict(out.headers)
    assert (out.topic, out.key, out.reason, out.bounded) == (DLQ_TOPIC, b"d-1", "oversize", True)
    assert out.value == payload[:DLQ_HEAD_BYTES]
    assert headers["original_size"] == b"1000000"
    assert headers["sha256"] == hashlib.sha256(payload).hexdigest().encode()
    assert headers["truncated"] == b"true"
    assert headers["mqtt_topic"] == b"devices/d-1/telemetry"
    size = len(out.value) + sum(len(k) + len(v) for k, v in out.headers) + len(out.key)
    assert size < 8 * 1024  # far below any Kafka record limit


def test_a_dead_letter_up_to_the_whole_limit_keeps_the_original_bytes() -> None:
    payload = _huge(DLQ_WHOLE_MAX_BYTES)
    out = dead_letter("devices/d-1/telemetry", "d-1", payload, "oversize", "big", NOW_MS)
    headers = dict(out.headers)
    assert (out.value, out.bounded) == (payload, False)
    assert "truncated" not in headers
    assert headers["original_size"] == str(len(payload)).encode()
    assert headers["sha256"] == hashlib.sha256(payload).hexdigest().encode()


def test_long_topics_and_details_are_bounded_in_headers() -> None:
    topic = "devices/d-1/" + "é" * 40_000
    out = dead_letter(topic, "d-1", b"{}", "bad_topic", "x" * 100_000, NOW_MS)
    headers = dict(out.headers)
    assert len(headers["mqtt_topic"]) <= HEADER_MAX_BYTES
    assert len(headers["detail"]) <= HEADER_MAX_BYTES
    headers["mqtt_topic"].decode("utf-8")  # cut on a character boundary


def test_an_unproducible_message_becomes_a_bounded_dead_letter_of_its_original_bytes() -> None:
    payload = json.dumps({"seq": 1, "ts": 1, "note": "y" * 10_000}).encode()
    out = unproducible(Incoming("devices/d-9/events", payload, NOW_MS), "MSG_SIZE_TOO_LARGE")
    headers = dict(out.headers)
    assert (out.topic, out.key, out.reason, out.bounded) == (
        DLQ_TOPIC,
        b"d-9",
        "unproducible",
        True,
    )
    assert out.value == payload[:DLQ_HEAD_BYTES]
    assert b"MSG_SIZE_TOO_LARGE" in headers["detail"]
    assert headers["sha256"] == hashlib.sha256(payload).hexdigest().encode()


def test_size_errors_are_permanent_and_broker_outages_transient() -> None:
    assert permanent_for_record(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert permanent_for_record(KafkaError(KafkaError.INVALID_RECORD))
    assert not permanent_for_record(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert not permanent_for_record(KafkaError(KafkaError._TRANSPORT))
    assert not permanent_for_record(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))


def test_a_canary_goes_to_the_canary_topic_never_to_a_data_topic() -> None:
    for kind in CODECS:
        payload = canary_payload("bridge-1", 7, NOW_MS - 40)
        out = route_message(f"devices/bridge-1/{kind}", payload, NOW_MS, CODECS)
        assert (out.topic, out.key, out.reason) == (CANARY_TOPIC, b"bridge-1", None)
        assert out.canary_sent_at_ms == NOW_MS - 40


def test_a_malformed_canary_still_counts_as_received_without_a_round_trip() -> None:
    out = route_message("devices/bridge-0/telemetry", b"\xff" * 5000, NOW_MS, CODECS)
    assert (out.topic, out.canary_sent_at_ms) == (CANARY_TOPIC, None)
    assert len(out.value) <= HEADER_MAX_BYTES


def _status(**changes: object) -> dict[str, object]:
    now = 1_000.0
    status: dict[str, object] = {
        "connected": True,
        "subscribed": True,
        "ingest_ok_at": now - 1,
        "written_at": now - 0.5,
        "stale_after_s": STALE_AFTER_S,
    }
    return {**status, **changes}


def test_up_means_connected_subscribed_and_recently_stored() -> None:
    assert ingesting(_status(), 1_000.0)
    assert not ingesting(_status(connected=False), 1_000.0)
    assert not ingesting(_status(subscribed=False), 1_000.0)
    assert not ingesting(_status(ingest_ok_at=1_000.0 - STALE_AFTER_S - 1), 1_000.0)
    assert not ingesting(_status(written_at=1_000.0 - STALE_AFTER_S - 1), 1_000.0)  # wedged
    assert not ingesting({}, 1_000.0)  # nothing reported yet
    assert not ingesting(_status(ingest_ok_at="soon"), 1_000.0)


def test_a_deaf_connection_resubscribes_once_then_gives_up() -> None:
    watch = StallWatch(stale_after_s=10)
    assert watch.check(5, last_arrival=0, connected=True, waiting_on_kafka=False) is Heal.nothing
    assert watch.check(11, 0, True, False) is Heal.resubscribe
    assert watch.check(15, 0, True, False) is Heal.nothing  # giving the resubscribe time
    assert watch.check(22, 0, True, False) is Heal.give_up


def test_a_deaf_connection_that_recovers_starts_over() -> None:
    watch = StallWatch(stale_after_s=10)
    assert watch.check(11, 0, True, False) is Heal.resubscribe
    assert watch.check(12, 11.5, True, False) is Heal.nothing  # a canary came back
    assert watch.check(30, 11.5, True, False) is Heal.resubscribe


def test_silence_while_disconnected_or_waiting_on_kafka_is_not_the_subscriptions_fault() -> None:
    watch = StallWatch(stale_after_s=10)
    assert watch.check(100, 0, connected=False, waiting_on_kafka=False) is Heal.nothing
    assert watch.check(100, 0, connected=True, waiting_on_kafka=True) is Heal.nothing


def test_an_unproducible_dead_letter_is_final_even_when_empty() -> None:
    # Refused again, a bounded record is retried as a fault, never re-bounded in a loop.
    assert unproducible(Incoming("devices/d-1/telemetry", b"", NOW_MS), "INVALID_RECORD").bounded
