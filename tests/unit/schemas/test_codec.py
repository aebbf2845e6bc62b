"""The Avro codec: Confluent wire format, round trips, and decoding that never crashes."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import AvroCodec, Decoded, DecodeError, DecodeReason, load_schema
from schemas.identity import DEVICE_ID_PATTERN

SCHEMA_ID = 7
TELEMETRY = load_schema("Telemetry")
EVENT = load_schema("DeviceEvent")

device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
longs = st.integers(min_value=0, max_value=2**63 - 1)
doubles = st.floats(allow_nan=False)  # NaN != NaN would fail the equality, not the codec
metric = st.none() | doubles


def envelope(**fields: Any) -> Any:
    return st.builds(dict, device_id=device_ids, seq=longs, ts=longs, received_at=longs, **fields)


telemetry_records = envelope(
    temperature=metric,
    humidity=metric,
    battery=metric,
    vibration_rms=metric,
    extra=st.dictionaries(st.text(), doubles, max_size=5),
)
event_records = envelope(
    type=st.sampled_from(["connect", "disconnect", "ota_status", "reboot"]),
    message=st.none() | st.text(),
    attributes=st.dictionaries(st.text(), st.text(), max_size=5),
)


@pytest.mark.parametrize(
    ("schema", "records"),
    [(TELEMETRY, telemetry_records), (EVENT, event_records)],
    ids=["telemetry", "event"],
)
@settings(deadline=None)
@given(data=st.data())
def test_records_round_trip(
    schema: dict[str, Any], records: st.SearchStrategy[dict[str, Any]], data: st.DataObject
) -> None:
    record = data.draw(records)
    codec = AvroCodec(schema, SCHEMA_ID)
    assert codec.decode(codec.encode(record)) == Decoded(SCHEMA_ID, record)


def test_encoding_is_the_confluent_wire_format() -> None:
    record = {"device_id": "d-1", "seq": 1, "ts": 2, "received_at": 3, "type": "reboot"}
    data = AvroCodec(EVENT, 0x01020304).encode(record)
    assert data[:5] == b"\x00\x01\x02\x03\x04"
    assert struct.unpack(">bI", data[:5]) == (0, 0x01020304)


def test_missing_optional_fields_take_their_defaults() -> None:
    codec = AvroCodec(TELEMETRY, SCHEMA_ID)
    decoded = codec.decode(codec.encode({"device_id": "d", "seq": 1, "ts": 2, "received_at": 3}))
    assert isinstance(decoded, Decoded)
    assert decoded.record["temperature"] is None
    assert decoded.record["extra"] == {}


def test_a_misspelt_field_is_refused_on_encode() -> None:
    codec = AvroCodec(TELEMETRY, SCHEMA_ID)
    with pytest.raises(ValueError, match="temprature"):
        codec.encode({"device_id": "d", "seq": 1, "ts": 2, "received_at": 3, "temprature": 1.0})


@settings(deadline=None)
@given(data=st.binary(max_size=64))
def test_garbage_never_crashes_the_decoder(data: bytes) -> None:
    result = AvroCodec(TELEMETRY, SCHEMA_ID).decode(data)
    assert isinstance(result, Decoded | DecodeError)


@settings(deadline=None)
@given(body=st.binary(max_size=64))
def test_a_garbage_body_behind_a_valid_header_never_crashes(body: bytes) -> None:
    result = AvroCodec(EVENT, SCHEMA_ID).decode(b"\x00" + SCHEMA_ID.to_bytes(4, "big") + body)
    assert isinstance(result, Decoded | DecodeError)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00\x00", DecodeReason.too_short),
        (b"\x01\x00\x00\x00\x07\x00", DecodeReason.bad_magic),
        (b"\x00\x00\x00\x00\x08\x00", DecodeReason.unknown_schema_id),
        (b"\x00\x00\x00\x00\x07\x02", DecodeReason.bad_body),
    ],
)
def test_each_decode_failure_has_a_reason(data: bytes, reason: DecodeReason) -> None:
    result = AvroCodec(TELEMETRY, SCHEMA_ID).decode(data)
    assert isinstance(result, DecodeError)
    assert result.reason == reason


def test_trailing_bytes_are_a_bad_body() -> None:
    codec = AvroCodec(TELEMETRY, SCHEMA_ID)
    data = codec.encode({"device_id": "d", "seq": 1, "ts": 2, "received_at": 3}) + b"\x00"
    assert codec.decode(data) == DecodeError(
        DecodeReason.bad_body, "1 bytes after the record (wrong schema id?)"
    )


def test_an_older_writer_schema_is_read_into_the_current_shape() -> None:
    old = {**TELEMETRY, "fields": [f for f in TELEMETRY["fields"] if f["name"] != "extra"]}
    record = {"device_id": "d", "seq": 1, "ts": 2, "received_at": 3, "battery": 0.5}
    data = AvroCodec(old, 3).encode(record)
    decoded = AvroCodec(TELEMETRY, SCHEMA_ID, writer_schemas={3: old}).decode(data)
    assert isinstance(decoded, Decoded)
    assert decoded.schema_id == 3
    assert decoded.record["battery"] == 0.5
    assert decoded.record["extra"] == {}


def test_an_incompatible_writer_schema_is_a_schema_mismatch() -> None:
    data = AvroCodec(EVENT, 3).encode(
        {"device_id": "d", "seq": 1, "ts": 2, "received_at": 3, "type": "reboot"}
    )
    result = AvroCodec(TELEMETRY, SCHEMA_ID, writer_schemas={3: EVENT}).decode(data)
    assert isinstance(result, DecodeError)
    assert result.reason == DecodeReason.schema_mismatch


def test_load_schema_refuses_paths() -> None:
    assert load_schema("Telemetry.avsc")["namespace"] == "io.fleetstream"
    with pytest.raises(ValueError, match="bare file name"):
        load_schema("../codec")
