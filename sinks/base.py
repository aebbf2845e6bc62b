"""What every warehouse sink is: the interface the cold path, ``fleet sql`` and the demo use,
whichever warehouse is configured (ClickHouse/chDB in sinks/clickhouse.py, Apache Doris in
sinks/doris.py), the errors on its explicit channel, and where a batch came from.

A sink stores each batch exactly once (see ``queries/README.md``): ClickHouse with a content
token per insert plus ReplacingMergeTree, Doris with a Stream Load label derived from the
batch's Kafka offsets, two-phase commit, and the UNIQUE KEY model. The loader commits the
batch's Kafka offsets only after a write method returned, so a write method returns only once
its rows are committed in the warehouse.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self, TypeAlias

import pyarrow as pa

from queries.migrations import Migration
from queries.result import QueryResult
from sinks.warehouse_tables import (
    ALERTS_TABLE,
    EVENTS_TABLE,
    OTA_EVENTS_TABLE,
    QUARANTINE_TABLE,
    TELEMETRY_TABLE,
    TWIN_HISTORY_TABLE,
    Columns,
)

__all__ = [
    "ALERTS_TABLE",
    "EVENTS_TABLE",
    "OTA_EVENTS_TABLE",
    "QUARANTINE_TABLE",
    "TELEMETRY_TABLE",
    "TWIN_HISTORY_TABLE",
    "BatchOrigin",
    "ClosesOnExit",
    "Dialect",
    "InvalidBatch",
    "OffsetRange",
    "QueryFailed",
    "QueryLimitExceeded",
    "Record",
    "SinkError",
    "SinkUnavailable",
    "WarehouseSink",
    "WriteResult",
]

Record: TypeAlias = Mapping[str, Any]
# The SQL a warehouse speaks: its analyst queries are queries/<name>.sql (ClickHouse) and
# queries/doris/<name>.sql.
Dialect: TypeAlias = Literal["clickhouse", "doris"]


class ClosesOnExit:
    """A resource used as ``with resource:`` that closes it on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SinkError(Exception):
    """The warehouse refused or failed an operation."""


class SinkUnavailable(SinkError):
    """The warehouse cannot be reached or written now; retry the same batch after a pause.

    Nothing is lost by retrying: either the batch was not stored, or its insert token (its
    Stream Load label, for Doris) makes the retry a no-op.
    """


class InvalidBatch(SinkError, ValueError):
    """Records that cannot become the table's columns (a missing key, a wrong type), or that
    the warehouse refuses as data (retrying will not help: the batch is dead-lettered)."""


class QueryFailed(SinkError):
    """A read the warehouse rejected (SQL error, unknown table, bad parameter)."""


class QueryLimitExceeded(QueryFailed):
    """A read stopped at one of its limits (time, memory, result size)."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    table: str
    rows: int
    token: str  # ClickHouse: the insert deduplication token; Doris: the Stream Load label


@dataclass(frozen=True, slots=True)
class OffsetRange:
    partition: int
    first: int
    last: int


_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Doris labels: at most 128 characters of [A-Za-z0-9_-] (and ':'); unique per database.
LABEL_MAX: Final = 128


@dataclass(frozen=True, slots=True)
class BatchOrigin:
    """Where a batch of one topic was read: per partition, the first and last offset of the
    records handed to the sink. The same Kafka batch re-read after a crash has the same origin,
    so a label derived from it names the batch whatever its content's order."""

    topic: str
    ranges: tuple[OffsetRange, ...]

    @classmethod
    def of(cls, topic: str, offsets: Iterable[tuple[int, int]]) -> BatchOrigin:
        """From (partition, offset) pairs (in any order)."""
        spans: dict[int, tuple[int, int]] = {}
        for partition, offset in offsets:
            first, last = spans.get(partition, (offset, offset))
            spans[partition] = (min(first, offset), max(last, offset))
        ranges = tuple(OffsetRange(p, f, la) for p, (f, la) in sorted(spans.items()))
        return cls(topic, ranges)

    def label(self, table: str) -> str:
        """The Stream Load label of this batch's load into ``table``: readable
        (``fleet_<table>_<topic>_p<partition>_<first>_<last>``) when it fits in
        :data:`LABEL_MAX`, else its readable head and a sha256 of the whole origin."""
        topic = _LABEL_UNSAFE.sub("_", self.topic)
        spans = "_".join(f"p{r.partition}_{r.first}_{r.last}" for r in self.ranges)
        label = f"fleet_{table}_{topic}_{spans}"
        if len(label) <= LABEL_MAX:
            return label
        digest = hashlib.sha256(f"{table}\0{self.topic}\0{spans}".encode()).hexdigest()[:40]
        return f"{label[: LABEL_MAX - len(digest) - 1]}_{digest}"


class WarehouseSink(Protocol):
    """The sink interface: what the cold path, ``fleet sql``, the demo summary and the
    migrations use, implemented by :class:`sinks.clickhouse.ClickHouseSink` and
    :class:`sinks.doris.DorisSink`. ``origin`` is where the batch was read in Kafka (the
    Doris sink derives its Stream Load label from it; ClickHouse hashes the content instead)."""

    @property
    def dsn(self) -> str: ...

    @property
    def dialect(self) -> Dialect: ...

    def ensure_schema(self) -> tuple[Migration, ...]: ...

    def write(
        self,
        table: str,
        rows: Sequence[Record],
        origin: BatchOrigin | None = None,
        tenants: Columns | None = None,
    ) -> WriteResult:
        """Store ``rows`` (dicts as the Avro codec decodes them, with ``table``'s columns) and
        ``tenants``' columns (the org, project and group of each row; without: the rows' own,
        else empty), exactly once; returns once they are committed in the warehouse."""
        ...

    def write_arrow(
        self, table: str, batch: pa.Table, origin: BatchOrigin | None = None
    ) -> WriteResult:
        """Store an Arrow table with ``table``'s columns (the quality gate's good and refused
        rows), exactly once like the other writes."""
        ...

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run one of the platform's own statements in this warehouse's dialect (never a
        caller's text); a single-value answer is returned."""
        ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult: ...

    def count_stored(self, table: str = TELEMETRY_TABLE, device_prefix: str = "") -> int: ...

    def count_duplicates(self, table: str = TELEMETRY_TABLE, device_prefix: str = "") -> int: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...
