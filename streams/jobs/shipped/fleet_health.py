"""fleet_health: per device group, 1-minute tumbling windows of the fleet's telemetry.

For each group (``org/project/group``, as the hot path's registry table names it) and minute
of device time: devices reporting, messages, and min/mean/max of each standard metric, out on
``fleet.health`` (compacted) keyed by group and window start: a repeat overwrites the window's
record, never adds one. The windows are served on the worker's web view at ``/fleet-health/``.

It reads ``telemetry.digests``, not the whole telemetry stream: the hot path, which decodes
every reading anyway, writes one digest per group and minute each of its batches touches
(streams/hot/health.py), keyed by group, so a group's digests meet in one partition here and
its windows are folded whole. Reading all of ``telemetry.raw`` through Faust made this job
the stack's most expensive process (README, "CPU ledger").

At least once: after a crash the digests since the last commit are counted again.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from streams.jobs import app, topics
from streams.jobs.batches import by_partition, writing_as
from streams.jobs.health import (
    WindowAggregate,
    device_key,
    fold_digest,
    health_key,
    health_record,
    is_late,
    parse_health_key,
    window_of,
)

BATCH_MAX = 500
BATCH_WITHIN_S = 0.5

# group@start -> {"partition": p, "window": aggregate}; group@start|device -> p (seen). The
# partition is the digests' one the key is written from: expiry deletes it from there.
windows = app.Table("fleet_health_windows", default=None, key_type=str, value_type=None)
seen = app.Table("fleet_health_devices", default=None, key_type=str, value_type=None)

_newest = {"start_ms": 0}
# The window keys by partition with their devices, in memory (rebuilt from the tables at the
# first digest), so a partition's expired windows are found without scanning the tables.
_index: dict[int, dict[str, set[str]]] | None = None  # partition -> window key -> device keys


def _partition_index(partition: int) -> dict[str, set[str]]:
    global _index
    if _index is None:
        _index = {}
        for key, held in list(windows.items()):
            _index.setdefault(int(held["partition"]), {}).setdefault(key, set())
        for member, part in list(seen.items()):
            _index.setdefault(int(part), {}).setdefault(window_of(member), set()).add(member)
    return _index.setdefault(partition, {})


def _expire(index: dict[str, set[str]]) -> None:
    """Forget one partition's windows past retention, while reading that partition: the
    deletions go to the changelog partition the updates went to."""
    newest = _newest["start_ms"]
    for key in [k for k in index if is_late(parse_health_key(k)[1], newest)]:
        for member in index.pop(key):
            seen.pop(member, None)
        windows.pop(key, None)


@app.agent(topics.telemetry_digests)
async def fleet_health(stream: faust.StreamT[Any]) -> None:
    batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
    async for batch in batches:
        for partition, events in by_partition(batch).items():
            with writing_as(events[-1]):
                changed = await _fold(partition, events)
            for key, window in sorted(changed.items()):
                group, start = parse_health_key(key)
                await topics.fleet_health.send(key=key, value=health_record(group, start, window))


async def _fold(partition: int, events: list[Any]) -> dict[str, WindowAggregate]:
    """One partition's digests of a batch into their windows, one table write per window
    changed (returned); a digest that cannot be folded goes to the dead-letter topic with its
    reason."""
    index = _partition_index(partition)
    changed: dict[str, WindowAggregate] = {}
    for event in events:
        try:
            _add_digest(event.value, partition, index, changed)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            await app.dead_letter_message(event.message, exc)
    for key, window in changed.items():
        windows[key] = {"partition": partition, "window": window}
    if len(index) > 1:
        _expire(index)
    return {key: window for key, window in changed.items() if key in index}


def _add_digest(
    digest: Any, partition: int, index: dict[str, set[str]], changed: dict[str, WindowAggregate]
) -> None:
    """Fold one digest into its window in `changed` (left out: a window past retention)."""
    start = int(digest["window_start_ms"])
    _newest["start_ms"] = max(_newest["start_ms"], start)
    if is_late(start, _newest["start_ms"]):
        return
    key = health_key(str(digest["group"]), start)
    held = windows.get(key)
    before = changed.get(key) or (None if held is None else held["window"])
    window = fold_digest(before, digest, 0)  # checks the digest before anything is recorded
    members = index.setdefault(key, set())  # mirrors the seen table (rebuilt from it)
    for device_id in digest["devices"]:
        member = device_key(key, str(device_id))
        if member not in members:
            seen[member] = partition
            members.add(member)
            window["devices"] += 1
    changed[key] = window


@app.page("/fleet-health/")
class FleetHealthView(View):
    """The windows this worker holds, newest first: ``GET /fleet-health/[?group=G]``."""

    async def get(self, request: Request) -> Response:
        wanted = request.query.get("group")
        records = []
        for key, held in list(windows.items()):
            group, start = parse_health_key(key)
            if held and (wanted is None or group == wanted):
                records.append(health_record(group, start, held["window"]))
        records.sort(key=lambda r: (-r["window_start_ms"], r["group"]))
        return self.json(records)
