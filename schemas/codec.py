"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

The body is fastavro's schemaless encoding of one record. Schemas live as ``.avsc`` files in
:data:`SCHEMA_DIR` and are registered under the TopicNameStrategy subject ``<topic>-value``
with BACKWARD compatibility, so a reader on the newest schema can read every older version.

Time-like logical types (``timestamp-millis`` and friends) decode to their wire integers
(milliseconds since the epoch), the same values :meth:`AvroCodec.encode` takes and the
warehouse stores: a record survives ``decode(encode(record))`` unchanged.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from fastavro.read import SchemaResolutionError

__all__ = [
    "COMPATIBILITY",
    "MAGIC_BYTE",
    "SCHEMA_DIR",
    "AvroCodec",
    "CodecRegistry",
    "DecodeError",
    "DecodeReason",
    "Decoded",
    "ParsedSchema",
    "load_schema",
    "register_schema",
    "value_subject",
]

SCHEMA_DIR = Path(__file__).resolve().parent / "avro"
MAGIC_BYTE = 0
COMPATIBILITY = "BACKWARD"

_HEADER = struct.Struct(">bI")  # magic byte, schema id
_TIME_BASES = frozenset({"int", "long"})

# What fastavro.parse_schema returns (a dict for records; marked as parsed).
ParsedSchema: TypeAlias = Any


class DecodeReason(StrEnum):
    """Why bytes could not be decoded (the DLQ's ``error`` header names one of these)."""

    too_short = "too_short"
    bad_magic = "bad_magic"
    unknown_schema_id = "unknown_schema_id"
    schema_mismatch = "schema_mismatch"
    bad_body = "bad_body"


@dataclass(frozen=True, slots=True)
class Decoded:
    schema_id: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DecodeError:
    reason: DecodeReason
    detail: str


def load_schema(name: str) -> dict[str, Any]:
    """The JSON of ``SCHEMA_DIR/<name>.avsc`` (``name`` with or without ``.avsc``)."""
    stem = name.removesuffix(".avsc")
    if not stem or Path(stem).name != stem:
        raise ValueError(f"schema name must be a bare file name, got {name!r}")
    schema = json.loads((SCHEMA_DIR / f"{stem}.avsc").read_text(encoding="utf-8"))
    if not isinstance(schema, dict):
        raise ValueError(f"{stem}.avsc: expected a JSON object at the top level")
    return schema


def value_subject(topic: str) -> str:
    """TopicNameStrategy subject for a topic's values."""
    return f"{topic}-value"


def _wire_integers(schema: Any) -> Any:
    """``schema`` without logicalType on int/long types, so they decode as plain integers."""
    if isinstance(schema, list):
        return [_wire_integers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    base = schema.get("type")
    is_time = isinstance(base, str) and base in _TIME_BASES
    return {
        key: _wire_integers(value)
        for key, value in schema.items()
        if not (is_time and key == "logicalType")
    }


def _reading_schema(schema: Mapping[str, Any]) -> ParsedSchema:
    return fastavro.parse_schema(_wire_integers(dict(schema)))


class AvroCodec:
    """Encode/decode one record schema registered under ``schema_id``.

    ``writer_schemas`` maps older registry ids to their schemas (JSON, as in a ``.avsc`` file
    or the registry), so records written with them are read into this schema's shape. It is
    asked with ``.get(id)`` the first time an id is seen (and each time for an id it lacks), so
    a lazy, registry-backed Mapping works; it must return None for an unknown id (an exception
    it raises, such as a network error, is not garbage and propagates).
    """

    def __init__(
        self,
        schema: Mapping[str, Any],
        schema_id: int,
        writer_schemas: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        if not 0 <= schema_id < 2**32:
            raise ValueError(f"schema id must fit in 4 unsigned bytes, got {schema_id}")
        self._schema_id = schema_id
        self._write_schema: ParsedSchema = fastavro.parse_schema(dict(schema))
        self._read_schema: ParsedSchema = _reading_schema(schema)
        self._header = _HEADER.pack(MAGIC_BYTE, schema_id)
        self._lookup = writer_schemas or {}
        self._writers: dict[int, ParsedSchema] = {}  # parsed older writer schemas, by id

    @property
    def schema_id(self) -> int:
        """The registry id this codec writes (its header's 4 bytes)."""
        return self._schema_id

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Confluent wire-format bytes; raises ValueError/TypeError if ``record`` doesn't fit."""
        buffer = io.BytesIO()
        buffer.write(self._header)
        # strict_allow_default: a misspelt or missing field is an error, not a silent default.
        fastavro.schemaless_writer(buffer, self._write_schema, record, strict_allow_default=True)
        return buffer.getvalue()

    def decode(self, data: bytes) -> Decoded | DecodeError:
        """The record in ``data``, or why it is not one; never raises on malformed input."""
        if len(data) < _HEADER.size:
            return DecodeError(DecodeReason.too_short, f"{len(data)} bytes, need at least 5")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            return DecodeError(DecodeReason.bad_magic, f"magic byte {magic}, expected 0")
        writer = self._writer(schema_id)
        if writer is None:
            return DecodeError(DecodeReason.unknown_schema_id, f"schema id {schema_id}")
        return self._body(schema_id, writer, data)

    def _writer(self, schema_id: int) -> ParsedSchema | None:
        if schema_id == self._schema_id:
            return self._read_schema
        parsed = self._writers.get(schema_id)
        if parsed is None:
            raw = self._lookup.get(schema_id)
            if raw is None:
                return None
            parsed = self._writers[schema_id] = _reading_schema(raw)
        return parsed

    def _body(self, schema_id: int, writer: ParsedSchema, data: bytes) -> Decoded | DecodeError:
        reader = None if writer is self._read_schema else self._read_schema
        body = io.BytesIO(data)
        body.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        except SchemaResolutionError as exc:
            return DecodeError(DecodeReason.schema_mismatch, f"schema id {schema_id}: {exc}")
        # Arbitrary bytes make fastavro fail in many ways (EOFError, UnicodeDecodeError,
        # ValueError, IndexError, MemoryError on huge lengths, ...), none of them documented as
        # a closed set; the contract here is "garbage in, DecodeError out", so catch them all.
        except Exception as exc:  # noqa: BLE001
            return DecodeError(DecodeReason.bad_body, f"{type(exc).__name__}: {exc}")
        trailing = len(data) - body.tell()
        if trailing:
            detail = f"{trailing} bytes after the record (wrong schema id?)"
            return DecodeError(DecodeReason.bad_body, detail)
        if not isinstance(record, dict):
            return DecodeError(DecodeReason.bad_body, f"not a record: {type(record).__name__}")
        return Decoded(schema_id, record)


def register_schema(client: SchemaRegistryClient, subject: str, schema: Mapping[str, Any]) -> int:
    """Register ``schema`` under ``subject`` with BACKWARD compatibility; returns its id.

    Idempotent: registering the same schema again returns the same id.
    """
    avro = Schema(json.dumps(schema), "AVRO")
    try:
        client.set_compatibility(subject_name=subject, level=COMPATIBILITY)
    except SchemaRegistryError as exc:
        if exc.http_status_code != 404:
            raise
        # Apicurio's ccompat API keeps compatibility as a rule on an existing artifact, so a new
        # subject has no config to set yet. Its first version needs no check: set it right after.
        schema_id = client.register_schema(subject, avro)
        client.set_compatibility(subject_name=subject, level=COMPATIBILITY)
        return schema_id
    return client.register_schema(subject, avro)


class CodecRegistry:
    """Registers each (subject, schema) once per instance and keeps its :class:`AvroCodec`.

    Make one per process (the bridge, a worker) and ask it for codecs: the registry is
    contacted on first use of a schema, never per message. Thread-safe.
    """

    def __init__(self, client: SchemaRegistryClient) -> None:
        self._client = client
        self._codecs: dict[tuple[str, str], AvroCodec] = {}
        self._lock = threading.Lock()

    def codec(self, topic: str, schema: Mapping[str, Any]) -> AvroCodec:
        """The codec for ``schema`` as the value schema of ``topic`` (subject ``<topic>-value``)."""
        subject = value_subject(topic)
        key = (subject, json.dumps(schema, sort_keys=True))
        with self._lock:  # held while registering: concurrent first uses register once
            codec = self._codecs.get(key)
            if codec is None:
                schema_id = register_schema(self._client, subject, schema)
                codec = self._codecs[key] = AvroCodec(schema, schema_id)
            return codec
