"""The jobs' Faust codec: Confluent wire format, the project's Avro codec, cached schema ids."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema

from schemas.codec import AvroCodec, CodecRegistry, load_schema
from streams.jobs.codec import ConfluentAvroCodec, RegistrySchemas
from streams.jobs.records import Alert, Telemetry


@dataclass
class MemoryRegistry:
    """The calls CodecRegistry and RegistrySchemas make, counted; ids from 1 in order."""

    schemas: dict[int, str] = field(default_factory=dict)
    registrations: int = 0
    lookups: int = 0

    def set_compatibility(self, subject_name: str, level: str) -> None:
        pass

    def register_schema(self, subject: str, schema: Schema) -> int:
        self.registrations += 1
        for schema_id, text in self.schemas.items():
            if text == schema.schema_str:
                return schema_id
        schema_id = len(self.schemas) + 1
        self.schemas[schema_id] = schema.schema_str or ""
        return schema_id

    def get_schema(self, schema_id: int) -> Schema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        self.lookups += 1
        if schema_id not in self.schemas:
            raise SchemaRegistryError(404, 40403, "not found")
        return Schema(self.schemas[schema_id], "AVRO")


def _codec(registry: MemoryRegistry, topic: str, schema: str) -> ConfluentAvroCodec:
    client: Any = registry
    return ConfluentAvroCodec(topic, schema, CodecRegistry(client), RegistrySchemas(client))


READING = Telemetry(
    device_id="dev-1",
    seq=7,
    ts=1_700_000_000_000,
    received_at=1_700_000_000_100,
    temperature=21.5,
    extra={"co2": 412.0},
)


def test_encodes_the_confluent_wire_format_with_the_registry_id() -> None:
    registry = MemoryRegistry()
    registry.register_schema("other-value", Schema(json.dumps({"type": "string"}), "AVRO"))
    codec = _codec(registry, "telemetry.raw", "Telemetry")
    data = codec.dumps(READING.to_representation())
    magic, schema_id = struct.unpack(">bI", data[:5])
    assert (magic, schema_id) == (0, 2)
    # Byte for byte what the platform's own codec writes (the bridge's records).
    expected = AvroCodec(load_schema("Telemetry"), 2).encode(READING.to_representation())
    assert data == expected


def test_round_trip_gives_the_record_back() -> None:
    codec = _codec(MemoryRegistry(), "telemetry.raw", "Telemetry")
    back = Telemetry.from_data(codec.loads(codec.dumps(READING.to_representation())))
    assert back == READING
    assert back.extra == {"co2": 412.0}


def test_the_schema_is_registered_once_not_per_message() -> None:
    registry = MemoryRegistry()
    codec = _codec(registry, "alerts", "Alert")
    alert = Alert(
        alert_id="a1",
        device_id="d",
        rule_id="r",
        status="raised",
        metric="temperature",
        threshold=30.0,
        severity="critical",
        seq=3,
        ts=0,
        value=31.0,
    )
    for _ in range(50):
        codec.loads(codec.dumps(alert.to_representation()))
    assert registry.registrations == 1
    assert registry.lookups == 0  # its own id needs no lookup


def test_records_of_an_older_schema_version_are_read_into_the_current_shape() -> None:
    registry = MemoryRegistry()
    old = load_schema("Telemetry")
    old["fields"] = [f for f in old["fields"] if f["name"] != "extra"]
    old_id = registry.register_schema("telemetry.raw-value", Schema(json.dumps(old), "AVRO"))
    written = AvroCodec(old, old_id).encode(
        {
            "device_id": "d",
            "seq": 1,
            "ts": 5,
            "received_at": 6,
            "temperature": None,
            "humidity": 40.0,
            "battery": None,
            "vibration_rms": None,
        }
    )
    codec = _codec(registry, "telemetry.raw", "Telemetry")
    for _ in range(3):
        record = Telemetry.from_data(codec.loads(written))
        assert (record.humidity, record.extra) == (40.0, {})
    assert registry.lookups == 1  # the older id's schema is fetched once, then cached


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00", "too_short"),
        (b"\x01\x00\x00\x00\x01abc", "bad_magic"),
        (b"\x00\x00\x00\x00\x63abc", "unknown_schema_id"),
    ],
)
def test_bytes_that_are_not_a_record_raise_with_the_reason(data: bytes, reason: str) -> None:
    codec = _codec(MemoryRegistry(), "telemetry.raw", "Telemetry")
    with pytest.raises(ValueError, match=reason):
        codec.loads(data)


def test_what_is_not_a_record_is_refused_on_encode() -> None:
    codec = _codec(MemoryRegistry(), "telemetry.raw", "Telemetry")
    with pytest.raises(TypeError):
        codec.dumps(["not", "a", "record"])
    with pytest.raises(ValueError, match="device_id"):
        codec.dumps({"seq": 1})
