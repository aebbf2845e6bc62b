"""Device twins: the pure core (no Kafka, no Faust), after AWS IoT Device Shadow and Azure IoT
Hub device twins.

A :class:`Twin` holds a ``desired`` and a ``reported`` JSON document, per-key timestamps for
both, a ``version`` and the sequence number of the last reported update it accepted.

- **Merge.** A patch is merged into a document key by key; nested objects merge recursively;
  any other value (string, number, bool, list) replaces the old one whole; a ``null`` removes
  the key (as in AWS shadows). An object left empty by removals is dropped, and a patch object
  with nothing to set changes nothing.
- **Version.** Grows by exactly one per accepted update that changes a document. An update
  that changes nothing (every value already there) is accepted but keeps the version, the
  metadata and ``updated_at``, so replaying an update is harmless.
- **Optimistic concurrency.** :func:`apply_desired` with ``expected_version`` refuses
  (:class:`Conflict`, an HTTP 409) unless it equals the twin's version; ``None`` skips the check.
- **Ordering.** :func:`apply_reported` ignores an update whose ``seq`` is not greater than the
  last accepted one (:class:`Ignored`): a device's messages may arrive interleaved across bridge
  replicas or replayed, and an older report must never regress the twin. ``last_reported_seq``
  only grows; it advances even when the newer report changes nothing.
- **Delta.** :func:`delta` is the part of ``desired`` that ``reported`` does not match: keys
  missing from reported or with another value, nested objects compared key by key (so the delta
  of an object holds only its differing keys), lists and scalars compared whole. JSON equality:
  ``1 == 1.0``, but ``true`` is not ``1``.
- **Metadata.** ``desired_metadata`` / ``reported_metadata`` mirror their document: a leaf's
  entry is the time (ms since the epoch) it was last changed, an object's entry is an object.
- **Limits** (AWS shadow limits): each document, and each patch, at most
  :data:`MAX_DOCUMENT_BYTES` of compact UTF-8 JSON and :data:`MAX_DEPTH` levels of nesting
  (``{"a": 1}`` is depth 1); keys are non-empty strings; numbers are finite. A patch that breaks
  a limit raises :class:`TwinDocumentError` (an HTTP 400, or a dead letter), whose ``reason``
  is one of ``invalid``, ``too_large``, ``too_deep``.

The twin's documents are shared between successive twins (structural sharing): treat them as
read-only. :func:`twin_view` returns fresh copies.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "TWIN_STATE_SCHEMA",
    "Accepted",
    "Conflict",
    "DesiredResult",
    "Ignored",
    "ReportedResult",
    "Twin",
    "TwinDocumentError",
    "apply_desired",
    "apply_reported",
    "delta",
    "document_size",
    "from_record",
    "to_record",
    "twin_view",
]

MAX_DOCUMENT_BYTES = 8 * 1024
MAX_DEPTH = 6
TWIN_STATE_SCHEMA = "TwinState"  # schemas/avro/TwinState.avsc, value of topic `twin.state`


class TwinDocumentError(ValueError):
    """A patch or document the twin refuses; ``reason`` is invalid, too_large or too_deep."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Twin:
    """One device's twin. Immutable: the apply functions return new twins."""

    device_id: str
    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    desired_metadata: dict[str, Any] = field(default_factory=dict)
    reported_metadata: dict[str, Any] = field(default_factory=dict)
    last_reported_seq: int = -1  # -1: nothing reported yet
    updated_at: int = 0  # ms since the epoch of the last change (0: never changed)


@dataclass(frozen=True)
class Accepted:
    """The update was accepted; ``changed`` is False when it changed no document."""

    twin: Twin
    changed: bool


@dataclass(frozen=True)
class Conflict:
    """A desired update named a stale version (HTTP 409); nothing changed."""

    current_version: int
    expected_version: int


@dataclass(frozen=True)
class Ignored:
    """A reported update older than (or as old as) the twin's; nothing changed."""

    reason: str


DesiredResult = Accepted | Conflict
ReportedResult = Accepted | Ignored


# ---------------------------------------------------------------------------- JSON documents


def _encode(document: Mapping[str, Any]) -> str:
    return json.dumps(
        document, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    )


def document_size(document: Mapping[str, Any]) -> int:
    """Bytes of ``document`` as compact UTF-8 JSON (what the size limit counts)."""
    return len(_encode(document).encode("utf-8"))


def _check_value(value: Any, depth: int, path: str) -> None:
    """Raise TwinDocumentError unless ``value`` is JSON within the depth limit."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TwinDocumentError("invalid", f"{path}: numbers must be finite, got {value}")
        return
    if isinstance(value, dict | list):
        if depth + 1 > MAX_DEPTH:
            raise TwinDocumentError("too_deep", f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check_value(item, depth + 1, f"{path}[{i}]")
            return
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise TwinDocumentError("invalid", f"{path}: keys must be non-empty strings")
            _check_value(item, depth + 1, f"{path}.{key}")
        return
    raise TwinDocumentError("invalid", f"{path}: not a JSON value ({type(value).__name__})")


def _check_document(document: Any, what: str) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise TwinDocumentError("invalid", f"{what} must be a JSON object")
    _check_value(document, 0, what)
    size = document_size(document)
    if size > MAX_DOCUMENT_BYTES:
        raise TwinDocumentError(
            "too_large", f"{what} is {size} bytes, the limit is {MAX_DOCUMENT_BYTES}"
        )
    return document


def _same(a: Any, b: Any) -> bool:
    """JSON equality: bool is not a number, 1 == 1.0, objects and lists compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


def _merge(
    document: Mapping[str, Any], metadata: Mapping[str, Any], patch: Mapping[str, Any], now: int
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """``document`` with ``patch`` merged in, its metadata, and whether anything changed."""
    out = dict(document)
    meta = dict(metadata)
    changed = False
    for key, value in patch.items():
        old = out.get(key)
        if value is None:
            if key in out:
                del out[key]
                meta.pop(key, None)
                changed = True
        elif isinstance(value, dict):
            was_object = isinstance(old, dict)
            old_meta = meta.get(key)
            base = old if isinstance(old, dict) else {}
            base_meta = old_meta if was_object and isinstance(old_meta, dict) else {}
            sub, sub_meta, sub_changed = _merge(base, base_meta, value, now)
            if not sub:
                if was_object:  # emptied by removals: drop it
                    del out[key]
                    meta.pop(key, None)
                    changed = True
                # else: an object with nothing to set changes nothing
            elif sub_changed or not was_object:
                out[key] = sub
                meta[key] = sub_meta
                changed = True
        elif key not in out or not _same(old, value):
            out[key] = copy.deepcopy(value)
            meta[key] = now
            changed = True
    return out, meta, changed


def delta(twin: Twin) -> dict[str, Any]:
    """The desired keys whose value differs from reported (nested objects key by key)."""
    return _delta(twin.desired, twin.reported)


def _delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, want in desired.items():
        if key not in reported:
            out[key] = copy.deepcopy(want)
            continue
        have = reported[key]
        if isinstance(want, dict) and isinstance(have, dict):
            sub = _delta(want, have)
            if sub:
                out[key] = sub
        elif not _same(want, have):
            out[key] = copy.deepcopy(want)
    return out


# ---------------------------------------------------------------------------- updates


def apply_desired(
    twin: Twin, patch: Mapping[str, Any], expected_version: int | None, now_ms: int
) -> DesiredResult:
    """Merge ``patch`` into ``desired`` unless ``expected_version`` is stale.

    Raises :class:`TwinDocumentError` for a patch, or a resulting document, over the limits.
    """
    _check_document(patch, "desired patch")
    if expected_version is not None and expected_version != twin.version:
        return Conflict(current_version=twin.version, expected_version=expected_version)
    desired, meta, changed = _merge(twin.desired, twin.desired_metadata, patch, now_ms)
    if not changed:
        return Accepted(twin, changed=False)
    _check_document(desired, "desired")
    return Accepted(
        Twin(
            device_id=twin.device_id,
            desired=desired,
            reported=twin.reported,
            version=twin.version + 1,
            desired_metadata=meta,
            reported_metadata=twin.reported_metadata,
            last_reported_seq=twin.last_reported_seq,
            updated_at=now_ms,
        ),
        changed=True,
    )


def apply_reported(twin: Twin, patch: Mapping[str, Any], seq: int, now_ms: int) -> ReportedResult:
    """Merge ``patch`` into ``reported`` if ``seq`` is newer than the last accepted report.

    Raises :class:`TwinDocumentError` for a patch, or a resulting document, over the limits.
    """
    _check_document(patch, "reported patch")
    if seq <= twin.last_reported_seq:
        return Ignored(f"stale: seq {seq} <= last reported seq {twin.last_reported_seq}")
    reported, meta, changed = _merge(twin.reported, twin.reported_metadata, patch, now_ms)
    if changed:
        _check_document(reported, "reported")
    return Accepted(
        Twin(
            device_id=twin.device_id,
            desired=twin.desired,
            reported=reported if changed else twin.reported,
            version=twin.version + 1 if changed else twin.version,
            desired_metadata=twin.desired_metadata,
            reported_metadata=meta if changed else twin.reported_metadata,
            last_reported_seq=seq,
            updated_at=now_ms if changed else twin.updated_at,
        ),
        changed=changed,
    )


# ---------------------------------------------------------------------------- views and records


def twin_view(twin: Twin) -> dict[str, Any]:
    """What ``fleet twin get <id> --json`` prints: desired, reported, delta, version."""
    return {
        "desired": copy.deepcopy(twin.desired),
        "reported": copy.deepcopy(twin.reported),
        "delta": delta(twin),
        "version": twin.version,
    }


def to_record(twin: Twin) -> dict[str, Any]:
    """The Avro ``TwinState`` record (documents and metadata as compact JSON strings)."""
    return {
        "device_id": twin.device_id,
        "version": twin.version,
        "desired": _encode(twin.desired),
        "reported": _encode(twin.reported),
        "desired_metadata": _encode(twin.desired_metadata),
        "reported_metadata": _encode(twin.reported_metadata),
        "last_reported_seq": twin.last_reported_seq,
        "updated_at": twin.updated_at,
    }


def _object(text: Any, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise TwinDocumentError("invalid", f"{what}: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise TwinDocumentError("invalid", f"{what} must be a JSON object")
    return value


def from_record(record: Mapping[str, Any]) -> Twin:
    """The twin in an Avro ``TwinState`` record; raises TwinDocumentError if it is malformed."""
    return Twin(
        device_id=str(record["device_id"]),
        desired=_object(record.get("desired", "{}"), "desired"),
        reported=_object(record.get("reported", "{}"), "reported"),
        version=int(record["version"]),
        desired_metadata=_object(record.get("desired_metadata", "{}"), "desired_metadata"),
        reported_metadata=_object(record.get("reported_metadata", "{}"), "reported_metadata"),
        last_reported_seq=int(record.get("last_reported_seq", -1)),
        updated_at=int(record.get("updated_at", 0)),
    )
