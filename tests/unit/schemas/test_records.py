"""Flat dataclasses as Avro records: both directions derived from the dataclass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pytest

from schemas.codec import load_schema
from schemas.records import from_avro, to_avro
from streams.ota.artifacts import Artifact
from streams.ota.model import Approval, RolloutDevice
from streams.registry.devices import AuditRecord, DeviceRecord

Colour = StrEnum("Colour", ["red", "blue"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Paint:
    name: str
    colour: Colour
    note: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    coats: int = 1


def test_a_record_round_trips_with_enum_values_and_plain_mappings() -> None:
    paint = Paint(name="p", colour=Colour.blue, note=None, tags={"a": "b"}, coats=2)
    record = to_avro(paint)
    assert record == {"name": "p", "colour": "blue", "note": None, "tags": {"a": "b"}, "coats": 2}
    assert type(record["colour"]) is str
    assert from_avro(Paint, record) == paint
    assert from_avro(Paint, record).colour is Colour.blue


def test_a_field_the_record_lacks_or_nulls_takes_its_default() -> None:
    paint = from_avro(Paint, {"name": "p", "colour": "red", "note": "n", "tags": None})
    assert (paint.tags, paint.coats) == ({}, 1)


def test_a_required_field_missing_or_an_unknown_enum_value_is_refused() -> None:
    with pytest.raises(KeyError):
        from_avro(Paint, {"name": "p", "colour": "red"})
    with pytest.raises(ValueError, match="green"):
        from_avro(Paint, {"name": "p", "colour": "green", "note": None})


def _field_names(schema: Mapping[str, Any], record: str) -> set[str]:
    """The fields of the record type named `record`, wherever the schema defines it."""
    if schema.get("type") == "record" and schema["name"] == record:
        return {f["name"] for f in schema["fields"]}
    for f in schema.get("fields", ()):
        for branch in f["type"] if isinstance(f["type"], list) else [f["type"]]:
            nested = branch.get("items", branch) if isinstance(branch, dict) else None
            if isinstance(nested, dict) and (found := _field_names(nested, record)):
                return found
    return set()


@pytest.mark.parametrize(
    ("cls", "schema", "record"),
    [
        (DeviceRecord, "Device", "Device"),
        (AuditRecord, "AuditRecord", "AuditRecord"),
        (Artifact, "OtaArtifact", "OtaArtifact"),
        (Approval, "Rollout", "RolloutApproval"),
        (RolloutDevice, "Rollout", "RolloutDevice"),
    ],
)
def test_the_platform_records_mirror_their_avro_schemas(
    cls: type, schema: str, record: str
) -> None:
    fields = {f for f in cls.__dataclass_fields__}
    assert fields == _field_names(load_schema(schema), record)
