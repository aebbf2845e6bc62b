"""twin.state -> twin_history without services: rows with their delta, the Arrow columns, the
dedup token, and a malformed twin state going to the dead-letter topic."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.codec import AvroCodec, Decoded, load_schema
from sinks.clickhouse import (
    TWIN_HISTORY_SCHEMA,
    TWIN_HISTORY_TABLE,
    InvalidBatch,
    dedup_token,
    table_to_arrow,
    telemetry_to_arrow,
)
from streams.cold.loader import SOURCES
from streams.cold.rows import twin_history_rows
from streams.hot.twin import Accepted, Twin, apply_desired, apply_reported, to_record
from streams.runtime.loader import LoaderCounters, LoadPath
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.transactions import Backoff

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in epoch ms
CODEC = AvroCodec(load_schema("TwinState"), schema_id=11)


def history() -> list[Twin]:
    """One device's twins, version by version: desired set, partly reported, converged."""
    twins = [Twin("pump-1")]
    steps = [
        lambda t: apply_desired(t, {"cfg": {"rate": 2, "mode": "eco"}, "fw": "1.2"}, None, T0),
        lambda t: apply_reported(t, {"cfg": {"rate": 2, "mode": "off"}}, 7, T0 + 1000),
        lambda t: apply_reported(t, {"cfg": {"mode": "eco"}, "fw": "1.2"}, 8, T0 + 2000),
    ]
    for step in steps:
        result = step(twins[-1])
        assert isinstance(result, Accepted)
        assert result.changed
        twins.append(result.twin)
    return twins[1:]


def records() -> list[dict[str, Any]]:
    return [to_record(twin) for twin in history()]


def test_twin_history_is_the_cold_paths_fourth_source() -> None:
    assert SOURCES[TWIN_HISTORY_TABLE] == ("twin.state", "TwinState")


def test_each_twin_state_becomes_a_row_with_its_delta() -> None:
    rows = twin_history_rows(records())
    assert [(r["version"], r["delta_keys"]) for r in rows] == [(1, 2), (2, 2), (3, 0)]
    first, second, last = rows
    assert json.loads(first["delta"]) == {"cfg": {"mode": "eco", "rate": 2}, "fw": "1.2"}
    # Nested objects are compared key by key: only the differing key is in the delta.
    assert json.loads(second["delta"]) == {"cfg": {"mode": "eco"}, "fw": "1.2"}
    assert last["delta"] == "{}"
    assert (first["last_reported_seq"], second["last_reported_seq"]) == (-1, 7)
    assert (first["updated_at"], last["updated_at"]) == (T0, T0 + 2000)
    assert second["desired"] == '{"cfg":{"mode":"eco","rate":2},"fw":"1.2"}'
    assert second["reported"] == '{"cfg":{"mode":"off","rate":2}}'


def test_rows_become_the_table_columns() -> None:
    table = table_to_arrow(TWIN_HISTORY_TABLE, twin_history_rows(records()))
    assert table.schema == TWIN_HISTORY_SCHEMA
    assert table.column("device_id").to_pylist() == ["pump-1"] * 3
    assert table.column("version").to_pylist() == [1, 2, 3]
    assert table.column("delta_keys").to_pylist() == [2, 2, 0]
    assert table.column("last_reported_seq").to_pylist() == [-1, 7, 8]
    assert table.column("updated_at").to_pylist()[0] == datetime(2026, 1, 1, tzinfo=UTC)
    assert table_to_arrow(TWIN_HISTORY_TABLE, []).num_rows == 0


def test_decoded_avro_converts_too() -> None:
    decoded = []
    for record in records():
        result = CODEC.decode(CODEC.encode(record))
        assert isinstance(result, Decoded)
        decoded.append(result.record)
    table = table_to_arrow(TWIN_HISTORY_TABLE, twin_history_rows(decoded))
    assert table.column("delta").to_pylist()[-1] == "{}"
    never_changed = to_record(Twin("idle-1"))  # version 0, updated_at 0, nothing reported
    (row,) = twin_history_rows([never_changed])
    assert (row["version"], row["delta"], row["delta_keys"], row["last_reported_seq"]) == (
        0,
        "{}",
        0,
        -1,
    )


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"desired": "{not json"}, "record 1 .* desired: not JSON"),
        ({"reported": "[1, 2]"}, "record 1 .* reported must be a JSON object"),
        # Python's json reads NaN; the warehouse gets strict JSON only.
        ({"desired": '{"a": NaN}'}, "record 1 .* not JSON compliant"),
        ({"version": -1}, "column version"),  # not a UInt64
    ],
)
def test_a_malformed_twin_state_refuses_the_batch(broken: dict[str, Any], reason: str) -> None:
    batch = records()
    batch[1] = {**batch[1], **broken}
    with pytest.raises(InvalidBatch, match=reason):
        table_to_arrow(TWIN_HISTORY_TABLE, twin_history_rows(batch))


def test_the_token_names_twin_versions_in_any_order() -> None:
    rows = twin_history_rows(records())
    token = dedup_token(TWIN_HISTORY_TABLE, table_to_arrow(TWIN_HISTORY_TABLE, rows))
    assert token.startswith("twin_history-")
    assert dedup_token(TWIN_HISTORY_TABLE, table_to_arrow(TWIN_HISTORY_TABLE, rows[::-1])) == token
    assert dedup_token(TWIN_HISTORY_TABLE, table_to_arrow(TWIN_HISTORY_TABLE, rows[:2])) != token
    # A version re-published with only last_reported_seq advanced is not a re-delivery.
    advanced = [*rows[:2], {**rows[2], "last_reported_seq": 9}]
    assert dedup_token(TWIN_HISTORY_TABLE, table_to_arrow(TWIN_HISTORY_TABLE, advanced)) != token


def test_telemetry_tokens_are_unchanged() -> None:
    # Tokens of batches stored before twin_history existed: a re-delivery across the upgrade
    # must still be recognised.
    batch = [
        {"device_id": f"d-{i % 3}", "seq": i, "ts": T0 + i, "received_at": T0 + i} for i in range(7)
    ]
    assert dedup_token("telemetry", telemetry_to_arrow(batch)) == (
        "telemetry-021c9be097122c6f997943a06144a93c4d58e4f473e0cd9a03d9bd38cddb0da8"
    )


def test_a_malformed_twin_state_sends_its_batch_to_the_dead_letter_topic() -> None:
    good = records()
    bad = {**good[1], "desired": "{not json"}
    batch = [
        SourceRecord("twin.state", 0, offset, b"pump-1", CODEC.encode(record))
        for offset, record in enumerate([good[0], bad, good[2]])
    ]
    written: list[int] = []
    dead: list[DeadLetter] = []

    async def write(decoded: list[dict[str, Any]]) -> None:
        written.append(table_to_arrow(TWIN_HISTORY_TABLE, twin_history_rows(decoded)).num_rows)

    async def dead_letter(items: list[DeadLetter]) -> None:
        dead.extend(items)

    path = LoadPath(
        TWIN_HISTORY_TABLE,
        CODEC,
        write,
        dead_letter,
        (),
        LoaderCounters(),
        rejected=(InvalidBatch,),
        backoff=Backoff(first=0.001, longest=0.001),
    )
    asyncio.run(path.store_batch(batch))
    assert written == []
    assert [(d.source.offset, d.reason) for d in dead] == [
        (0, "sink_rejected"),
        (1, "sink_rejected"),
        (2, "sink_rejected"),
    ]
    assert "record 1" in dead[0].detail

    dead.clear()
    asyncio.run(path.store_batch([batch[0], batch[2]]))
    assert (written, dead) == ([2], [])
