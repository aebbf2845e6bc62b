"""What a device sent, checked before Avro: pure functions, no I/O.

A device publishes JSON on ``devices/<id>/<kind>``. The device id is the topic's (the broker
ACL ties it to the certificate CN); a ``device_id`` or ``received_at`` in the payload is
ignored. Every message carries the envelope ``seq`` (integer, 0..2**63-1, only grows) and
``ts`` (integer milliseconds since the epoch, device time). The result is either
:class:`Accepted`, whose ``record`` matches the Avro schema of its kind (``Telemetry`` or
``DeviceEvent``), or :class:`Rejected` with a reason for the dead-letter topic.

Rules beyond the types: JSON ``NaN``/``Infinity`` and numbers beyond a double's range are
refused; strings must be valid Unicode (no lone surrogates, which Avro could not encode); a
present but invalid ``seq``/``ts`` is ``bad_seq``/``bad_timestamp`` whatever its type; an
optional field may be ``null``; an event field other than ``type``, ``message`` and
``attributes`` is refused (``wrong_type``: free-form values belong in ``attributes``).

``ts`` must also lie in a :class:`TimestampWindow` around the bridge's receive time, for every
kind: the warehouse partitions telemetry, events, twin history and OTA events by month of the
device's time, so a clock at 1970 or 9999 would otherwise create a partition per bad clock.
The default reaches 30 days back, so a device replaying the backlog it kept while offline for
weeks is still accepted, and 5 minutes ahead, for clocks that run a little fast. What falls
outside is ``bad_timestamp``, kept in the dead-letter topic like any reject (it can be replayed
once a window fits).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

from schemas.identity import DEVICE_ID_PATTERN

__all__ = [
    "DEFAULT_TS_WINDOW",
    "EVENTS",
    "MAX_PAYLOAD_BYTES",
    "MAX_SEQ",
    "MAX_TS_MS",
    "METRICS",
    "TELEMETRY",
    "Accepted",
    "RejectReason",
    "Rejected",
    "TimestampWindow",
    "parse_uplink_topic",
    "validate",
    "validate_event",
    "validate_telemetry",
]

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_SEQ = 2**63 - 1
# 9999-12-31T23:59:59.999Z: the last instant a Python datetime holds, so any consumer that
# decodes timestamp-millis into datetimes can read every accepted record.
MAX_TS_MS = 253_402_300_799_999

TELEMETRY = "telemetry"
EVENTS = "events"
STATE_REPORTED = "state/reported"
OTA_STATUS = "ota/status"
METRICS = ("temperature", "humidity", "battery", "vibration_rms")

_BRIDGE_FIELDS = frozenset({"device_id", "received_at"})  # set by the bridge, not the device
_ENVELOPE_FIELDS = frozenset({"seq", "ts"}) | _BRIDGE_FIELDS
_EVENT_FIELDS = frozenset({"type", "message", "attributes"})
_SHOWN_CHARS = 64  # how much of a device-chosen string goes into a reject detail
_TELEMETRY_KEYS = _ENVELOPE_FIELDS | frozenset(METRICS)
_MAX_DOUBLE = sys.float_info.max
_EXACT_INT_TO_DOUBLE = 2**1023  # float() of any int below this (in size) is finite


class RejectReason(StrEnum):
    not_json = "not_json"
    not_object = "not_object"
    missing_field = "missing_field"
    wrong_type = "wrong_type"
    bad_seq = "bad_seq"
    bad_timestamp = "bad_timestamp"
    oversize = "oversize"
    bad_topic = "bad_topic"
    unknown_device_id = "unknown_device_id"


@dataclass(frozen=True, slots=True)
class Accepted:
    kind: str
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class TimestampWindow:
    """How far a device's ``ts`` may lie from the receive time: ``max_age_ms`` before it,
    ``max_ahead_ms`` after it (both inclusive)."""

    max_age_ms: int = 30 * 86_400_000
    max_ahead_ms: int = 5 * 60_000

    def __post_init__(self) -> None:
        if self.max_age_ms < 0 or self.max_ahead_ms < 0:
            raise ValueError("a timestamp window's bounds must be >= 0")

    def bounds(self, received_at_ms: int) -> tuple[int, int]:
        """The accepted ``ts`` range for a message received at ``received_at_ms``."""
        return (
            max(0, received_at_ms - self.max_age_ms),
            min(MAX_TS_MS, received_at_ms + self.max_ahead_ms),
        )


DEFAULT_TS_WINDOW = TimestampWindow()
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class _Invalid(Exception):
    """Internal: carries a :class:`Rejected` out of the nested checks."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.rejected = Rejected(reason, detail)


class _Uncommon(Exception):
    """Internal: the telemetry fast path hands this document to the careful checks."""


def _reject(reason: RejectReason, detail: str) -> NoReturn:
    raise _Invalid(reason, detail)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


# --------------------------------------------------------------------------- topics


def parse_uplink_topic(topic: str) -> tuple[str, str] | None:
    """``devices/<id>/<kind...>`` -> ``(id, kind)``, e.g. ``(id, "state/reported")``.

    Only the shape is checked (no empty level); the id and kind are judged by :func:`validate`.
    """
    levels = topic.split("/")
    if len(levels) < 3 or levels[0] != "devices" or "" in levels:
        return None
    return levels[1], "/".join(levels[2:])


# --------------------------------------------------------------------------- values


def _is_text(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        return False
    return True


def _as_double(value: object) -> float | None:
    """``value`` as a finite double, or None if it is not a JSON number that fits one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double's range
        return None
    return number if math.isfinite(number) else None


def _bounded_int(value: object, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        return None
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# --------------------------------------------------------------------------- envelope


# json.loads(..., parse_constant=...) builds a JSONDecoder per call, which costs about as much
# as parsing a telemetry payload; this one is built once (it keeps no state between calls).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
# The scanner JSONDecoder.decode runs (set by JSONDecoder.__init__, not in typeshed).
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _loads(payload: bytes | bytearray) -> Any:
    """``json.loads(payload, parse_constant=_no_constant)``: the same result or exception."""
    if not isinstance(payload, bytes | bytearray):
        return json.loads(payload, parse_constant=_no_constant)
    # What json.loads does with bytes; a payload opening with "{" and no NUL after it is UTF-8
    # by json.detect_encoding's rules, so the common case skips asking it.
    if payload[:1] == b"{" and payload[1:2] != b"\x00":
        encoding = "utf-8"
    else:
        encoding = json.detect_encoding(payload)
    text = payload.decode(encoding, "surrogatepass")
    # JSONDecoder.decode skips whitespace around the value, scans it, and turns what is left
    # over into "Extra data". Scanning at 0 directly gives the same value, or the same error,
    # for a text that opens with the value; JSONDecoder.decode redoes anything else (leading
    # or trailing whitespace, nothing to scan, extra data) to answer exactly as json.loads.
    try:
        document, end = _SCAN(text, 0)
    except StopIteration:  # no value at 0 (whitespace, or nothing)
        return _DECODER.decode(text)
    if end != len(text):
        return _DECODER.decode(text)
    return document


def _document(device_id: str, payload: bytes) -> dict[str, Any]:
    if DEVICE_ID_PATTERN.fullmatch(device_id) is None:
        _reject(RejectReason.unknown_device_id, f"device id {_shown(device_id)} is not valid")
    if len(payload) > MAX_PAYLOAD_BYTES:
        _reject(RejectReason.oversize, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        document = _loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        _reject(RejectReason.not_json, f"{type(exc).__name__}: {exc}")
    if not isinstance(document, dict):
        _reject(RejectReason.not_object, f"top level is a {type(document).__name__}")
    return document


def _utc(ms: int) -> str:
    """``ms`` (in [0, MAX_TS_MS]) as an ISO 8601 UTC instant, for reject details."""
    instant = _EPOCH + dt.timedelta(milliseconds=ms)  # exact, where ms / 1000 would round
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _span(ms: int) -> str:
    return f"{ms / 86_400_000:.1f} days" if ms >= 86_400_000 else f"{ms / 1000:.0f} s"


def _outside_window(ts: int, received_at_ms: int, window: TimestampWindow) -> NoReturn:
    when = "before" if ts < received_at_ms else "after"
    _reject(
        RejectReason.bad_timestamp,
        f"ts {ts} ({_utc(ts)}) is {_span(abs(received_at_ms - ts))} {when} the receive time "
        f"{_utc(received_at_ms)}; accepted: at most {_span(window.max_age_ms)} before and "
        f"{_span(window.max_ahead_ms)} after",
    )


def _envelope(
    document: dict[str, Any], device_id: str, received_at_ms: int, window: TimestampWindow
) -> dict[str, Any]:
    for name in ("seq", "ts"):
        if name not in document:
            _reject(RejectReason.missing_field, f"{name!r} is required")
    seq = _bounded_int(document["seq"], MAX_SEQ)
    if seq is None:
        detail = f"seq must be an integer in [0, 2**63-1], got {_shown(document['seq'])}"
        _reject(RejectReason.bad_seq, detail)
    ts = _bounded_int(document["ts"], MAX_TS_MS)
    if ts is None:
        _reject(
            RejectReason.bad_timestamp,
            f"ts must be integer epoch milliseconds in [0, {MAX_TS_MS}], "
            f"got {_shown(document['ts'])}",
        )
    low, high = window.bounds(received_at_ms)
    if not low <= ts <= high:
        _outside_window(ts, received_at_ms, window)
    return {"device_id": device_id, "seq": seq, "ts": ts, "received_at": received_at_ms}


def _checked(
    kind: str,
    device_id: str,
    payload: bytes,
    received_at_ms: int,
    body: Callable[[dict[str, Any]], dict[str, Any]],
    window: TimestampWindow = DEFAULT_TS_WINDOW,
) -> Accepted | Rejected:
    """Run the shared checks, then ``body(document)`` for the kind's own fields."""
    return _Validator(kind, body)(device_id, payload, received_at_ms, window)


@dataclass(frozen=True, slots=True)
class _Validator:
    """``validate_<kind>(device_id, payload, received_at_ms, window)``: the shared checks,
    then ``body(document)`` for the kind's own fields. ``fast``, if given, is tried first: the
    record of a common document (given the window's bounds), or _Uncommon for the checks."""

    kind: str
    body: Callable[[dict[str, Any]], dict[str, Any]]
    fast: Callable[[dict[str, Any], str, int, int, int], dict[str, Any]] | None = None

    def __call__(
        self,
        device_id: str,
        payload: bytes,
        received_at_ms: int,
        window: TimestampWindow = DEFAULT_TS_WINDOW,
    ) -> Accepted | Rejected:
        try:
            document = _document(device_id, payload)
        except _Invalid as invalid:
            return invalid.rejected
        if self.fast is not None:
            low, high = window.bounds(received_at_ms)
            try:
                return Accepted(
                    self.kind, self.fast(document, device_id, received_at_ms, low, high)
                )
            except _Uncommon:
                pass  # the careful checks below
        return self.checked(document, device_id, received_at_ms, window)

    def checked(
        self, document: dict[str, Any], device_id: str, received_at_ms: int, window: TimestampWindow
    ) -> Accepted | Rejected:
        """The careful checks of a parsed ``document``: its envelope, then ``body``."""
        try:
            record = _envelope(document, device_id, received_at_ms, window)
            record.update(self.body(document))
        except _Invalid as invalid:
            return invalid.rejected
        return Accepted(self.kind, record)


# --------------------------------------------------------------------------- telemetry


def _metric(name: str, value: object) -> float:
    number = _as_double(value)
    if number is None:
        _reject(RejectReason.wrong_type, f"{name!r} must be a finite number, got {_shown(value)}")
    return number


def _telemetry_fields(document: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        name: None if document.get(name) is None else _metric(name, document[name])
        for name in METRICS
    }
    extra: dict[str, float] = {}
    for key, value in document.items():
        if key in _ENVELOPE_FIELDS or key in METRICS:
            continue
        if not _is_text(key):
            _reject(RejectReason.wrong_type, f"metric name {_shown(key)} is not valid text")
        extra[key] = _metric(key, value)
    fields["extra"] = extra
    return fields


def _uncommon_number(value: object) -> float:
    """A number that is not a finite float: an int in a double's range becomes its float;
    anything else is for the careful checks."""
    if type(value) is int and -_EXACT_INT_TO_DOUBLE < value < _EXACT_INT_TO_DOUBLE:
        return float(value)
    raise _Uncommon


def _uncommon_metric(value: object) -> float | None:
    """As :func:`_uncommon_number`, but a known metric may be absent or null."""
    return None if value is None else _uncommon_number(value)


def _telemetry_record(
    document: dict[str, Any], device_id: str, received_at_ms: int, low: int, high: int
) -> dict[str, Any]:
    """The record of a common-case ``document``; raises _Uncommon for anything else.

    Straight-line: seq and ts plain ints in range (ts in the window's ``[low, high]``), the
    metrics finite floats (or ints, or null, or absent), other keys ASCII with finite float
    values. Whatever else goes to
    :func:`_telemetry_fields`, which accepts it the same way or says exactly why not.
    """
    get = document.get
    seq = get("seq")
    ts = get("ts")
    if not (type(seq) is int and 0 <= seq <= MAX_SEQ and type(ts) is int and low <= ts <= high):
        raise _Uncommon
    # Comparisons with the largest double refuse infinities (JSON 1e400) as well.
    temperature = get("temperature")
    if type(temperature) is not float or not -_MAX_DOUBLE <= temperature <= _MAX_DOUBLE:
        temperature = _uncommon_metric(temperature)
    humidity = get("humidity")
    if type(humidity) is not float or not -_MAX_DOUBLE <= humidity <= _MAX_DOUBLE:
        humidity = _uncommon_metric(humidity)
    battery = get("battery")
    if type(battery) is not float or not -_MAX_DOUBLE <= battery <= _MAX_DOUBLE:
        battery = _uncommon_metric(battery)
    vibration_rms = get("vibration_rms")
    if type(vibration_rms) is not float or not -_MAX_DOUBLE <= vibration_rms <= _MAX_DOUBLE:
        vibration_rms = _uncommon_metric(vibration_rms)
    extra: dict[str, float] = {}
    if not document.keys() <= _TELEMETRY_KEYS:
        for key, value in document.items():
            if key in _TELEMETRY_KEYS:
                continue
            if not key.isascii():  # ASCII can't hold a lone surrogate; other text is checked
                raise _Uncommon
            if type(value) is not float or not -_MAX_DOUBLE <= value <= _MAX_DOUBLE:
                value = _uncommon_number(value)
            extra[key] = value
    return {
        "device_id": device_id,
        "seq": seq,
        "ts": ts,
        "received_at": received_at_ms,
        "temperature": temperature,
        "humidity": humidity,
        "battery": battery,
        "vibration_rms": vibration_rms,
        "extra": extra,
    }


# A ``Telemetry`` record: envelope, the known metrics, other numeric keys in ``extra``.
validate_telemetry = _Validator(TELEMETRY, _telemetry_fields, _telemetry_record)


# --------------------------------------------------------------------------- events


def _optional_text(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is not None and not _is_text(value):
        _reject(RejectReason.wrong_type, f"{name!r} must be a string, got {_shown(value)}")
    return value


def _attributes(document: dict[str, Any]) -> dict[str, str]:
    value = document.get("attributes")
    if value is None:
        return {}
    if not isinstance(value, dict):
        _reject(RejectReason.wrong_type, f"'attributes' must be an object, got {_shown(value)}")
    for key, item in value.items():
        if not (_is_text(key) and _is_text(item)):
            _reject(RejectReason.wrong_type, f"attributes[{_shown(key)}] must be a string")
    return value


def _event_fields(document: dict[str, Any]) -> dict[str, Any]:
    if "type" not in document:
        _reject(RejectReason.missing_field, "'type' is required")
    event_type = _optional_text(document, "type")
    if not event_type:
        _reject(RejectReason.wrong_type, "'type' must be a non-empty string")
    unexpected = sorted(document.keys() - _ENVELOPE_FIELDS - _EVENT_FIELDS)
    if unexpected:
        _reject(
            RejectReason.wrong_type,
            f"unexpected field {_shown(unexpected[0])}: put free-form values in 'attributes'",
        )
    message = _optional_text(document, "message")
    return {"type": event_type, "message": message, "attributes": _attributes(document)}


# A ``DeviceEvent`` record: envelope, ``type``, optional ``message`` and ``attributes``.
validate_event = _Validator(EVENTS, _event_fields)


# --------------------------------------------------------------------------- twin, ota


def _reported_fields(document: dict[str, Any]) -> dict[str, Any]:
    if "reported" not in document:
        _reject(RejectReason.missing_field, "'reported' is required")
    reported = document["reported"]
    if not isinstance(reported, dict):
        _reject(RejectReason.wrong_type, f"'reported' must be an object, got {_shown(reported)}")
    return {"patch": json.dumps(reported, sort_keys=True, separators=(",", ":"))}


# A ``TwinReported`` record: envelope and the ``reported`` patch (kept as JSON text).
validate_reported = _Validator(STATE_REPORTED, _reported_fields)


def _ota_status_fields(document: dict[str, Any]) -> dict[str, Any]:
    """An OTA status report as a ``DeviceEvent`` of type ``ota_status``: its scalar fields
    (status, version, command_id, rollout_id, ...) become string attributes."""
    if "status" not in document:
        _reject(RejectReason.missing_field, "'status' is required")
    if not _optional_text(document, "status"):
        _reject(RejectReason.wrong_type, "'status' must be a non-empty string")
    attributes: dict[str, str] = {}
    for key in sorted(document.keys() - _ENVELOPE_FIELDS):
        value = document[key]
        if isinstance(value, bool) or not isinstance(value, str | int | float) or value is None:
            if value is None:
                continue
            _reject(RejectReason.wrong_type, f"{_shown(key)} must be a string or a number")
        attributes[key] = value if isinstance(value, str) else json.dumps(value)
    return {"type": "ota_status", "message": attributes.get("reason"), "attributes": attributes}


validate_ota_status = _Validator(OTA_STATUS, _ota_status_fields)


# --------------------------------------------------------------------------- dispatch


def validate(
    kind: str,
    device_id: str,
    payload: bytes,
    received_at_ms: int,
    window: TimestampWindow = DEFAULT_TS_WINDOW,
) -> Accepted | Rejected:
    """Validate a payload from ``devices/<device_id>/<kind>`` received at ``received_at_ms``
    (its ``ts`` must lie in ``window`` around it); unknown kinds are ``bad_topic``."""
    if kind == TELEMETRY:
        return validate_telemetry(device_id, payload, received_at_ms, window)
    if kind == EVENTS:
        return validate_event(device_id, payload, received_at_ms, window)
    if kind == STATE_REPORTED:
        return validate_reported(device_id, payload, received_at_ms, window)
    if kind == OTA_STATUS:
        return validate_ota_status(device_id, payload, received_at_ms, window)
    return Rejected(RejectReason.bad_topic, f"no uplink handled for kind {_shown(kind)}")
