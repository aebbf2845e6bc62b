"""Faust records for the platform's Avro schemas, derived from the ``.avsc`` files.

Each record class is built from its schema once, at import: one field per Avro field, same
name, a Python type for it and the schema's default. Attribute access by field name
(``event.device_id``, ``alert.severity``); enums are their symbol strings, timestamps their
wire integers (ms since the epoch), as the project's codec reads them.
"""

from __future__ import annotations

import copy
from typing import Any

import faust

from schemas.codec import SCHEMA_DIR, load_schema

_PRIMITIVES: dict[str, Any] = {
    "string": str,
    "long": int,
    "int": int,
    "double": float,
    "float": float,
    "boolean": bool,
    "bytes": bytes,
    "null": type(None),
}


def python_type(avro: Any) -> Any:
    """The Python annotation of an Avro type (nested records are plain dicts)."""
    if isinstance(avro, str):
        return _PRIMITIVES.get(avro, Any)  # a named type referenced by name: left loose
    if isinstance(avro, list):
        branches = [python_type(branch) for branch in avro if branch != "null"]
        inner = branches[0] if len(branches) == 1 else Any
        return inner | None if "null" in avro and inner is not Any else inner
    kind = avro.get("type")
    if kind == "enum":
        return str
    if kind == "map":
        return dict[str, python_type(avro["values"])]  # type: ignore[misc]
    if kind == "array":
        return list[python_type(avro["items"])]  # type: ignore[misc]
    if kind == "record":
        return dict[str, Any]
    if kind == "fixed":
        return bytes
    return python_type(kind)


def record_type(schema_name: str) -> type[faust.Record]:
    """A Faust Record class with the fields of ``schemas/avro/<schema_name>.avsc``."""
    schema = load_schema(schema_name)
    fields = schema["fields"]
    annotations: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    # Faust, like dataclasses, wants fields with a default after those without; the field
    # order does not matter to Avro encoding (by name), so required fields go first.
    for f in sorted(fields, key=lambda f: "default" in f):
        annotations[f["name"]] = python_type(f["type"])
        if "default" in f:
            defaults[f["name"]] = copy.deepcopy(f["default"])
    mutable = {name: v for name, v in defaults.items() if isinstance(v, dict | list)}

    def __post_init__(self: faust.Record) -> None:
        # Faust hands every instance the same default object: give each its own copy.
        for name, default in mutable.items():
            if getattr(self, name) is default:
                setattr(self, name, copy.deepcopy(default))

    namespace = {
        "__annotations__": annotations,
        "__post_init__": __post_init__,
        "__module__": __name__,
        "__qualname__": schema["name"],
        "__doc__": schema.get("doc"),
        **defaults,
    }
    record: type[faust.Record] = type(
        schema["name"],
        (faust.Record,),
        namespace,
        # No "__faust" metadata in the dict handed to the codec: the Avro schema is the type.
        include_metadata=False,
        namespace=f"{schema.get('namespace', 'io.fleetstream')}.{schema['name']}",
    )
    return record


def all_records() -> dict[str, type[faust.Record]]:
    """A record class per ``.avsc`` file, by schema file stem."""
    return {path.stem: record_type(path.stem) for path in sorted(SCHEMA_DIR.glob("*.avsc"))}


Telemetry = record_type("Telemetry")
DeviceEvent = record_type("DeviceEvent")
Alert = record_type("Alert")
TwinState = record_type("TwinState")
Device = record_type("Device")
