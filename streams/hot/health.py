"""Health digests: per batch, each device group's readings in each minute of device time.

The hot path decodes every reading anyway. One small digest per (group, minute) a batch
touches, out on ``telemetry.digests`` keyed by group, lets the fleet_health job
(streams/jobs/shipped/fleet_health.py) fold a few records a second instead of reading the whole
telemetry stream, which made it the stack's most expensive process (README, "CPU ledger").
Digests are written in the batch's transaction, so each reading is in exactly one of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

WINDOW_MS = 60_000
# The Telemetry schema's named metrics (schemas/avro/Telemetry.avsc); `extra` ones are not kept.
STANDARD_METRICS = ("temperature", "humidity", "battery", "vibration_rms")
# How far ahead of the worker's clock a reading's device time may be: further is a bad device
# clock, left out, so that it cannot open a window that retires everyone else's.
FUTURE_SKEW_MS = 5 * 60_000
UNREGISTERED = "unregistered"  # the group of a device the registry does not (yet) know


def window_start_ms(ts_ms: int) -> int:
    """Start of the 1-minute window holding device time ``ts_ms`` (ms since the epoch)."""
    return ts_ms - ts_ms % WINDOW_MS


def is_future(ts_ms: int, now_ms: int) -> bool:
    """A reading from further ahead than FUTURE_SKEW_MS of ``now_ms``."""
    return ts_ms > now_ms + FUTURE_SKEW_MS


@lru_cache(maxsize=4096)
def group_path(resource: str | None) -> str:
    """``org/project/group`` of the registry's ``org/<o>/project/<p>/group/<g>`` path."""
    return UNREGISTERED if resource is None else "/".join(resource.split("/")[1::2])


@dataclass(slots=True)
class Digest:
    """One group's readings of one batch in one minute: distinct devices, messages, and per
    standard metric [count, min, max, sum]."""

    group: str
    start_ms: int
    devices: set[str] = field(default_factory=set)
    messages: int = 0
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def add(self, device_id: str, reading: Mapping[str, Any]) -> None:
        self.devices.add(device_id)
        self.messages += 1
        for name in STANDARD_METRICS:
            value = reading.get(name)
            if value is None:
                continue
            value = float(value)
            agg = self.metrics.get(name)
            if agg is None:
                self.metrics[name] = [1, value, value, value]
                continue
            agg[0] += 1
            if value < agg[1]:
                agg[1] = value
            if value > agg[2]:
                agg[2] = value
            agg[3] += value

    def to_json(self) -> bytes:
        """The ``telemetry.digests`` value: a window aggregate with its devices listed."""
        metrics = {
            name: {"count": int(c), "min": lo, "max": hi, "sum": total}
            for name, (c, lo, hi, total) in sorted(self.metrics.items())
        }
        return json.dumps(
            {
                "group": self.group,
                "window_start_ms": self.start_ms,
                "devices": sorted(self.devices),
                "messages": self.messages,
                "metrics": metrics,
            }
        ).encode()


@dataclass
class HealthDigests:
    """A batch's digests, by (group, window start)."""

    by_window: dict[tuple[str, int], Digest] = field(default_factory=dict)

    def add(self, reading: Mapping[str, Any], group: str | None, now_ms: int) -> None:
        ts = int(reading["ts"])
        if is_future(ts, now_ms):
            return
        where = (group_path(group), window_start_ms(ts))
        digest = self.by_window.get(where)
        if digest is None:
            digest = self.by_window[where] = Digest(*where)
        digest.add(str(reading["device_id"]), reading)

    def __iter__(self) -> Iterator[Digest]:
        return iter(self.by_window.values())

    def __bool__(self) -> bool:
        return bool(self.by_window)
