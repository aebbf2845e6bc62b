"""ota_events rows: one per (rollout, cohort) per rollout version, counts per progress status."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sinks.clickhouse import (
    OTA_EVENTS_SCHEMA,
    OTA_EVENTS_TABLE,
    InvalidBatch,
    dedup_token,
    table_to_arrow,
)
from streams.cold.loader import SOURCES
from streams.cold.rows import OTA_COUNT_COLUMNS, ota_events_rows, rollout_rows
from streams.ota.model import OtaStatus, Progress, RolloutState, to_record
from tests.unit.streams.ota.test_ota import NEW, T0, TARGET, Harness, fleet

COUNTS = list(OTA_COUNT_COLUMNS)


def counts(row: dict[str, object]) -> dict[str, object]:
    return {column: row[column] for column in COUNTS if row[column]}


def test_the_topic_and_schema_of_ota_events() -> None:
    assert SOURCES[OTA_EVENTS_TABLE] == ("ota.rollouts", "Rollout")
    # Every progress status is counted in exactly one column.
    counted = [status for statuses in OTA_COUNT_COLUMNS.values() for status in statuses]
    assert sorted(counted) == sorted(Progress)
    assert set(OTA_COUNT_COLUMNS) < set(OTA_EVENTS_SCHEMA.names)


def test_a_rollout_without_cohorts_is_one_row_of_zeros() -> None:
    h = Harness(fleet(10))
    h.create()
    (row,) = rollout_rows(h.r)
    assert row == {
        "rollout_id": "ro-1",
        # The rows' tenant is the target's (a group here).
        "org": TARGET.org,
        "project": TARGET.project,
        "group": TARGET.group,
        "updated_at": T0,
        "state": "pending_approval",
        "version": NEW,
        "target": str(TARGET),
        "current_cohort": -1,
        "reason": None,
        "cohort": 0,
        "devices": 0,
        **dict.fromkeys(COUNTS, 0),
    }


def test_one_row_per_cohort_with_its_counts() -> None:
    h = Harness(fleet(10))
    h.start()
    canary = h.r.current_cohort
    h.tick(1)
    h.succeed(canary[:1])
    h.report(canary[1], OtaStatus.verifying)
    rows = rollout_rows(h.r)
    assert [(r["cohort"], r["devices"]) for r in rows] == [(0, 2), (1, 3), (2, 5)]
    assert {r["state"] for r in rows} == {"running"}
    assert {r["current_cohort"] for r in rows} == {0}
    assert {r["updated_at"] for r in rows} == {T0 + 1000}
    assert [counts(r) for r in rows] == [
        {"succeeded": 1, "in_progress": 1},
        {"planned": 3},
        {"planned": 5},
    ]
    # Decoded from its Avro record, the rollout gives the same rows.
    assert ota_events_rows([to_record(h.r)]) == rows
    table = table_to_arrow(OTA_EVENTS_TABLE, rows)
    assert table.schema == OTA_EVENTS_SCHEMA
    assert table.num_rows == 3


def test_a_rollback_is_counted_per_cohort() -> None:
    h = Harness(fleet(10))
    h.start()
    canary = h.r.current_cohort
    h.tick(1)
    h.report(canary[0], OtaStatus.installing)
    h.report(canary[1], OtaStatus.failed, reason="boom")
    assert h.state() is RolloutState.rolling_back
    rows = rollout_rows(h.r)
    assert counts(rows[0]) == {"failed": 1, "rollback_sent": 1}
    assert rows[0]["state"] == "rolling_back"
    assert counts(rows[1]) == {"planned": 3}


def test_versions_of_one_millisecond_keep_the_last_of_the_batch() -> None:
    h = Harness(fleet(10))
    h.start()
    first = to_record(h.r)
    h.report(h.r.current_cohort[0], OtaStatus.downloading)  # same now_ms
    second = to_record(h.r)
    assert first["updated_ms"] == second["updated_ms"]
    rows = ota_events_rows([first, second])
    assert rows == ota_events_rows([second])
    assert counts(rows[0]) == {"sent": 1, "in_progress": 1}
    # A later batch with that version still gets its own token (its counts differ).
    tokens = {
        dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, ota_events_rows([r])))
        for r in (first, second)
    }
    assert len(tokens) == 2


def test_the_token_names_the_rows_not_their_order() -> None:
    h = Harness(fleet(10))
    h.start()
    rows = rollout_rows(h.r)
    token = dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, rows))
    assert token.startswith("ota_events-")
    assert dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, rows[::-1])) == token
    assert dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, rows[:2])) != token
    other = [{**r, "rollout_id": "ro-2"} for r in rows]
    assert dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, other)) != token
    paused = [{**r, "state": "paused"} for r in rows]
    assert dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, paused)) != token
    later = rollout_rows(replace(h.r, updated_ms=h.r.updated_ms + 1))
    assert dedup_token(OTA_EVENTS_TABLE, table_to_arrow(OTA_EVENTS_TABLE, later)) != token


def test_a_record_that_does_not_decode_is_an_invalid_batch() -> None:
    h = Harness(fleet(4))
    h.start()
    good = to_record(h.r)
    bad = {**good, "state": "exploded"}
    with pytest.raises(InvalidBatch, match="record 1 \\(rollout 'ro-1'\\)"):
        ota_events_rows([good, bad])
    with pytest.raises(InvalidBatch, match="rollout '\\?'"):
        ota_events_rows([{"state": "running"}])
