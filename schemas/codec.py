"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

The body is the Avro binary encoding of one record, byte for byte what fastavro's
schemaless_writer writes: each codec compiles its schema into small writer functions for the
common cases and hands fastavro whatever they don't take. Schemas live as ``.avsc`` files in
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
from collections.abc import Callable, Mapping
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


# ---------------------------------------------------------------------------- compiled encoder
#
# fastavro.schemaless_writer pays a large fixed cost per call (option handling, a writer
# object, a generic walk of the schema). The bridge writes millions of small records with a
# handful of schemas, so each AvroCodec compiles its schema once into a tree of closures, each
# turning one Python value into its Avro bytes. A writer accepts only values whose exact Python
# type it knows (``type(v) is float``, not ``isinstance``), in the range fastavro writes them
# the same way; anything else raises, and AvroCodec.encode then hands the whole record to
# fastavro, which writes it or raises its own error. So the compiled writer only ever returns
# what fastavro would have written, and every odd case (a datetime for a timestamp, an int
# for a double, a misspelt field, tuple notation for a union, ...) keeps fastavro's behaviour.

_Writer: TypeAlias = Callable[[Any], bytes]

_NONE = type(None)
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_SMALL_BITS = 13
_SMALL = 1 << _SMALL_BITS
_SMALL_MASK = _SMALL - 1
_HIGH_CACHE_SIZE = 4096


def _varint(n: int) -> bytes:
    """Unsigned LEB128 varint of ``n >= 0``."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zigzag(n: int) -> bytes:
    """Avro int/long: zigzag, then varint."""
    return _varint((n << 1) ^ (n >> 63))


# The encoding of each long in [0, _SMALL) (zigzag of n is 2n), and the first two bytes of any
# long n >= _SMALL: 2n's low 14 bits, both bytes flagged "more follows". The rest of such a long
# is the plain varint of n >> 13, which changes rarely among timestamps, so it is cached.
_SMALL_LONGS = tuple(_zigzag(n) for n in range(_SMALL))
_LOW_LONGS = tuple(bytes([(n << 1) & 0x7F | 0x80, (n >> 6) | 0x80]) for n in range(_SMALL))
_high_longs: dict[int, bytes] = {}


class _Fallback(Exception):
    """Internal: a value the compiled writer does not take; fastavro writes the record."""


class _Unsupported(Exception):
    """Internal: a schema feature the compiler does not handle; fastavro writes every record."""


def _write_long(value: Any) -> bytes:
    if type(value) is not int:
        raise _Fallback
    if 0 <= value < _SMALL:
        return _SMALL_LONGS[value]
    if _SMALL <= value <= _LONG_MAX:
        try:
            return _LOW_LONGS[value & _SMALL_MASK] + _high_longs[value >> _SMALL_BITS]
        except KeyError:
            return _LOW_LONGS[value & _SMALL_MASK] + _high_long(value >> _SMALL_BITS)
    if _LONG_MIN <= value < 0:
        return _zigzag(value)
    raise _Fallback


def _high_long(high: int) -> bytes:
    if len(_high_longs) >= _HIGH_CACHE_SIZE:
        _high_longs.clear()  # bounded; a race with another thread only costs a recomputation
    tail = _high_longs[high] = _varint(high)
    return tail


def _write_int(value: Any) -> bytes:
    if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
        raise _Fallback
    return _SMALL_LONGS[value] if 0 <= value < _SMALL else _zigzag(value)


def _write_length(n: int) -> bytes:
    return _SMALL_LONGS[n] if n < _SMALL else _zigzag(n)


def _blocks(count: int, parts: list[bytes]) -> bytes:
    """An array's or map's ``count`` items (encoded as ``parts``): one block, then the end."""
    return b"".join([_write_length(count), *parts, b"\x00"]) if count else b"\x00"


def _write_string(value: Any) -> bytes:
    if type(value) is not str:
        raise _Fallback
    data = value.encode()  # a lone surrogate raises: fastavro decides
    n = len(data)
    return (_SMALL_LONGS[n] if n < _SMALL else _zigzag(n)) + data


def _write_bytes(value: Any) -> bytes:
    if type(value) is not bytes:
        raise _Fallback
    n = len(value)
    return (_SMALL_LONGS[n] if n < _SMALL else _zigzag(n)) + value


def _write_null(value: Any) -> bytes:
    if value is not None:
        raise _Fallback
    return b""


def _write_boolean(value: Any) -> bytes:
    if value is True:
        return b"\x01"
    if value is False:
        return b"\x00"
    raise _Fallback


def _packer(fmt: str, prefix: bytes = b"") -> _Writer:
    """A float/double writer (``fmt`` 'f' or 'd'), optionally behind a one-byte union index."""
    if prefix:
        pack_indexed = struct.Struct("<B" + fmt).pack
        index = prefix[0]

        def write_indexed(value: Any) -> bytes:
            if type(value) is not float:
                raise _Fallback
            return pack_indexed(index, value)

        return write_indexed
    pack = struct.Struct("<" + fmt).pack

    def write(value: Any) -> bytes:
        if type(value) is not float:
            raise _Fallback
        return pack(value)

    return write


# The exact Python types the compiled writers dispatch unions on, and for each Avro type the
# ones among them that fastavro's union matching (first branch whose validation passes) might
# accept: a union branch is chosen by type only when no other branch could take that type.
_DISPATCHED = (_NONE, bool, int, float, str, bytes, dict, list)
_FASTAVRO_ACCEPTS: dict[str, frozenset[type]] = {
    "null": frozenset({_NONE}),
    "boolean": frozenset({bool}),
    "int": frozenset({int}),
    "long": frozenset({int}),
    "float": frozenset({int, float}),
    "double": frozenset({int, float}),
    "string": frozenset({str}),
    "bytes": frozenset({bytes}),
    "enum": frozenset({str}),
    "fixed": frozenset({bytes}),
    "array": frozenset({list, bytes}),  # bytes is a Sequence (of ints)
    "map": frozenset({dict}),
    "record": frozenset({dict}),
}
# What each compiled writer takes (a subset of the above).
_TAKES: dict[str, type] = {
    "null": _NONE,
    "boolean": bool,
    "int": int,
    "long": int,
    "float": float,
    "double": float,
    "string": str,
    "bytes": bytes,
    "enum": str,
    "fixed": bytes,
    "array": list,
    "map": dict,
    "record": dict,
}
_PRIMITIVES: dict[str, _Writer] = {
    "null": _write_null,
    "boolean": _write_boolean,
    "int": _write_int,
    "long": _write_long,
    "float": _packer("f"),
    "double": _packer("d"),
    "string": _write_string,
    "bytes": _write_bytes,
}
_LOGICAL = frozenset({("long", "timestamp-millis")})  # written as their wire integers


class _Compiler:
    """Compiles one parsed schema into a writer; raises _Unsupported for what it can't."""

    def __init__(self, parsed: ParsedSchema) -> None:
        self._definitions: dict[str, Any] = dict(parsed.get("__named_schemas", {}))
        self._named: dict[str, tuple[str, _Writer]] = {}  # full name -> (avro type, writer)

    def kind(self, schema: Any) -> str:
        """The Avro type of ``schema`` ("union" for a list), named references resolved."""
        if isinstance(schema, list):
            return "union"
        if isinstance(schema, dict):
            logical = schema.get("logicalType")
            if logical is not None and (schema.get("type"), logical) not in _LOGICAL:
                raise _Unsupported(f"logical type {logical}")  # it may take other values
            schema = schema.get("type")
        if not isinstance(schema, str):
            raise _Unsupported(repr(schema))
        if schema in _PRIMITIVES or schema in ("record", "enum", "fixed", "array", "map"):
            return schema
        if schema in self._named:
            return self._named[schema][0]
        definition = self._definitions.get(schema)
        if definition is None:
            raise _Unsupported(schema)
        return self.kind(definition)

    def writer(self, schema: Any) -> _Writer:
        if isinstance(schema, list):
            return self._union(schema)
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _PRIMITIVES[schema]
            return self._reference(schema)
        if not isinstance(schema, dict):
            raise _Unsupported(repr(schema))
        kind = schema.get("type")
        logical = schema.get("logicalType")
        if logical is not None and (kind, logical) not in _LOGICAL:
            raise _Unsupported(f"{kind} {logical}")
        if isinstance(kind, str) and kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        if kind == "record":
            return self._record(schema)
        if kind == "enum":
            return self._enum(schema)
        if kind == "fixed":
            return self._fixed(schema)
        if kind == "array":
            return self._array(self.writer(schema["items"]))
        if kind == "map":
            return self._map(self.writer(schema["values"]))
        if isinstance(kind, list | dict):  # {"type": {...}} or {"type": [...]}
            return self.writer(kind)
        raise _Unsupported(repr(kind))

    def _reference(self, name: str) -> _Writer:
        if name in self._named:
            return self._named[name][1]
        definition = self._definitions.get(name)
        if definition is None:
            raise _Unsupported(name)
        return self.writer(definition)

    def _define(self, schema: dict[str, Any], kind: str) -> list[_Writer]:
        """Register a named type before compiling it, so it may refer to itself."""
        name = schema.get("name")
        if not isinstance(name, str):
            raise _Unsupported(f"{kind} without a name")
        cell: list[_Writer] = []

        def forward(value: Any) -> bytes:
            return cell[0](value)

        self._named[name] = (kind, forward)
        return cell

    def _publish(self, schema: dict[str, Any], kind: str, cell: list[_Writer], w: _Writer) -> None:
        cell.append(w)
        self._named[schema["name"]] = (kind, w)

    def _record(self, schema: dict[str, Any]) -> _Writer:
        cell = self._define(schema, "record")
        fields: list[tuple[str, _Writer, bytes | None]] = []
        for field in schema["fields"]:
            name, field_type = field["name"], field["type"]
            write = self.writer(field_type)
            default: bytes | None = None
            if "default" in field:
                value = field["default"]
                try:
                    if field_type in ("float", "double"):
                        value = float(value)  # as fastavro does for such fields
                    default = write(value)
                except Exception:  # noqa: BLE001 - a default we can't write: fastavro will
                    default = None
            fields.append((name, write, default))
        write = _record_writer(tuple(fields))
        self._publish(schema, "record", cell, write)
        return write

    def _enum(self, schema: dict[str, Any]) -> _Writer:
        cell = self._define(schema, "enum")
        indexes = {symbol: _zigzag(i) for i, symbol in enumerate(schema["symbols"])}
        get = indexes.get

        def write_enum(value: Any) -> bytes:
            data = get(value) if type(value) is str else None
            if data is None:
                raise _Fallback
            return data

        self._publish(schema, "enum", cell, write_enum)
        return write_enum

    def _fixed(self, schema: dict[str, Any]) -> _Writer:
        cell = self._define(schema, "fixed")
        size = schema["size"]

        def write_fixed(value: Any) -> bytes:
            if type(value) is not bytes or len(value) != size:
                raise _Fallback
            return value

        self._publish(schema, "fixed", cell, write_fixed)
        return write_fixed

    @staticmethod
    def _array(write_item: _Writer) -> _Writer:
        def write_array(value: Any) -> bytes:
            if type(value) is not list:
                raise _Fallback
            return _blocks(len(value), [write_item(item) for item in value])

        return write_array

    @staticmethod
    def _map(write_value: _Writer) -> _Writer:
        def write_map(value: Any) -> bytes:
            if type(value) is not dict:
                raise _Fallback
            parts: list[bytes] = []
            for key, item in value.items():
                parts.append(_write_string(key))
                parts.append(write_value(item))
            return _blocks(len(value), parts)

        return write_map

    def _union(self, branches: list[Any]) -> _Writer:
        kinds = [self.kind(branch) for branch in branches]
        if "union" in kinds:
            raise _Unsupported("union in a union")
        dispatch: dict[type, _Writer] = {}
        for python_type in _DISPATCHED:
            takers = [i for i, kind in enumerate(kinds) if python_type in _FASTAVRO_ACCEPTS[kind]]
            if len(takers) == 1 and _TAKES[kinds[takers[0]]] is python_type:
                index = takers[0]
                dispatch[python_type] = self._branch(index, kinds[index], branches[index])
        if len(dispatch) == 2 and _NONE in dispatch:  # ["null", X]: the common optional field
            return _optional(kinds, dispatch)
        get = dispatch.get

        def write_union(value: Any) -> bytes:
            write = get(type(value))
            if write is None:
                raise _Fallback
            return write(value)

        return write_union

    def _branch(self, index: int, kind: str, schema: Any) -> _Writer:
        """The writer of one union branch, its index in front."""
        prefix = _zigzag(index)
        if kind == "null":
            return lambda _value: prefix
        if kind in ("float", "double") and len(prefix) == 1:
            return _packer("f" if kind == "float" else "d", prefix)
        write = self.writer(schema)
        return lambda value: prefix + write(value)


def _optional(kinds: list[str], dispatch: dict[type, _Writer]) -> _Writer:
    """A union of null and one other type: one call instead of two for a float."""
    none = dispatch[_NONE](None)
    (other,) = (python_type for python_type in dispatch if python_type is not _NONE)
    write_other = dispatch[other]
    floats = [i for i, kind in enumerate(kinds) if kind in ("float", "double")]
    if other is float and len(floats) == 1 and floats[0] < 64:  # a one-byte index
        index = floats[0]
        pack = struct.Struct("<Bd" if kinds[index] == "double" else "<Bf").pack

        def write_optional_float(value: Any) -> bytes:
            if value is None:
                return none
            if type(value) is not float:
                raise _Fallback
            return pack(index * 2, value)

        return write_optional_float

    def write_optional(value: Any) -> bytes:
        if value is None:
            return none
        if type(value) is not other:
            raise _Fallback
        return write_other(value)

    return write_optional


def _record_writer(fields: tuple[tuple[str, _Writer, bytes | None], ...]) -> _Writer:
    pairs = tuple((name, write) for name, write, _default in fields)
    count = len(fields)

    def write_record(value: Any) -> bytes:
        if type(value) is not dict:
            raise _Fallback
        try:
            parts = [write(value[name]) for name, write in pairs]
        except KeyError:
            return _with_defaults(value)
        if len(value) != count:  # a field the schema lacks: fastavro's strict error
            raise _Fallback
        return b"".join(parts)

    def _with_defaults(value: dict[str, Any]) -> bytes:
        parts = []
        present = 0
        for name, write, default in fields:
            if name in value:
                parts.append(write(value[name]))
                present += 1
            elif default is None:  # no default (or one fastavro must write): fastavro decides
                raise _Fallback
            else:
                parts.append(default)
        if present != len(value):
            raise _Fallback
        return b"".join(parts)

    return write_record


def _compile(parsed: ParsedSchema) -> _Writer | None:
    """The compiled writer of a parsed schema, or None if it uses what the compiler lacks."""
    try:
        return _Compiler(parsed).writer(parsed)
    except _Unsupported:
        return None


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
        self._compiled = _compile(self._write_schema)  # None: fastavro writes every record
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
        compiled = self._compiled
        if compiled is not None:
            try:
                return self._header + compiled(record)
            # The compiled writer refuses what it doesn't take (_Fallback) and may trip on what
            # fastavro rejects too (a lone surrogate, ...): either way fastavro writes the
            # record or raises its own error, as it always did.
            except Exception:  # noqa: BLE001, S110
                pass
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


def _set_backward(client: SchemaRegistryClient, subject: str) -> bool:
    """Set the subject's compatibility; False if the subject does not exist yet.

    Processes starting together (bridge, workers) race to create the rule: Apicurio answers
    409 "already exists" to the loser, and the rule it finds is the same BACKWARD, so that is
    success too.
    """
    try:
        client.set_compatibility(subject_name=subject, level=COMPATIBILITY)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return False
        if exc.http_status_code != 409:
            raise
    return True


def register_schema(client: SchemaRegistryClient, subject: str, schema: Mapping[str, Any]) -> int:
    """Register ``schema`` under ``subject`` with BACKWARD compatibility; returns its id.

    Idempotent: registering the same schema again returns the same id.
    """
    avro = Schema(json.dumps(schema), "AVRO")
    if _set_backward(client, subject):
        return client.register_schema(subject, avro)
    # Apicurio's ccompat API keeps compatibility as a rule on an existing artifact, so a new
    # subject has no config to set yet. Its first version needs no check: set it right after.
    schema_id = client.register_schema(subject, avro)
    _set_backward(client, subject)
    return schema_id


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
