"""Fleet health, the logic of the shipped job ``streams/jobs/shipped/fleet_health.py``. Pure.

Per device group (``org/project/group``) and 1-minute tumbling window (device time): how many
devices reported, how many messages, and min/mean/max of each standard metric. A window's
aggregate is a plain JSON-able dict (it lives in a Faust table, whose changelog is JSON);
:func:`health_record` is what goes out on ``fleet.health``, keyed by :func:`health_key`. The
job folds the hot path's digests (streams/hot/health.py) into windows with :func:`fold_digest`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypedDict

from streams.hot.health import WINDOW_MS  # the hot path cuts the windows (its digests)


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


def empty_window() -> WindowAggregate:
    return {"devices": 0, "messages": 0, "metrics": {}}


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


def fold_digest(
    window: Mapping[str, Any] | None, digest: Mapping[str, Any], new_devices: int
) -> WindowAggregate:
    """The window with one more digest of the hot path's (its messages and metrics; its
    devices not yet counted in this window are ``new_devices``)."""
    part = {"devices": new_devices, "messages": digest["messages"], "metrics": digest["metrics"]}
    return merge_windows([window or empty_window(), part])


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
