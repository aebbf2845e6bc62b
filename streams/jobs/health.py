"""Fleet health, the logic of the shipped job ``streams/jobs/shipped/fleet_health.py``. Pure.

Per device group (``org/project/group``) and 1-minute tumbling window (device time): how many
devices reported, how many messages, and min/mean/max of each standard metric. A window's
aggregate is a plain JSON-able dict (it lives in a Faust table, whose changelog is JSON);
:func:`health_record` is what goes out on ``fleet.health``, keyed by :func:`health_key`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypedDict

WINDOW_S = 60
WINDOW_MS = WINDOW_S * 1000
# The Telemetry schema's named metrics (schemas/avro/Telemetry.avsc); `extra` ones are not kept.
STANDARD_METRICS = ("temperature", "humidity", "battery", "vibration_rms")


class MetricAggregate(TypedDict):
    count: int
    min: float
    max: float
    sum: float


class WindowAggregate(TypedDict):
    devices: int
    messages: int
    metrics: dict[str, MetricAggregate]


class MetricSummary(TypedDict):
    count: int
    min: float
    mean: float
    max: float


class HealthRecord(TypedDict):
    group: str
    window_start: str  # ISO 8601, UTC
    window_start_ms: int
    window_end_ms: int  # exclusive
    devices: int
    messages: int
    metrics: dict[str, MetricSummary]


def window_start_ms(ts_ms: int) -> int:
    """Start of the 1-minute window holding device time ``ts_ms`` (ms since the epoch)."""
    return ts_ms - ts_ms % WINDOW_MS


def metrics_of(reading: Any) -> dict[str, float]:
    """The standard metrics a reading (a Telemetry record or dict) carries, by name."""
    values = (
        {n: reading.get(n) for n in STANDARD_METRICS}
        if isinstance(reading, Mapping)
        else {n: getattr(reading, n, None) for n in STANDARD_METRICS}
    )
    return {name: float(v) for name, v in values.items() if v is not None}


def empty_window() -> WindowAggregate:
    return {"devices": 0, "messages": 0, "metrics": {}}


def add_reading(
    window: Mapping[str, Any] | None, metrics: Mapping[str, float], new_device: bool
) -> WindowAggregate:
    """The window's aggregate with one more message (from a device not yet counted in this
    window if ``new_device``); a new dict, the argument is left as it was."""
    return add_readings(window, [(metrics, new_device)])


def add_readings(
    window: Mapping[str, Any] | None, readings: Iterable[tuple[Mapping[str, float], bool]]
) -> WindowAggregate:
    """The window's aggregate with more messages, each ``(metrics, new_device)`` as
    :func:`add_reading` takes it: one copy for a batch, not one a reading."""
    base = window or empty_window()
    merged: dict[str, MetricAggregate] = {k: dict(v) for k, v in base["metrics"].items()}  # type: ignore[misc]
    devices, messages = int(base["devices"]), int(base["messages"])
    for metrics, new_device in readings:
        devices += 1 if new_device else 0
        messages += 1
        for name, value in metrics.items():
            agg = merged.get(name)
            if agg is None:
                merged[name] = {"count": 1, "min": value, "max": value, "sum": value}
            else:
                agg["count"] += 1
                agg["min"] = min(agg["min"], value)
                agg["max"] = max(agg["max"], value)
                agg["sum"] += value
    return {"devices": devices, "messages": messages, "metrics": merged}


def merge_windows(parts: Iterable[Mapping[str, Any]]) -> WindowAggregate:
    """One window from its partial aggregates over disjoint sets of devices (one per
    telemetry partition: a device's readings all go to one partition, so devices add up)."""
    devices = messages = 0
    metrics: dict[str, MetricAggregate] = {}
    for part in parts:
        devices += int(part["devices"])
        messages += int(part["messages"])
        for name, agg in part["metrics"].items():
            have = metrics.get(name)
            if have is None:
                metrics[name] = {
                    "count": int(agg["count"]),
                    "min": float(agg["min"]),
                    "max": float(agg["max"]),
                    "sum": float(agg["sum"]),
                }
            else:
                have["count"] += int(agg["count"])
                have["min"] = min(have["min"], float(agg["min"]))
                have["max"] = max(have["max"], float(agg["max"]))
                have["sum"] += float(agg["sum"])
    return {"devices": devices, "messages": messages, "metrics": metrics}


def partial_key(window_key: str, partition: int) -> str:
    """Key of one telemetry partition's share of a window (the first stage's table)."""
    return f"{window_key}#{partition}"


def parse_partial_key(key: str) -> tuple[str, int]:
    """(window key, partition) of a :func:`partial_key`."""
    window, _, partition = key.rpartition("#")
    return window, int(partition)


# Windows are kept (and late readings for them counted) this long after the newest window
# began; a reading for an older window is late and left out (it would publish a smaller
# aggregate over the complete one).
RETAIN_MS = 10 * WINDOW_MS


def health_key(group: str, start_ms: int) -> str:
    """``fleet.health``'s key (and the table's): group path and window start, so a replay
    overwrites, never adds."""
    return f"{group}@{iso(start_ms)}"


def parse_health_key(key: str) -> tuple[str, int]:
    """(group, window start ms) of a :func:`health_key`."""
    group, _, start = key.rpartition("@")
    when = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return group, int(when.timestamp() * 1000)


def device_key(window_key: str, device_id: str) -> str:
    """Key of "this device reported in this window" (the distinct-devices table)."""
    return f"{window_key}|{device_id}"


def window_of(key: str) -> str:
    """The window key of a :func:`health_key` or :func:`device_key`."""
    return key.split("|", 1)[0]


def is_late(start_ms: int, newest_start_ms: int) -> bool:
    """A window no longer kept: it began more than RETAIN_MS before the newest one."""
    return start_ms < newest_start_ms - RETAIN_MS


# How far ahead of this worker's clock a reading's device time may be: further is a bad device
# clock, skipped, so that it cannot move the newest window and retire everyone else's.
FUTURE_SKEW_MS = 5 * 60_000


def is_future(ts_ms: int, now_ms: int) -> bool:
    """A reading from further ahead than FUTURE_SKEW_MS of ``now_ms``."""
    return ts_ms > now_ms + FUTURE_SKEW_MS


@lru_cache(maxsize=4096)  # one window start serves a minute of readings
def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def health_record(group: str, start_ms: int, window: Mapping[str, Any]) -> HealthRecord:
    """The published form of a window's aggregate: means computed, JSON-ready."""
    metrics: dict[str, MetricSummary] = {
        name: {
            "count": int(agg["count"]),
            "min": float(agg["min"]),
            "mean": float(agg["sum"]) / int(agg["count"]),
            "max": float(agg["max"]),
        }
        for name, agg in sorted(window["metrics"].items())
    }
    return {
        "group": group,
        "window_start": iso(start_ms),
        "window_start_ms": start_ms,
        "window_end_ms": start_ms + WINDOW_MS,
        "devices": int(window["devices"]),
        "messages": int(window["messages"]),
        "metrics": metrics,
    }
