"""fleet_health: per device group, 1-minute tumbling windows of the fleet's telemetry.

For each group (``org/project/group``, from the device registry) and minute of device time:
devices reporting, messages, and min/mean/max of each standard metric. The windows live in a
Faust table (served on this worker's web view at ``/fleet-health/``) and are published to
``fleet.health`` (compacted), keyed by group and window start, every EMIT_INTERVAL_S while
they change: a repeat overwrites the window's record, never adds one.

At least once: after a crash the readings since the last commit are counted again.
"""

from __future__ import annotations

import time
from typing import Any

import faust
from faust.web import Request, Response, View

from streams.jobs import app, topics
from streams.jobs.health import (
    add_reading,
    device_key,
    health_key,
    health_record,
    is_future,
    is_late,
    metrics_of,
    parse_health_key,
    window_of,
    window_start_ms,
)

EMIT_INTERVAL_S = 10.0

devices = app.devices
# Window key (group@start) -> aggregate; (group@start|device) -> seen. JSON changelogs.
windows = app.Table("fleet_health_windows", default=None, key_type=str, value_type=None)
seen = app.Table("fleet_health_devices", default=None, key_type=str, value_type=None)

# Window keys changed since the last emission; None: all (after a start, so that a window
# whose last change was committed but not yet published is published).
_dirty: set[str] | None = None
_newest = {"start_ms": 0}
# The table's keys by group, in memory (rebuilt from the tables at the first reading), so a
# group's expired windows are found without scanning the tables.
_index: dict[str, dict[str, set[str]]] | None = None  # group -> window key -> device keys


def _mark(key: str) -> None:
    if _dirty is not None:
        _dirty.add(key)


def _group_index(group: str) -> dict[str, set[str]]:
    global _index
    if _index is None:
        _index = {}
        for key in list(windows.keys()):
            _index.setdefault(parse_health_key(key)[0], {}).setdefault(key, set())
        for member in list(seen.keys()):
            window = window_of(member)
            _index.setdefault(parse_health_key(window)[0], {}).setdefault(window, set()).add(member)
    return _index.setdefault(group, {})


def _expire(group: str, index: dict[str, set[str]]) -> None:
    """Forget the group's windows past retention. Only the group's own (from one of its
    readings): its deletions go to the changelog partition its updates went to."""
    for key in [k for k in index if is_late(parse_health_key(k)[1], _newest["start_ms"])]:
        for member in index.pop(key):
            seen.pop(member, None)
        windows.pop(key, None)


@app.agent(topics.telemetry)
async def fleet_health(stream: faust.StreamT[Any]) -> None:
    # Repartitioned by group: one group's readings meet in one partition, so each window
    # key has one writer and one changelog partition.
    grouped = stream.group_by(lambda r: devices.group_of(r.device_id), name="group")
    async for group, reading in grouped.items():
        if is_future(int(reading.ts), int(time.time() * 1000)):
            continue  # a device clock far ahead: it must not retire every current window
        start = window_start_ms(int(reading.ts))
        _newest["start_ms"] = max(_newest["start_ms"], start)
        if is_late(start, _newest["start_ms"]):
            continue
        key = health_key(group, start)
        index = _group_index(group)
        members = index.setdefault(key, set())
        member = device_key(key, reading.device_id)
        new_device = seen.get(member) is None
        if new_device:
            seen[member] = True
            members.add(member)
        windows[key] = add_reading(windows.get(key), metrics_of(reading), new_device)
        _mark(key)
        if len(index) > 1:
            _expire(group, index)


@app.timer(EMIT_INTERVAL_S)  # type: ignore[untyped-decorator]
async def publish_windows() -> None:
    """Publish the windows that changed since the last time."""
    global _dirty
    if _dirty is None and not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
        return  # the first emission publishes every window: once the tables are recovered
    keys = set(windows.keys()) if _dirty is None else _dirty
    _dirty = set()
    for key in sorted(keys):
        value = windows.get(key)
        if value is None:
            continue
        group, start = parse_health_key(key)
        _newest["start_ms"] = max(_newest["start_ms"], start)
        await topics.fleet_health.send(key=key, value=health_record(group, start, value))


@app.page("/fleet-health/")
class FleetHealthView(View):
    """The windows this worker holds, newest first: ``GET /fleet-health/[?group=G]``."""

    async def get(self, request: Request) -> Response:
        wanted = request.query.get("group")
        records = []
        for key, value in list(windows.items()):
            group, start = parse_health_key(key)
            if value is not None and (wanted is None or group == wanted):
                records.append(health_record(group, start, value))
        records.sort(key=lambda r: (-r["window_start_ms"], r["group"]))
        return self.json(records)
