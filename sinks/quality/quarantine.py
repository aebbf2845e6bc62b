"""The ``quarantine`` table (queries/ddl/008_quarantine.sql; on Doris, sinks/doris_ddl.py):
what the gate refused, and the way back into ``telemetry`` (``fleet quality release``).

Writes follow telemetry's exactly-once design in either warehouse: ClickHouse, an insert
deduplication token hashing the rows' (device_id, seq) and a ReplacingMergeTree on (device_id,
seq) read FINAL; Doris, a Stream Load label from the batch's offsets and keys and a UNIQUE KEY
on (device_id, seq). Its reads for ``fleet quality`` and the demo are queries/quarantine*.sql.
A release copies the chosen rows into ``telemetry`` (deduplicated there like any re-sent
message), then marks them ``released = 1`` by inserting that copy (the engine's version column
keeps it): re-running a release, or running it after a crash between the two steps, is a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import pyarrow as pa

from sinks.base import QUARANTINE_TABLE, BatchOrigin, Dialect, WriteResult
from sinks.clickhouse import TELEMETRY_SCHEMA
from sinks.quality.gate import QUARANTINE_FIELDS

__all__ = [
    "QUARANTINE_SCHEMA",
    "Quarantine",
    "ReleaseFilter",
    "ReleaseStatements",
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


@dataclass(frozen=True, slots=True)
class ReleaseStatements:
    """A release's statements in one warehouse's dialect, built from constants only (no
    caller text: the filter's values are bound by the server). They differ only in how a
    table is read deduplicated: ``FINAL`` in ClickHouse; Doris's UNIQUE KEY tables need no
    keyword. Both keep the released copy by the version/sequence column ``released``."""

    pending: str
    to_telemetry: str
    mark_released: str

    @classmethod
    def of(cls, dialect: Dialect) -> ReleaseStatements:
        source = "quarantine FINAL" if dialect == "clickhouse" else "quarantine"
        quarantined = " FROM " + source + " WHERE " + _FILTER
        return cls(
            pending="SELECT count(*)" + quarantined,
            to_telemetry="INSERT INTO telemetry (" + _TELEMETRY_COLUMNS + ") "
            "SELECT " + _TELEMETRY_COLUMNS + quarantined,
            mark_released="INSERT INTO quarantine (" + _TELEMETRY_COLUMNS + ", stored_at, rule, "
            "reason, batch_id, released) SELECT " + _TELEMETRY_COLUMNS + ", stored_at, rule, "
            "reason, batch_id, 1" + quarantined,
        )


class Warehouse(Protocol):
    """What the quarantine needs of a sink (sinks.base.WarehouseSink fits)."""

    @property
    def dialect(self) -> Dialect: ...

    def write_arrow(
        self, table: str, batch: pa.Table, origin: BatchOrigin | None = None
    ) -> WriteResult: ...

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
        self._sql = ReleaseStatements.of(sink.dialect)

    def write(self, bad: pa.Table, batch: str, origin: BatchOrigin | None = None) -> WriteResult:
        """Store refused rows (exactly once: see the module doc)."""
        return self._sink.write_arrow(QUARANTINE_TABLE, quarantine_rows(bad, batch), origin)

    def release(self, which: ReleaseFilter) -> int:
        """Move the quarantined rows ``which`` names into telemetry; returns how many were
        pending. Call it where writes are serialised (the cold worker's writer thread, or a
        process owning the warehouse alone)."""
        params = which.params()
        pending = int(self._sink.command(self._sql.pending, params))
        if pending:
            self._sink.command(self._sql.to_telemetry, params)
            self._sink.command(self._sql.mark_released, params)
        return pending
