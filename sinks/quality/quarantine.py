"""The ``quarantine`` table (queries/ddl/008_quarantine.sql): what the gate refused, and the way
back into ``telemetry`` (``fleet quality release``).

Writes follow telemetry's exactly-once design (sinks/clickhouse.py): an insert deduplication
token hashing the rows' (device_id, seq), a ReplacingMergeTree on (device_id, seq) read FINAL.
A release copies the chosen rows into ``telemetry`` (deduplicated there like any re-sent
message), then marks them ``released = 1`` by inserting that copy (the engine's version column
keeps it): re-running a release, or running it after a crash between the two steps, is a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import pyarrow as pa

from sinks.clickhouse import QUARANTINE_TABLE, TELEMETRY_SCHEMA, WriteResult
from sinks.quality.gate import QUARANTINE_FIELDS

__all__ = [
    "PENDING_BY_RULE_SQL",
    "QUARANTINED_SQL",
    "QUARANTINE_SCHEMA",
    "Quarantine",
    "ReleaseFilter",
    "batch_id",
    "quarantine_rows",
]

QUARANTINE_SCHEMA: Final = pa.schema(
    [*TELEMETRY_SCHEMA, *QUARANTINE_FIELDS, pa.field("batch_id", pa.string(), nullable=False)]
)
_TELEMETRY_COLUMNS = (
    "device_id, seq, ts, received_at, temperature, humidity, battery, vibration_rms, extra, "
    "org, project, `group`"
)
_FILTER = (
    "released = 0 AND ({rule:String} = '' OR rule = {rule:String}) "
    "AND ({device:String} = '' OR device_id = {device:String})"
)
# Built from constants only (no caller text): the filter is bound by the server.
PENDING_SQL: Final = "SELECT count() FROM quarantine FINAL WHERE " + _FILTER  # noqa: S608
RELEASE_TO_TELEMETRY_SQL: Final = (
    "INSERT INTO telemetry (" + _TELEMETRY_COLUMNS + ") "  # noqa: S608
    "SELECT " + _TELEMETRY_COLUMNS + " FROM quarantine FINAL WHERE " + _FILTER
)
MARK_RELEASED_SQL: Final = (
    "INSERT INTO quarantine (" + _TELEMETRY_COLUMNS + ", stored_at, rule, reason, batch_id, "
    "released) SELECT " + _TELEMETRY_COLUMNS + ", stored_at, rule, reason, batch_id, 1 "
    "FROM quarantine FINAL WHERE " + _FILTER
)
# Messages held in quarantine (not released, and not in telemetry either: a conflicting copy
# of a stored message is quarantined under `duplicate` but was not lost), of devices with a
# prefix: `fleet demo`'s "quarantined", so that stored + quarantined == published.
QUARANTINED_SQL: Final = (
    "SELECT uniqExact(device_id, seq) FROM quarantine FINAL "
    "WHERE released = 0 AND startsWith(device_id, {device_prefix:String}) "
    "AND (device_id, seq) NOT IN (SELECT device_id, seq FROM telemetry "
    "WHERE startsWith(device_id, {device_prefix:String}))"
)
PENDING_BY_RULE_SQL: Final = (
    "SELECT rule, count() AS rows FROM quarantine FINAL WHERE released = 0 "
    "GROUP BY rule ORDER BY rule"
)


class Warehouse(Protocol):
    """What the quarantine needs of a sink: a ClickHouseSink fits."""

    def write_arrow(self, table: str, batch: pa.Table) -> WriteResult: ...

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class ReleaseFilter:
    """Which quarantined rows a release moves: every one, or those of a rule and/or device."""

    rule: str = ""
    device: str = ""

    def params(self) -> dict[str, str]:
        return {"rule": self.rule, "device": self.device}


def batch_id(where: Sequence[tuple[str, int, int]]) -> str:
    """A batch named by its Kafka records: ``topic/partition:first-last`` per partition read,
    from (topic, partition, offset) of each record."""
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for topic, partition, offset in where:
        low, high = ranges.get((topic, partition), (offset, offset))
        ranges[(topic, partition)] = (min(low, offset), max(high, offset))
    return ",".join(f"{t}/{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(ranges.items()))


def quarantine_rows(bad: pa.Table, batch: str) -> pa.Table:
    """The gate's refused rows (:attr:`sinks.quality.gate.Verdict.bad`) as ``quarantine``'s
    columns, with the batch id."""
    ids = pa.array([batch] * len(bad), pa.string())
    table = bad.append_column(QUARANTINE_SCHEMA.field("batch_id"), ids)
    return table.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


class Quarantine:
    """The quarantine table of one warehouse."""

    def __init__(self, sink: Warehouse) -> None:
        self._sink = sink

    def write(self, bad: pa.Table, batch: str) -> WriteResult:
        """Store refused rows (exactly once: see the module doc)."""
        return self._sink.write_arrow(QUARANTINE_TABLE, quarantine_rows(bad, batch))

    def release(self, which: ReleaseFilter) -> int:
        """Move the quarantined rows ``which`` names into telemetry; returns how many were
        pending. Call it where writes are serialised (the cold worker's writer thread, or a
        process owning the warehouse alone)."""
        params = which.params()
        pending = int(self._sink.command(PENDING_SQL, params))
        if pending:
            self._sink.command(RELEASE_TO_TELEMETRY_SQL, params)
            self._sink.command(MARK_RELEASED_SQL, params)
        return pending
