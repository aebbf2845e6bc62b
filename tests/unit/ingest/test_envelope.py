"""Envelope checks on what a device sent, before Avro: one test per reject reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import envelope
from ingest.envelope import (
    DEFAULT_TS_WINDOW,
    MAX_PAYLOAD_BYTES,
    MAX_TS_MS,
    Accepted,
    Rejected,
    RejectReason,
    TimestampWindow,
    parse_uplink_topic,
    validate,
    validate_event,
    validate_telemetry,
)
from schemas.codec import AvroCodec, Decoded, load_schema

NOW = 1_700_000_000_123
LOW, HIGH = DEFAULT_TS_WINDOW.bounds(NOW)  # the ts accepted for a message received at NOW


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
        (b'{"seq": 1, "ts": %d, "type": "\\ud800"}' % NOW, RejectReason.wrong_type),
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


# --------------------------------------------------------------------------- fast paths
#
# validate_telemetry takes a straight-line path for the common document and the careful checks
# for everything else, and parses JSON without json.loads' per-call decoder: both must answer
# exactly as the careful checks on json.loads' document do.


def careful_telemetry(device_id: str, body: bytes, received_at_ms: int) -> Accepted | Rejected:
    return envelope._checked(
        "telemetry", device_id, body, received_at_ms, envelope._telemetry_fields
    )


def careful_loads(body: bytes | bytearray) -> Any:
    return json.loads(body, parse_constant=envelope._no_constant)


def outcome(parse: Callable[[], Any]) -> tuple[str, str]:
    """repr of the result, or the exception's type and message (repr tells 1 from 1.0)."""
    try:
        return "ok", repr(parse())
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(2**1020, 2**1030)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
metric_names = st.sampled_from(
    [
        *("temperature", "humidity", "battery", "vibration_rms"),
        *("seq", "ts", "device_id", "received_at"),
        *("rssi", "snr", "\u00e9t\u00e9", "\ud800", ""),
    ]
)
numbers = (
    st.none()
    | st.floats(allow_nan=False)
    | st.integers(-(2**70), 2**70)
    | st.integers(2**1020, 2**1030)
    | st.sampled_from([0, -1, 2**63 - 1, 2**63, envelope.MAX_TS_MS, envelope.MAX_TS_MS + 1])
    | st.sampled_from([LOW - 1, LOW, HIGH, HIGH + 1])  # the ts window's edges
    | st.booleans()
)
any_documents = st.dictionaries(metric_names, numbers | json_values, max_size=8)
common_documents = st.fixed_dictionaries(
    {
        "seq": st.integers(0, 2**63 - 1),
        "ts": st.integers(LOW - 1000, HIGH + 1000) | st.integers(0, envelope.MAX_TS_MS),
    },
    optional={
        name: numbers for name in ["temperature", "humidity", "battery", "vibration_rms", "rssi"]
    },
)
documents = any_documents | common_documents


def dumps(document: dict[str, Any]) -> bytes:
    # allow_nan: json writes inf as Infinity (refused by the parser); 1e400 is also inf.
    text = json.dumps(document).replace("Infinity", "1e400")
    return text.encode("utf-8", "surrogatepass")


@settings(deadline=None, max_examples=500)
@given(document=documents)
def test_the_telemetry_fast_path_answers_as_the_careful_checks(document: dict[str, Any]) -> None:
    body = dumps(document)
    fast = outcome(lambda: validate_telemetry("dev-1", body, NOW))
    assert fast == outcome(lambda: careful_telemetry("dev-1", body, NOW))


@pytest.mark.parametrize(
    "body",
    [
        b'{"seq": 1, "ts": 1700000000118, "temperature": 21, "humidity": null, "rssi": -70}',
        b'{"seq": 1, "ts": 1700000000118, "temperature": 1e400}',
        b'{"seq": 1, "ts": 1700000000118, "rssi": -1e400}',
        b'{"seq": 1, "ts": 1700000000118, "rssi": null}',
        b'{"seq": 1, "ts": 1700000000118, "rssi": true}',
        b'{"seq": 1, "ts": 1700000000118, "\\ud800": 1.0}',
        b'{"seq": 1, "ts": 1700000000118, "\xc3\xa9": 1.0}',
        b'{"seq": 1, "ts": 1700000000118, "battery": ' + str(2**1023).encode() + b"}",
        b'{"seq": 1, "ts": 1700000000118, "battery": ' + str(2**1024).encode() + b"}",
        b'{"seq": 1.0, "ts": 1700000000118}',
        b'{"seq": 1, "ts": 1700000000118, "seq": -1}',
        b'{"seq": 1, "ts": 1700000000118, "device_id": 5, "received_at": "x"}',
    ],
)
def test_edge_documents_answer_as_the_careful_checks(body: bytes) -> None:
    fast = outcome(lambda: validate_telemetry("dev-1", body, NOW))
    assert fast == outcome(lambda: careful_telemetry("dev-1", body, NOW))


def test_the_common_payload_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def careful(document: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("the careful checks ran")

    monkeypatch.setattr(envelope, "_telemetry_fields", careful)
    body = payload(temperature=20.1, humidity=40, battery=None, rssi=-70.5)
    result = validate_telemetry("dev-1", body, NOW)
    assert isinstance(result, Accepted)
    assert result.record["humidity"] == 40.0
    assert type(result.record["humidity"]) is float
    assert result.record["extra"] == {"rssi": -70.5}


@settings(deadline=None, max_examples=500)
@given(
    body=st.binary(max_size=64)
    | documents.map(dumps)
    | st.builds(
        lambda d, pad, enc: (pad[0] + json.dumps(d) + pad[1]).encode(enc),
        st.dictionaries(st.text(max_size=3), json_values, max_size=3),
        st.tuples(st.sampled_from(["", " ", "\n\t"]), st.sampled_from(["", " ", "x", "{}"])),
        st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32-be"]),
    )
)
def test_parsing_answers_as_json_loads(body: bytes) -> None:
    assert outcome(lambda: envelope._loads(body)) == outcome(lambda: careful_loads(body))


@pytest.mark.parametrize(
    "body",
    [b"", b" ", b"{", b"{}", b"{} ", b" {}", b"{}x", b"{\x00", b"[1]", b"NaN", b'{"a": -Infinity}'],
)
def test_parsing_edge_cases_answer_as_json_loads(body: bytes) -> None:
    assert outcome(lambda: envelope._loads(body)) == outcome(lambda: careful_loads(body))
    assert outcome(lambda: envelope._loads(bytearray(body))) == outcome(
        lambda: careful_loads(bytearray(body))
    )


# --------------------------------------------------------------------------- ts window

DAY_MS = 86_400_000
YEAR_9999_MS = 253_370_764_800_000  # 9999-01-01T00:00:00Z
KINDS_AND_BODIES = [
    ("telemetry", {"temperature": 21.5}),
    ("telemetry", {"temperature": "21.5"}),  # the careful path too
    ("events", {"type": "reboot"}),
    ("state/reported", {"reported": {"led": "on"}}),
    ("ota/status", {"status": "succeeded", "version": "2.0.1"}),
]


@pytest.mark.parametrize(("kind", "body"), KINDS_AND_BODIES)
@pytest.mark.parametrize(
    ("ts", "words"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (YEAR_9999_MS, "9999-01-01T00:00:00.000Z"),
        (MAX_TS_MS, "9999-12-31T23:59:59.999Z"),
        (NOW - 30 * DAY_MS - 1, "30.0 days before"),
        (NOW + 5 * 60_000 + 1, "300 s after"),
    ],
)
def test_a_ts_outside_the_window_is_a_bad_timestamp_for_every_kind(
    kind: str, body: dict[str, Any], ts: int, words: str
) -> None:
    result = validate(kind, "dev-1", payload(ts=ts, **body), NOW)
    assert isinstance(result, Rejected)
    assert result.reason == RejectReason.bad_timestamp
    assert words in result.detail
    assert "receive time 2023-11-14T22:13:20.123Z" in result.detail
    assert "accepted: at most 30.0 days before and 300 s after" in result.detail


@pytest.mark.parametrize("kind", ["telemetry", "events", "state/reported", "ota/status"])
@pytest.mark.parametrize(
    "ts",
    [
        NOW - 30 * DAY_MS,  # the oldest accepted: a month-long offline backlog
        NOW - 12 * DAY_MS,
        NOW,
        NOW + 5 * 60_000,  # a clock running 5 minutes fast
    ],
)
def test_a_ts_inside_the_window_is_accepted_for_every_kind(kind: str, ts: int) -> None:
    body = dict(KINDS_AND_BODIES)[kind] if kind != "telemetry" else {"temperature": 1.0}
    result = validate(kind, "dev-1", payload(ts=ts, **body), NOW)
    assert isinstance(result, Accepted)
    assert result.record["ts"] == ts


def test_the_window_is_configurable() -> None:
    window = TimestampWindow(max_age_ms=60_000, max_ahead_ms=0)
    assert window.bounds(NOW) == (NOW - 60_000, NOW)
    for ts, accepted in ((NOW - 60_000, True), (NOW - 60_001, False), (NOW + 1, False)):
        result = validate_telemetry("dev-1", payload(ts=ts, temperature=1.0), NOW, window)
        assert isinstance(result, Accepted) is accepted
    event = validate_event("dev-1", payload(ts=NOW + 1, type="x"), NOW, window)
    assert reason(event) == RejectReason.bad_timestamp
    assert TimestampWindow(10**18, 10**18).bounds(NOW) == (0, MAX_TS_MS)
    with pytest.raises(ValueError, match=">= 0"):
        TimestampWindow(max_age_ms=-1)
