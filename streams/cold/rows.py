"""Warehouse rows the cold path derives from state topics: `twin_history` from `twin.state`,
`ota_events` from `ota.rollouts`. Done here, not in the sink: the delta is the twin's domain,
the device counts the rollout's, and sinks/ imports nothing from streams/."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sinks.base import BatchOrigin
from sinks.clickhouse import InvalidBatch
from streams.hot.twin import TwinDocumentError, delta, from_record
from streams.ota.model import Progress, Rollout
from streams.ota.model import from_record as rollout_from_record
from streams.runtime.records import SourceRecord

# ota_events count columns: the progress statuses each one adds up.
OTA_COUNT_COLUMNS: dict[str, tuple[Progress, ...]] = {
    "planned": (Progress.planned,),
    "skipped": (Progress.skipped,),
    "sent": (Progress.sent,),
    "in_progress": (Progress.downloading, Progress.verifying, Progress.installing),
    "succeeded": (Progress.succeeded,),
    "failed": (Progress.failed,),
    "rollback_sent": (Progress.rollback_sent,),
    "rolled_back": (Progress.rolled_back,),
    "rollback_failed": (Progress.rollback_failed,),
}


def _compact_json(document: Mapping[str, Any]) -> str:
    """As streams.hot.twin writes documents into TwinState: compact, keys sorted, UTF-8, strict
    JSON (a NaN raises ValueError)."""
    return json.dumps(
        document, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    )


def twin_history_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Decoded ``TwinState`` records as ``twin_history`` rows: device_id, version, updated_at,
    last_reported_seq, the desired and reported documents (compact JSON), ``delta`` (compact
    JSON of :func:`streams.hot.twin.delta`) and ``delta_keys`` (its number of top-level keys).

    Done here, not in the sink: the delta is the twin's domain, and sinks/ imports nothing from
    streams/ (the sink converts these rows generically). A record whose documents are not JSON
    objects raises :class:`InvalidBatch`, so the cold path dead-letters the batch, as it does a
    telemetry batch the sink refuses.
    """
    rows = []
    for i, record in enumerate(records):
        try:
            twin = from_record(record)
            twin_delta = delta(twin)
            row = {
                "device_id": twin.device_id,
                "version": twin.version,
                "updated_at": twin.updated_at,
                "desired": _compact_json(twin.desired),
                "reported": _compact_json(twin.reported),
                "delta": _compact_json(twin_delta),
                "delta_keys": len(twin_delta),
                "last_reported_seq": twin.last_reported_seq,
            }
        except (TwinDocumentError, KeyError, TypeError, ValueError) as exc:
            device = record.get("device_id", "?")
            raise InvalidBatch(f"twin_history: record {i} (device {device!r}): {exc}") from exc
        rows.append(row)
    return rows


def rollout_rows(rollout: Rollout) -> list[dict[str, Any]]:
    """One rollout version as ``ota_events`` rows: one per cohort, with the rollout's tenant (its
    target's organization, project and group), state,
    artifact version, target, current cohort and reason, the cohort's number of devices and
    how many of them are in each status (:data:`OTA_COUNT_COLUMNS`). A rollout not split into
    cohorts yet gives one row, cohort 0, with zero counts, so every transition is recorded."""
    target = rollout.target
    common = {
        "rollout_id": rollout.rollout_id,
        # The tenant of its rows: the target's (empty below the target's level).
        "org": target.org,
        "project": target.project or "",
        "group": target.group or "",
        "updated_at": rollout.updated_ms,
        "state": str(rollout.state),
        "version": rollout.artifact.version,
        "target": str(rollout.target),
        "current_cohort": rollout.cohort_index,
        "reason": rollout.reason,
    }
    rows = []
    for index, members in enumerate(rollout.cohorts or ((),)):
        counts = rollout.counts(index)
        row = {**common, "cohort": index, "devices": len(members)}
        for column, statuses in OTA_COUNT_COLUMNS.items():
            row[column] = sum(counts[status] for status in statuses)
        rows.append(row)
    return rows


def ota_events_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Decoded ``Rollout`` records as ``ota_events`` rows (:func:`rollout_rows` of each).

    Done here, not in the sink: the rollout is the OTA core's domain (``streams.ota``). The
    controller may write several versions of a rollout in one millisecond (same updated_ms,
    hence the same (rollout_id, cohort, updated_at) keys): of those in one batch only the last
    (the newest, in topic order) is kept, so the table never holds two states for one key.
    A record that does not decode raises :class:`InvalidBatch`, so the cold path dead-letters
    the batch.
    """
    latest: dict[tuple[str, int], Rollout] = {}
    for i, record in enumerate(records):
        try:
            rollout = rollout_from_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            rollout_id = record.get("rollout_id", "?")
            raise InvalidBatch(f"ota_events: record {i} (rollout {rollout_id!r}): {exc}") from exc
        key = (rollout.rollout_id, rollout.updated_ms)
        latest.pop(key, None)  # re-inserted: dicts keep insertion order, so topic order holds
        latest[key] = rollout
    return [row for rollout in latest.values() for row in rollout_rows(rollout)]


def origin_of(sources: Sequence[SourceRecord]) -> BatchOrigin:
    """Where a batch of one topic was read: what the Doris sink names its load by."""
    topic = sources[0].topic if sources else ""
    return BatchOrigin.of(topic, ((s.partition, s.offset) for s in sources))
