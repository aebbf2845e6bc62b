"""Device twins, the device's side (after AWS IoT Device Shadow).

Each device keeps a local reported document and subscribes (QoS 1, in its persistent session)
to `devices/<id>/state/desired`, where the platform publishes
`{"version": V, "state": {delta}, "timestamp": ms}`. The device merges the delta into its
reported document (nested objects merge, a null removes a key) and reports what it applied on
`devices/<id>/state/reported` as `{"seq": n, "ts": ms, "reported": {patch}}`, through the same
outbox as telemetry. A delta whose version is not newer than the last one applied is a repeat
and is ignored. On every (re)connect the device reports its whole document once, so the
platform can answer with a delta. The document and the last applied version persist in
`<id>.twin.json`, beside the sequence numbers in `<id>.seq.json`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from infra.provision import DeviceCredentials
from infra.simulator.protocol import STATE_REPORTED, build_message, no_json_constant

T = TypeVar("T")

FIRMWARE_VERSION = "1.0.0"
NO_VERSION = -1  # last applied desired version before any was applied (the twin's start at 0)
MAX_STATE_DEPTH = 32  # deeper desired states are refused (the platform's twins allow 6 levels)


@dataclass
class LocalTwin:
    """What a device keeps of its twin: its reported document and the newest desired version
    it applied."""

    reported: dict[str, Any]
    version: int = NO_VERSION


@dataclass(frozen=True)
class DesiredUpdate:
    """A message from `devices/<id>/state/desired`: the delta to apply and its twin version."""

    version: int
    state: dict[str, Any]


def initial_reported(report_interval_s: float) -> dict[str, Any]:
    """A new device's reported document."""
    return {"firmware": FIRMWARE_VERSION, "report_interval_s": report_interval_s}


def merge_reported(document: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`document` with `patch` merged in (a new dict; neither argument is changed).

    The twin's merge (streams/twin.py): nested objects merge key by key, any other value
    replaces the old one whole, a null removes the key, an object left empty by removals is
    dropped, and a patch object with nothing to set changes nothing.
    """
    out = dict(document)
    for key, value in patch.items():
        old = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            sub = merge_reported(old if isinstance(old, dict) else {}, value)
            if sub:
                out[key] = sub
            elif isinstance(old, dict):  # emptied by removals: drop it
                del out[key]
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_stale(version: int, last_applied: int) -> bool:
    """Whether a desired message of `version` repeats one already applied."""
    return version <= last_applied


def _too_deep(value: Any, depth: int) -> bool:
    if not isinstance(value, dict | list):
        return False
    if depth >= MAX_STATE_DEPTH:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(_too_deep(item, depth + 1) for item in items)


def parse_desired(payload: bytes) -> DesiredUpdate:
    """The update in a desired message; ValueError if it is not one.

    `version` must be a non-negative integer and `state` an object, nested at most
    MAX_STATE_DEPTH levels; `timestamp` is not needed. NaN and Infinity are refused (a report
    carrying them would not be JSON for the bridge).
    """
    try:
        document = json.loads(payload, parse_constant=no_json_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"top level is a {type(document).__name__}, not an object")
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    state = document.get("state")
    if not isinstance(state, dict):
        raise ValueError(f"state must be an object, got {type(state).__name__}")
    if _too_deep(state, 0):
        raise ValueError(f"state is nested deeper than {MAX_STATE_DEPTH} levels")
    return DesiredUpdate(version, state)


def apply_desired(twin: LocalTwin, update: DesiredUpdate) -> LocalTwin | None:
    """The twin after `update`, or None if the update is a repeat (nothing to do)."""
    if is_stale(update.version, twin.version):
        return None
    return LocalTwin(merge_reported(twin.reported, update.state), update.version)


def reported_message(
    device_id: str, seq: int, ts_ms: int, reported: dict[str, Any]
) -> tuple[str, bytes]:
    """A reported patch (or whole document) for `devices/<id>/state/reported`."""
    return build_message(device_id, STATE_REPORTED, seq, ts_ms, {"reported": reported})


def _twin_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".twin.json")


def twin_to_json(twin: LocalTwin) -> str:
    return json.dumps({"reported": twin.reported, "version": twin.version})


def twin_from_json(text: str) -> LocalTwin | None:
    """The twin saved by :func:`twin_to_json`, or None if `text` is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    reported, version = data.get("reported"), data.get("version", NO_VERSION)
    if not isinstance(reported, dict) or isinstance(version, bool) or not isinstance(version, int):
        return None
    return LocalTwin(reported, version)


def read_saved(path: Path, parse: Callable[[str], T | None]) -> T | None:
    """A device's state saved at ``path``; None (start afresh) if there is none or ``parse``
    refuses it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse(text)


def load_twin(creds: DeviceCredentials) -> LocalTwin | None:
    return read_saved(_twin_path(creds), twin_from_json)


def save_twin(creds: DeviceCredentials, twin: LocalTwin) -> None:
    _twin_path(creds).write_text(twin_to_json(twin))
