"""The compiled Avro writer: the same bytes as fastavro, or fastavro itself when it can't."""

from __future__ import annotations

import datetime
import io
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import SCHEMA_DIR, AvroCodec, Decoded, load_schema
from schemas.codec import _compile as compile_writer
from schemas.identity import DEVICE_ID_PATTERN

SCHEMA_ID = 11
TELEMETRY = load_schema("Telemetry")
EVENT = load_schema("DeviceEvent")
DOWNLINK = load_schema("Downlink")

# Every type the compiler handles, nested: named references, a recursive record, unions that
# are chosen by type and unions that are not ("long" and "double" both take an int).
EVERYTHING: dict[str, Any] = {
    "type": "record",
    "name": "Everything",
    "namespace": "test",
    "fields": [
        {"name": "flag", "type": "boolean"},
        {"name": "small", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "single", "type": "float"},
        {"name": "double", "type": "double"},
        {"name": "raw", "type": "bytes"},
        {"name": "text", "type": {"type": "string"}},
        {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "colour", "type": {"type": "enum", "name": "Colour", "symbols": ["R", "G", "B"]}},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "other_colour", "type": ["null", "Colour"], "default": None},
        {"name": "numbers", "type": {"type": "array", "items": "long"}},
        {"name": "scores", "type": {"type": "map", "values": ["null", "float"]}},
        {"name": "choice", "type": ["null", "string", "long", "boolean", "bytes"]},
        {"name": "number", "type": ["null", "long", "double"], "default": None},
        {
            "name": "chain",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Link",
                    "fields": [
                        {"name": "value", "type": "int"},
                        {"name": "next", "type": ["null", "Link"], "default": None},
                    ],
                },
            ],
        },
        {"name": "links", "type": {"type": "array", "items": "Link"}, "default": []},
        {"name": "note", "type": "string", "default": "none"},
    ],
}

device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
longs = st.integers(-(2**63), 2**63 - 1)
ints = st.integers(-(2**31), 2**31 - 1)
doubles = st.floats(allow_nan=False)  # NaN != NaN would fail the round trip, not the codec
singles = st.floats(allow_nan=False, width=32)
optional_double = st.none() | doubles
texts = st.text()


def envelope(**fields: Any) -> st.SearchStrategy[dict[str, Any]]:
    # Any long, not only what the bridge accepts: negative and multi-byte varints too.
    return st.fixed_dictionaries(
        {"device_id": device_ids, "seq": longs, "ts": longs, "received_at": longs, **fields}
    )


telemetry_records = envelope(
    temperature=optional_double,
    humidity=optional_double,
    battery=optional_double,
    vibration_rms=optional_double,
    extra=st.dictionaries(texts, doubles, max_size=5),
)
event_records = envelope(
    type=texts,
    message=st.none() | texts,
    attributes=st.dictionaries(texts, texts, max_size=5),
)
downlink_records = st.fixed_dictionaries(
    {"topic": texts, "payload": st.binary(), "qos": ints, "command_id": st.none() | texts}
)
links: st.SearchStrategy[dict[str, Any]] = st.deferred(
    lambda: st.fixed_dictionaries({"value": ints, "next": st.none() | links}),
)
everything_records = st.fixed_dictionaries(
    {
        "flag": st.booleans(),
        "small": ints,
        "big": longs,
        "single": singles,
        "double": doubles,
        "raw": st.binary(max_size=300),
        "text": st.text(max_size=300),
        "when": longs,
        "colour": st.sampled_from(["R", "G", "B"]),
        "digest": st.binary(min_size=4, max_size=4),
        "numbers": st.lists(longs, max_size=5),
        "scores": st.dictionaries(texts, st.none() | singles, max_size=4),
        "choice": st.none() | texts | longs | st.booleans() | st.binary(),
        "chain": st.none() | links,
    },
    optional={
        "other_colour": st.none() | st.sampled_from(["R", "G", "B"]),
        "number": st.none() | longs | doubles,
        "links": st.lists(links, max_size=3),
        "note": texts,
    },
)


def fastavro_bytes(schema: dict[str, Any], record: Any) -> bytes:
    buffer = io.BytesIO()
    parsed = fastavro.parse_schema(schema)
    fastavro.schemaless_writer(buffer, parsed, record, strict_allow_default=True)
    return buffer.getvalue()


def compiled(schema: dict[str, Any]) -> Callable[[Any], bytes]:
    writer = compile_writer(fastavro.parse_schema(schema))
    assert writer is not None, "the schema should compile"
    return writer


def check(schema: dict[str, Any], record: dict[str, Any]) -> None:
    """The compiled writer takes ``record`` itself (no fallback) and matches fastavro."""
    body = fastavro_bytes(schema, record)
    assert compiled(schema)(record) == body
    codec = AvroCodec(schema, SCHEMA_ID)
    assert codec.encode(record) == b"\x00" + SCHEMA_ID.to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("schema", "records"),
    [(TELEMETRY, telemetry_records), (EVENT, event_records), (DOWNLINK, downlink_records)],
    ids=["telemetry", "event", "downlink"],
)
@settings(deadline=None)
@given(data=st.data())
def test_platform_records_match_fastavro_and_round_trip(
    schema: dict[str, Any], records: st.SearchStrategy[dict[str, Any]], data: st.DataObject
) -> None:
    record = data.draw(records)
    check(schema, record)
    codec = AvroCodec(schema, SCHEMA_ID)
    assert codec.decode(codec.encode(record)) == Decoded(SCHEMA_ID, record)


@settings(deadline=None)
@given(record=everything_records)
def test_every_compiled_type_matches_fastavro(record: dict[str, Any]) -> None:
    # Ints in the "number" union are fastavro's call (its "long" or "double" could take them):
    # the codec hands those records over, and its bytes are still fastavro's.
    body = fastavro_bytes(EVERYTHING, record)
    codec = AvroCodec(EVERYTHING, SCHEMA_ID)
    assert codec.encode(record)[5:] == body
    if type(record.get("number")) is not int:
        assert compiled(EVERYTHING)(record) == body


def records_of(
    schema: Any, named: dict[str, st.SearchStrategy[Any]] | None = None
) -> st.SearchStrategy[Any]:
    """Values of a parsed schema, for any schema the project ships (and nested ones)."""
    named = {} if named is None else named
    if isinstance(schema, list):
        return st.one_of([records_of(branch, named) for branch in schema])
    if isinstance(schema, str):
        if schema in named:
            return st.deferred(lambda: named[schema])
        return PRIMITIVE_VALUES[schema]
    kind = schema["type"]
    if kind == "record":
        fields: dict[str, st.SearchStrategy[Any]] = {}
        optional: dict[str, st.SearchStrategy[Any]] = {}
        named[schema["name"]] = st.fixed_dictionaries(fields, optional=optional)
        for field in schema["fields"]:
            target = optional if "default" in field else fields
            target[field["name"]] = records_of(field["type"], named)
        return named[schema["name"]]
    if kind == "enum":
        named[schema["name"]] = st.sampled_from(schema["symbols"])
        return named[schema["name"]]
    if kind == "fixed":
        named[schema["name"]] = st.binary(min_size=schema["size"], max_size=schema["size"])
        return named[schema["name"]]
    if kind == "array":
        return st.lists(records_of(schema["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(texts, records_of(schema["values"], named), max_size=3)
    return records_of(kind, named)  # a primitive as {"type": ...}, logical types included


PRIMITIVE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": ints,
    "long": longs,
    "float": singles,
    "double": doubles,
    "string": texts,
    "bytes": st.binary(),
}
SHIPPED = sorted(path.stem for path in SCHEMA_DIR.glob("*.avsc"))


@pytest.mark.parametrize("name", SHIPPED)
@settings(deadline=None, max_examples=50)
@given(data=st.data())
def test_every_shipped_schema_compiles_and_matches_fastavro(name: str, data: st.DataObject) -> None:
    # A schema the compiler lacks a feature of is fastavro's: still right, only slower.
    schema = load_schema(name)
    parsed = fastavro.parse_schema(schema)
    record = data.draw(records_of(parsed))
    body = fastavro_bytes(schema, record)
    assert AvroCodec(schema, SCHEMA_ID).encode(record)[5:] == body
    writer = compile_writer(parsed)
    if writer is not None:
        assert writer(record) == body


@pytest.mark.parametrize("length", [0, 1, 63, 64, 8191, 8192, 2**20], ids=lambda n: f"{n}-bytes")
def test_length_prefixes_of_every_size(length: int) -> None:
    record = {"topic": "t" * length, "payload": b"\x00" * length, "qos": length}
    check(DOWNLINK, record)


@pytest.mark.parametrize(
    "value",
    [0, 1, -1, 63, -64, 64, 8191, 8192, 2**20, 1_700_000_000_000, 2**62, 2**63 - 1, -(2**63)],
)
def test_longs_at_varint_boundaries(value: int) -> None:
    check(TELEMETRY, {"device_id": "d", "seq": value, "ts": value, "received_at": value})


def test_many_timestamps_keep_their_high_bytes_right() -> None:
    # The high bytes of longs are cached; more distinct ones than the cache holds.
    writer = compiled(TELEMETRY)
    for i in range(10_000):
        record = {"device_id": "d", "seq": i, "ts": i * 2**20 + 5, "received_at": i << 40}
        assert writer(record) == fastavro_bytes(TELEMETRY, record)


RECORD = {"device_id": "d-1", "seq": 5, "ts": 1_700_000_000_000, "received_at": 1_700_000_000_001}


@pytest.mark.parametrize(
    "record",
    [
        {**RECORD, "temperature": 20},  # an int for a double: fastavro writes 20.0
        {**RECORD, "extra": {"rssi": -70}},
        {**RECORD, "ts": datetime.datetime(2023, 11, 14, tzinfo=datetime.UTC)},
        {**RECORD, "temperature": ("double", 1.5)},  # fastavro's tuple notation for unions
    ],
    ids=["int-for-double", "int-in-map", "datetime", "tuple-notation"],
)
def test_what_the_compiled_writer_does_not_take_fastavro_writes(record: dict[str, Any]) -> None:
    codec = AvroCodec(TELEMETRY, SCHEMA_ID)
    assert codec.encode(record)[5:] == fastavro_bytes(TELEMETRY, record)


def outcome(write: Callable[[], bytes]) -> tuple[str, object]:
    """The Avro body written, or the exception raised (type and message)."""
    try:
        return "written", write()
    except Exception as exc:  # noqa: BLE001 - compared with fastavro's, whatever it is
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize(
    "record",
    [
        {**RECORD, "temprature": 1.0},
        {"device_id": "d-1", "seq": 5, "ts": 1},
        {**RECORD, "seq": 2**63},
        {**RECORD, "seq": True},
        {**RECORD, "seq": None},
        {**RECORD, "seq": 1.5},
        {**RECORD, "device_id": "\ud800"},
        {**RECORD, "device_id": b"d-1"},
        {**RECORD, "temperature": "hot"},
        {**RECORD, "temperature": True},
        {**RECORD, "extra": {1: 1.0}},
        {**RECORD, "extra": {"x": None}},
        {**RECORD, "extra": [1.0]},
        tuple(RECORD.items()),
    ],
)
def test_odd_values_get_what_fastavro_does_with_them(record: Any) -> None:
    codec = AvroCodec(TELEMETRY, SCHEMA_ID)
    ours = outcome(lambda: codec.encode(record)[5:])
    assert ours == outcome(lambda: fastavro_bytes(TELEMETRY, record))


def test_a_misspelt_or_missing_field_is_still_a_value_error() -> None:
    codec = AvroCodec(TELEMETRY, SCHEMA_ID)
    with pytest.raises(ValueError, match="temprature"):
        codec.encode({**RECORD, "temprature": 1.0})
    with pytest.raises(ValueError, match="received_at"):
        codec.encode({"device_id": "d-1", "seq": 5, "ts": 1})


@pytest.mark.parametrize(
    "field_type",
    [
        {"type": "string", "logicalType": "uuid"},
        {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2},
        ["null", {"type": "int", "logicalType": "date"}],
        ["null", ["null", "int"]],
    ],
)
def test_a_schema_the_compiler_lacks_is_left_to_fastavro(field_type: Any) -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "x", "type": field_type}]}
    assert compile_writer(fastavro.parse_schema(schema)) is None
    if isinstance(field_type, dict) and field_type["type"] == "string":
        codec = AvroCodec(schema, SCHEMA_ID)
        record = {"x": "8e6f7b5e-3b1f-4c53-9d7a-2f4a6a0b8c11"}
        assert codec.encode(record)[5:] == fastavro_bytes(schema, record)


def test_the_bridge_record_takes_the_compiled_path() -> None:
    record = {**RECORD, "temperature": 20.1, "humidity": None, "battery": 90.0, "extra": {}}
    record["vibration_rms"] = 0.8
    assert compiled(TELEMETRY)(record) == fastavro_bytes(TELEMETRY, record)
