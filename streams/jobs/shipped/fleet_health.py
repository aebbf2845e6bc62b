"""fleet_health: per device group, 1-minute tumbling windows of the fleet's telemetry.

For each group (``org/project/group``, from the device registry) and minute of device time:
devices reporting, messages, and min/mean/max of each standard metric. Two stages, so the
telemetry stream is read once and never repartitioned:

1. ``fleet_health`` counts each telemetry partition's share of a window where it reads it
   (a device's readings all go to one partition, so the shares' devices add up), and every
   EMIT_INTERVAL_S sends the shares that changed to the job's own ``partials`` topic, keyed
   by group: a group's windows meet in one partition there.
2. ``combine`` keeps the latest share of each partition per window and publishes the window
   whole to ``fleet.health`` (compacted), keyed by group and window start: a repeat
   overwrites the window's record, never adds one. Its table is served on the worker's web
   view at ``/fleet-health/``.

At least once: after a crash the readings since the last commit are counted again.
"""

from __future__ import annotations

import time
from typing import Any

import faust
from faust.web import Request, Response, View

from streams.jobs import app, topics
from streams.jobs.batches import by_partition, writing_as
from streams.jobs.health import (
    add_readings,
    device_key,
    health_key,
    health_record,
    is_future,
    is_late,
    merge_windows,
    metrics_of,
    parse_health_key,
    parse_partial_key,
    partial_key,
    window_of,
    window_start_ms,
)

EMIT_INTERVAL_S = 10.0
BATCH_MAX = 2_000
BATCH_WITHIN_S = 0.5

devices = app.devices
# Stage 1, keys carry the telemetry partition (one writer each, changelog partition = source
# partition): group@start#p -> partial aggregate; group@start#p|device -> seen.
shares = app.Table("fleet_health_shares", default=None, key_type=str, value_type=None)
seen = app.Table("fleet_health_share_devices", default=None, key_type=str, value_type=None)
# Stage 2: group@start -> {partition: partial aggregate}.
windows = app.Table("fleet_health_combined", default=None, key_type=str, value_type=None)
partials = app.topic(
    "fleet_health-partials", key_type=str, key_serializer="raw", value_serializer="json"
)

# Share keys changed since the last emission; None: all (after a start, so that a share
# whose last change was committed but not yet sent is sent).
_dirty: set[str] | None = None
_newest = {"start_ms": 0}
# The share keys by partition, in memory (rebuilt from the tables at the first reading), so a
# partition's expired shares are found without scanning the tables.
_index: dict[int, dict[str, set[str]]] | None = None  # partition -> share key -> device keys
_by_group: dict[str, set[str]] | None = None  # stage 2: group -> window keys


def _partition_index(partition: int) -> dict[str, set[str]]:
    global _index
    if _index is None:
        _index = {}
        for key in list(shares.keys()):
            _index.setdefault(parse_partial_key(key)[1], {}).setdefault(key, set())
        for member in list(seen.keys()):
            share = window_of(member)
            _index.setdefault(parse_partial_key(share)[1], {}).setdefault(share, set()).add(member)
    return _index.setdefault(partition, {})


def _expire_shares(index: dict[str, set[str]]) -> None:
    """Forget one partition's shares past retention, while reading that partition: the
    deletions go to the changelog partition the updates went to."""
    for key in [k for k in index if is_late(_start_of(parse_partial_key(k)[0]), _newest_ms())]:
        for member in index.pop(key):
            seen.pop(member, None)
        shares.pop(key, None)


def _newest_ms() -> int:
    return _newest["start_ms"]


def _start_of(window: str) -> int:
    return parse_health_key(window)[1]


def _group_windows(group: str) -> set[str]:
    global _by_group
    if _by_group is None:
        _by_group = {}
        for key in list(windows.keys()):
            _by_group.setdefault(parse_health_key(key)[0], set()).add(key)
    return _by_group.setdefault(group, set())


@app.agent(topics.telemetry)
async def fleet_health(stream: faust.StreamT[Any]) -> None:
    # In batches: one table write per share a batch touches, not one per reading.
    batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
    async for batch in batches:
        for partition, events in by_partition(batch).items():
            with writing_as(events[-1]):
                await _fold(partition, events)


async def _fold(partition: int, events: list[Any]) -> None:
    """One partition's readings of a batch into its shares; a reading that cannot be folded
    goes to the dead-letter topic with its reason, the others are counted."""
    index = _partition_index(partition)
    now_ms = int(time.time() * 1000)
    readings: dict[str, list[tuple[dict[str, float], bool]]] = {}
    for event in events:
        try:
            key, reading = _share_of(event.value, partition, index, now_ms)
        except (TypeError, ValueError, AttributeError) as exc:  # a reading it cannot read
            await app.dead_letter_message(event.message, exc)
            continue
        if key is not None:
            readings.setdefault(key, []).append(reading)
    for key, added in readings.items():
        shares[key] = add_readings(shares.get(key), added)
    if _dirty is not None:
        _dirty.update(readings)
    if len(index) > 1:
        _expire_shares(index)


def _share_of(
    reading: Any, partition: int, index: dict[str, set[str]], now_ms: int
) -> tuple[str | None, tuple[dict[str, float], bool]]:
    """The share a reading adds to (None: too far ahead or too late), its metrics and whether
    its device is new to that share (then it is recorded as seen)."""
    metrics = metrics_of(reading)
    if is_future(int(reading.ts), now_ms):
        return None, (metrics, False)  # a device clock far ahead must not retire every window
    start = window_start_ms(int(reading.ts))
    _newest["start_ms"] = max(_newest["start_ms"], start)
    if is_late(start, _newest["start_ms"]):
        return None, (metrics, False)
    key = partial_key(health_key(devices.group_of(reading.device_id), start), partition)
    members = index.setdefault(key, set())  # mirrors the seen table (rebuilt from it)
    member = device_key(key, reading.device_id)
    new_device = member not in members
    if new_device:
        seen[member] = True
        members.add(member)
    return key, (metrics, new_device)


@app.timer(EMIT_INTERVAL_S)  # type: ignore[untyped-decorator]
async def send_shares() -> None:
    """Send the shares that changed since the last time to the combining stage."""
    global _dirty
    if _dirty is None and not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
        return  # the first emission sends every share: once the tables are recovered
    keys = set(shares.keys()) if _dirty is None else _dirty
    _dirty = set()
    for key in sorted(keys):
        value = shares.get(key)
        if value is None:
            continue
        window, partition = parse_partial_key(key)
        await partials.send(
            key=parse_health_key(window)[0].encode(),
            value={"window": window, "partition": partition, "share": value},
        )


@app.agent(partials)
async def combine(stream: faust.StreamT[Any]) -> None:
    """Each window whole, from the latest share of each partition, out on ``fleet.health``."""
    async for partial in stream:
        window = str(partial["window"])
        group, start = parse_health_key(window)
        _newest["start_ms"] = max(_newest["start_ms"], start)
        parts = dict(windows.get(window) or {})
        parts[str(partial["partition"])] = partial["share"]
        windows[window] = parts
        merged = merge_windows(parts.values())
        await topics.fleet_health.send(key=window, value=health_record(group, start, merged))
        # Only this group's windows: they were all written from this partition of `partials`.
        known = _group_windows(group)
        known.add(window)
        for old in [k for k in known if is_late(_start_of(k), _newest_ms())]:
            known.discard(old)
            windows.pop(old, None)


@app.page("/fleet-health/")
class FleetHealthView(View):
    """The windows this worker holds, newest first: ``GET /fleet-health/[?group=G]``."""

    async def get(self, request: Request) -> Response:
        wanted = request.query.get("group")
        records = []
        for key, parts in list(windows.items()):
            group, start = parse_health_key(key)
            if parts and (wanted is None or group == wanted):
                records.append(health_record(group, start, merge_windows(parts.values())))
        records.sort(key=lambda r: (-r["window_start_ms"], r["group"]))
        return self.json(records)
