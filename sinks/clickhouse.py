"""The ClickHouse warehouse sink: embedded chDB (``chdb:///dir``) or a server (``http(s)://``).

Both go through clickhouse-connect, so the code is the same. Writes are columnar: a batch
of decoded Avro records becomes a pyarrow Table column by column and is sent with
``insert_arrow``. Exactly-once has two layers (see ``queries/README.md``):

1. each insert carries ``insert_deduplication_token`` = a hash of the table name and the
   batch's sorted (device_id, seq) keys, and the tables keep a deduplication window, so a
   re-delivered batch is dropped by ClickHouse at insert;
2. the tables are ReplacingMergeTree ORDER BY (device_id, seq), so a message re-sent in a
   different batch is one row after merges, and every read goes through ``FINAL``.

``twin_history`` follows the same design on (device_id, version) (its token also hashes
last_reported_seq, see :data:`TOKEN_KEYS`), ``ota_events`` on (rollout_id, cohort,
updated_at) (see :data:`TOKEN_ID_COLUMN`).

Errors are typed for the caller's retry loop: :class:`SinkUnavailable` means "nothing was
stored, or a re-send is a no-op: back off and retry the same batch"; :class:`InvalidBatch`
means the records cannot be converted (retrying will not help); :class:`QueryFailed` is a
SQL error in a read.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import clickhouse_connect
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError

from queries.migrations import (
    APPLIED_SQL,
    MIGRATIONS_DDL,
    RECORD_SQL,
    Migration,
    load_migrations,
    pending_migrations,
)
from queries.result import OUTPUT_FORMATS, QueryResult, RawResult
from queries.sqltext import NotReadOnly
from sinks.base import (
    BatchOrigin,
    ClosesOnExit,
    Dialect,
    InvalidBatch,
    QueryFailed,
    QueryLimitExceeded,
    Record,
    SinkError,
    SinkUnavailable,
    WriteResult,
)
from sinks.row_filters import EVERY_ROW, ReadScope, table_filters
from sinks.sql_guard import Checked, Refused, check_query, format_query_sql
from sinks.warehouse_tables import (
    ALERTS_SCHEMA,
    ALERTS_TABLE,
    ARROW_SCHEMAS,
    DEDUPLICATED_TABLES,
    EVENT_SCHEMA,
    EVENTS_TABLE,
    OTA_EVENTS_SCHEMA,
    OTA_EVENTS_TABLE,
    QUARANTINE_TABLE,
    TELEMETRY_SCHEMA,
    TELEMETRY_TABLE,
    TENANT_COLUMNS,
    TENANT_TABLES,
    TOKEN_ID_COLUMN,
    TOKEN_KEYS,
    TWIN_HISTORY_SCHEMA,
    TWIN_HISTORY_TABLE,
    Columns,
)

__all__ = [
    "ALERTS_SCHEMA",
    "ALERTS_TABLE",
    "EVENTS_TABLE",
    "EVENT_SCHEMA",
    "OTA_EVENTS_SCHEMA",
    "OTA_EVENTS_TABLE",
    "QUARANTINE_TABLE",
    "TELEMETRY_SCHEMA",
    "TELEMETRY_TABLE",
    "TENANT_COLUMNS",
    "TENANT_TABLES",
    "TWIN_HISTORY_SCHEMA",
    "TWIN_HISTORY_TABLE",
    "ClickHouseSink",
    "InvalidBatch",
    "QueryFailed",
    "QueryLimitExceeded",
    "ReadLimits",
    "SinkError",
    "SinkUnavailable",
    "WriteResult",
    "dedup_token",
    "normalize_dsn",
    "table_to_arrow",
    "telemetry_to_arrow",
]

Role: TypeAlias = Literal["read", "write"]

# ClickHouse error codes that say "not now" rather than "never": the batch is retried.
TRANSIENT_CODES: Final = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS (merges behind)
        285,  # TOO_FEW_LIVE_REPLICAS
        319,  # UNKNOWN_STATUS_OF_INSERT
        425,  # SYSTEM_ERROR
        999,  # KEEPER_EXCEPTION
        1000,  # POCO_EXCEPTION
    }
)

INSERT_SETTINGS: Final[Mapping[str, Any]] = {
    # A device with a broken clock must not fail the whole batch (TOO_MANY_PARTS would be
    # retried forever): write the extra partitions and let ClickHouse log a warning.
    "throw_on_max_partitions_per_insert_block": 0,
}
# The read path: enforced read-only, FINAL applied to every table that supports it (so an
# ad-hoc `SELECT count() FROM telemetry` is exact before merges too).
READ_SETTINGS: Final[Mapping[str, Any]] = {"readonly": 2, "final": 1}
# Errors of a read that hit one of its limits: the caller's query, not the warehouse, is at fault.
LIMIT_CODES: Final = frozenset(
    {
        158,  # TOO_MANY_ROWS
        159,  # TIMEOUT_EXCEEDED
        160,  # TOO_SLOW
        164,  # READONLY (a setting the caller tried to change)
        241,  # MEMORY_LIMIT_EXCEEDED
        307,  # TOO_MANY_BYTES
        396,  # TOO_MANY_ROWS_OR_BYTES
    }
)

_FIRST_WORD_SELECT = re.compile(r"[\s(]*(SELECT|WITH)\b", re.IGNORECASE)

STORED_SQL: Final = (
    "SELECT uniqExact(device_id, seq) FROM {table:Identifier} "
    "WHERE startsWith(device_id, {device_prefix:String})"
)
DUPLICATES_SQL: Final = (
    "SELECT count() FROM (SELECT device_id, seq FROM {table:Identifier} FINAL "
    "WHERE startsWith(device_id, {device_prefix:String}) "
    "GROUP BY device_id, seq HAVING count() > 1)"
)


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """What one read may use. Set on each read connection, then ``readonly=1`` (embedded) so
    that no query, and no SETTINGS clause, can change them."""

    timeout_s: float = 300.0
    max_memory_bytes: int = 2 << 30
    max_result_rows: int = 1_000_000
    max_result_bytes: int = 512 << 20
    max_threads: int = 2  # leave the cold path its share of these machines' cores

    def settings(self, embedded: bool, scope: ReadScope = EVERY_ROW) -> dict[str, Any]:
        """The connection settings, in order: ``readonly`` last, or setting the others fails.
        ``scope``: the caller's row filters (``additional_table_filters``) and FINAL or not.

        A ClickHouse server gets ``readonly=2`` (its HTTP interface sends every setting with
        each query); the statement guard refuses SETTINGS clauses there.
        """
        filters = (
            {}
            if scope.scopes is None
            else {"additional_table_filters": table_filters(scope.scopes)}
        )
        return {
            **filters,
            "final": int(scope.final),
            "max_execution_time": max(1, math.ceil(self.timeout_s)),
            "max_memory_usage": self.max_memory_bytes,
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            "max_threads": self.max_threads,
            "readonly": 1 if embedded else 2,
        }


# --- records -> Arrow (pure) ---------------------------------------------------------------


def _column(records: Sequence[Record], field: pa.Field, get: Callable[[Record], Any]) -> pa.Array:
    try:
        values = [get(record) for record in records]
        array = pa.array(values, type=field.type)
    except (KeyError, TypeError, ValueError, OverflowError, pa.ArrowException) as exc:
        raise InvalidBatch(f"column {field.name}: {exc!r}") from exc
    if not field.nullable and array.null_count:
        raise InvalidBatch(f"column {field.name}: {array.null_count} null value(s)")
    return array


def _getter(field: pa.Field) -> Callable[[Record], Any]:
    name: str = field.name
    if name in TENANT_COLUMNS:  # a row not told its tenant has none (only the platform sees it)
        return lambda record: record.get(name) or ""
    if isinstance(field.type, pa.MapType):
        return lambda record: record.get(name) or {}
    if field.nullable:
        return lambda record: record.get(name)
    return lambda record: record[name]


def _given(field: pa.Field, values: Sequence[Any], rows: int) -> pa.Array:
    if len(values) != rows:
        raise InvalidBatch(f"column {field.name}: {len(values)} values for {rows} rows")
    try:
        array = pa.array(values, type=field.type)
    except (TypeError, ValueError, OverflowError, pa.ArrowException) as exc:
        raise InvalidBatch(f"column {field.name}: {exc!r}") from exc
    if not field.nullable and array.null_count:
        raise InvalidBatch(f"column {field.name}: {array.null_count} null value(s)")
    return array


def records_to_arrow(
    records: Sequence[Record], schema: pa.Schema, given: Columns | None = None
) -> pa.Table:
    """``records`` (dicts as the Avro codec decodes them) as a Table of ``schema``; the
    columns in ``given`` (the batch's tenants, say) are taken from there, one value a row."""
    given = given or {}
    # Arrow converts the record fields itself (a quarter of the cost of a column at a time in
    # Python); a field it refuses or finds missing where required goes column-wise, which
    # converts it or names it in the error. Given and tenant columns are filled in Python.
    python_side = {f.name for f in schema if f.name in given or f.name in TENANT_COLUMNS}
    converted = _converted(records, pa.schema([f for f in schema if f.name not in python_side]))
    columns = [
        converted.column(field.name)
        if converted is not None and field.name not in python_side
        else _given(field, given[field.name], len(records))
        if field.name in given
        else _column(records, field, _getter(field))
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _converted(records: Sequence[Record], schema: pa.Schema) -> pa.Table | None:
    """``records`` as ``schema``'s columns by Arrow, or None if a value needs a closer look."""
    try:
        table = pa.Table.from_pylist(list(records), schema=schema)
    except (TypeError, ValueError, OverflowError, pa.ArrowException):
        return None
    if any(not field.nullable and table.column(field.name).null_count for field in schema):
        return None
    return table


def table_to_arrow(table: str, rows: Sequence[Record], tenants: Columns | None = None) -> pa.Table:
    """Rows of ``table`` (one of :data:`ARROW_SCHEMAS`) as its columns. The rows of
    ``twin_history`` and ``ota_events`` are computed from decoded records by the cold worker
    (``streams.cold.rows``): that is the stream layer's domain, and the sink imports nothing
    from it."""
    schema = ARROW_SCHEMAS.get(table)
    if schema is None:
        raise ValueError(f"no row schema for {table!r}; expected one of {sorted(ARROW_SCHEMAS)}")
    return records_to_arrow(rows, schema, tenants)


def telemetry_to_arrow(records: Sequence[Record], tenants: Columns | None = None) -> pa.Table:
    """Decoded ``Telemetry`` records as the columns of the ``telemetry`` table (``tenants``:
    the org, project and group columns of the batch)."""
    return table_to_arrow(TELEMETRY_TABLE, records, tenants)


def _hash_strings(digest: Any, column: pa.Array) -> None:
    """Feed a string column to ``digest``: each value's length, then the bytes."""
    strings = column.cast(pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], dtype="<i8")
    offsets = offsets[strings.offset : strings.offset + len(strings) + 1]
    data = strings.buffers()[2]
    digest.update(np.diff(offsets).astype("<i8").tobytes())
    if data is not None:
        digest.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])


def dedup_token(table: str, batch: pa.Table) -> str:
    """A token naming the batch's content: the table and its sorted key columns (device_id,
    or the table's :data:`TOKEN_ID_COLUMN`, then :data:`TOKEN_KEYS`: ``seq`` for messages).

    (device_id, seq) identifies a message, so two batches with the same keys hold the same
    messages: the token does not depend on row order or on how the columns are chunked.
    """
    names = [TOKEN_ID_COLUMN.get(table, "device_id"), *TOKEN_KEYS.get(table, ("seq",))]
    keys = batch.select(names)
    order = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in names])
    digest = hashlib.sha256(f"fleetstream/v1/{table}\0{len(batch)}\0".encode())
    if len(batch):
        for name in names:
            column = pc.take(keys.column(name), order).combine_chunks()
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                _hash_strings(digest, column)
                continue
            wide = "<u8" if pa.types.is_unsigned_integer(column.type) else "<i8"
            if pa.types.is_timestamp(column.type):
                column = column.cast(pa.int64())
            digest.update(column.to_numpy(zero_copy_only=False).astype(wide).tobytes())
    return f"{table}-{digest.hexdigest()}"


# --- results (pure) ------------------------------------------------------------------------


# --- the sink ------------------------------------------------------------------------------


def normalize_dsn(dsn: str) -> str:
    """``chdb://`` DSNs with an absolute, resolved folder (chDB compares paths literally)."""
    if not dsn.startswith("chdb:"):
        return dsn
    location = dsn.removeprefix("chdb:").lstrip("/")
    if location in ("", "memory", ":memory:"):
        return "chdb://:memory:"
    path = dsn.removeprefix("chdb://")
    return "chdb://" + os.path.realpath(path)


def _is_unavailable(exc: DatabaseError) -> bool:
    """Whether retrying later can succeed: the connection, a busy or full warehouse, or a chDB
    folder another process owns (not this process holding another folder: that is a bug)."""
    message = str(exc)
    if "Unable to open the chdb engine" in message:
        return "cannot connect with different path" not in message
    return isinstance(exc, OperationalError) or (exc.code or 0) in TRANSIENT_CODES


class _ReadPool:
    """Read connections, one per query in flight (at most ``size``): chDB serialises calls on
    one connection, so a shared one made every query wait behind the slowest, and closing it
    after a failure broke the queries of other threads. A connection that failed is closed and
    never handed out again; the next query opens a fresh one."""

    def __init__(self, open_client: Callable[[ReadScope], Client], size: int) -> None:
        self._open = open_client
        self._size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        # Idle connections, oldest first, with the scope their settings were opened with
        # (row filters and FINAL are connection settings: readonly=1 fixes them).
        self._idle: list[tuple[ReadScope, Client]] = []

    @contextmanager
    def client(self, wait_s: float, scope: ReadScope = EVERY_ROW) -> Iterator[Client]:
        if not self._slots.acquire(timeout=wait_s):
            raise SinkUnavailable(f"every read connection is busy (waited {wait_s:.0f}s)")
        try:
            client = self._take(scope) or self._open(scope)
            try:
                yield client
            except (NotReadOnly, SinkError):
                self._keep(scope, client)  # refused or failed before or after: still sound
                raise
            except BaseException:
                with suppress(ClickHouseError, OSError):
                    client.close()
                raise
            self._keep(scope, client)
        finally:
            self._slots.release()

    def _take(self, scope: ReadScope) -> Client | None:
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i][0] == scope:
                    return self._idle.pop(i)[1]
        return None

    def _keep(self, scope: ReadScope, client: Client) -> None:
        with self._lock:
            self._idle.append((scope, client))
            surplus = self._idle[: max(0, len(self._idle) - self._size)]
            del self._idle[: len(surplus)]
        for _, old in surplus:  # scopes of grants since changed, or of callers gone
            with suppress(ClickHouseError, OSError):
                old.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = [c for _, c in self._idle], []
        for client in idle:
            with suppress(ClickHouseError, OSError):
                client.close()


class _ClientParser:
    """The statement guard's parser (:class:`sinks.sql_guard.Parser`) on one connection."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def format_query(self, sql: str) -> str:
        try:
            rows = self._client.query(format_query_sql(sql)).result_rows
        except DatabaseError as exc:
            message = _parse_error(str(exc))
            if "Multi-statements" in message:
                raise Refused(f"refused: one statement at a time: {message}") from exc
            raise QueryFailed(message) from exc
        return str(rows[0][0])

    def explain_ast(self, sql: str, params: Mapping[str, str]) -> str:
        try:
            rows = self._client.query(f"EXPLAIN AST {sql}", parameters=dict(params)).result_rows
        except DatabaseError as exc:
            raise QueryFailed(_parse_error(str(exc))) from exc
        return "\n".join(str(row[0]) for row in rows)


def _parse_error(message: str) -> str:
    """A parse error without the guard's own wrapping (``In scope SELECT formatQuery(...)``)."""
    return re.sub(r":? In scope SELECT formatQuery\(.*", "", message, flags=re.S).strip()


class ClickHouseSink(ClosesOnExit):
    """Writes batches into the warehouse at ``dsn`` and answers read-only queries.

    Connections open lazily and reopen after a failure, so one sink lives as long as its
    process: after :class:`SinkUnavailable`, wait and call again. An embedded chDB folder is
    owned by one process at a time; a second process gets :class:`SinkUnavailable` and should
    go through the owner's query server (:mod:`sinks.query_server`). Thread-safe: writes share
    one connection, reads run side by side on a pool of ``readers`` connections, each with
    :class:`ReadLimits` it cannot change.
    """

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout_s: float = 5.0,
        query_timeout_s: float = 300.0,
        limits: ReadLimits | None = None,
        readers: int = 4,
    ) -> None:
        self._dsn = normalize_dsn(dsn)
        self._connect_timeout_s = connect_timeout_s
        self._limits = limits or ReadLimits(timeout_s=query_timeout_s)
        self._lock = threading.Lock()
        self._clients: dict[Role, Client] = {}
        self._readers = _ReadPool(lambda scope: self._open("read", scope), readers)
        self._database: str | None = None

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def dialect(self) -> Dialect:
        return "clickhouse"

    @property
    def embedded(self) -> bool:
        return self._dsn.startswith("chdb:")

    @property
    def limits(self) -> ReadLimits:
        return self._limits

    # --- connections ---

    def _open(self, role: Role, scope: ReadScope = EVERY_ROW) -> Client:
        settings = self._limits.settings(self.embedded, scope) if role == "read" else {}
        if self.embedded:
            return clickhouse_connect.get_client(dsn=self._dsn, tz_mode="aware", settings=settings)
        return clickhouse_connect.get_client(
            dsn=self._dsn,
            tz_mode="aware",
            settings=settings,
            connect_timeout=self._connect_timeout_s,
            send_receive_timeout=self._limits.timeout_s + 30,
            # One client serves many threads (the query server): no HTTP session to lock.
            autogenerate_session_id=False,
        )

    def _client(self, role: Role) -> Client:
        with self._lock:
            client = self._clients.get(role)
            if client is None:
                client = self._clients[role] = self._open(role)
            return client

    def _drop(self, role: Role) -> None:
        with self._lock:
            client = self._clients.pop(role, None)
        if client is not None:
            with suppress(ClickHouseError, OSError):
                client.close()

    @contextmanager
    def _guard(self, role: Role, failure: type[SinkError] = SinkError) -> Iterator[None]:
        """Translate driver errors into the sink's; forget a connection that failed."""
        try:
            yield
        except DatabaseError as exc:
            if role == "read" and (exc.code or 0) in LIMIT_CODES:
                raise QueryLimitExceeded(str(exc)) from exc
            if _is_unavailable(exc):
                if role == "write":
                    self._drop(role)
                raise SinkUnavailable(self._unavailable_reason(exc)) from exc
            raise failure(str(exc)) from exc
        except OSError as exc:  # a temp file for the chDB insert, a socket
            if role == "write":
                self._drop(role)
            raise SinkUnavailable(f"{self._dsn}: {exc}") from exc

    def _unavailable_reason(self, exc: Exception) -> str:
        if self.embedded and "EmbeddedServer" in str(exc):
            return (
                f"{self._dsn}: the chDB folder is owned by another process "
                f"(query it through that process's query server): {exc}"
            )
        return f"{self._dsn}: {exc}"

    def ping(self) -> bool:
        try:
            with self._guard("write"):
                return bool(self._client("write").ping())
        except SinkError:
            return False

    def close(self) -> None:
        self._readers.close()
        self._drop("write")

    # --- schema ---

    def applied_migrations(self) -> dict[int, str]:
        with self._guard("write"):
            client = self._client("write")
            client.command(MIGRATIONS_DDL)
            rows = client.query(APPLIED_SQL).result_rows
        return {int(version): str(name) for version, name in rows}

    def ensure_schema(self) -> tuple[Migration, ...]:
        """Apply the DDL migrations not yet recorded, in order; returns those applied now."""
        pending = pending_migrations(load_migrations(), self.applied_migrations())
        for migration in pending:
            with self._guard("write"):
                client = self._client("write")
                for statement in migration.statements:
                    client.command(statement)
                client.command(
                    RECORD_SQL,
                    parameters={"version": migration.version, "name": migration.name},
                )
        return pending

    # --- writes ---

    def write(
        self,
        table: str,
        rows: Sequence[Record],
        origin: BatchOrigin | None = None,
        tenants: Columns | None = None,
    ) -> WriteResult:
        """Store decoded records as ``table``'s rows (exactly once; see the module doc). The
        quarantine is written by the quality gate, as Arrow (:meth:`write_arrow`)."""
        return self.write_arrow(table, table_to_arrow(table, rows, tenants))

    def write_arrow(
        self, table: str, batch: pa.Table, origin: BatchOrigin | None = None
    ) -> WriteResult:
        """Insert an Arrow table whose columns are ``table``'s, with its dedup token (the
        content names the insert; ``origin`` is not needed)."""
        if table not in TOKEN_KEYS:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(TOKEN_KEYS)}")
        token = dedup_token(table, batch)
        if len(batch):
            settings = {**INSERT_SETTINGS, "insert_deduplication_token": token}
            with self._guard("write"):
                self._client("write").insert_arrow(table, batch, settings=settings)
        return WriteResult(table, len(batch), token)

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run one of the platform's own statements (never a caller's text) on the write
        connection; a single-value answer (``SELECT count() ...``) is returned."""
        with self._guard("write"):
            return self._client("write").command(sql, parameters=dict(params or {}))

    # --- reads ---

    @contextmanager
    def _reader(self, scope: ReadScope = EVERY_ROW) -> Iterator[Client]:
        """A read connection of the pool whose settings hold ``scope``'s row filters, errors
        translated (see :meth:`_guard`)."""
        wait_s = self._limits.timeout_s
        with self._guard("read", QueryFailed), self._readers.client(wait_s, scope) as c:
            yield c

    def _run(self, client: Client, sql: str, params: Mapping[str, Any] | None) -> QueryResult:
        result = client.query(sql, parameters=dict(params or {}))
        columns, types = tuple(result.column_names), tuple(t.name for t in result.column_types)
        rows = tuple(tuple(row) for row in result.result_rows)
        if not columns and _FIRST_WORD_SELECT.match(sql):
            columns, types = self._describe(client, sql, params)
        return QueryResult(columns, types, rows)

    def _select(self, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult:
        """A read of the platform's own SQL (no guard: not a caller's text)."""
        with self._reader() as client:
            return self._run(client, sql, params)

    @staticmethod
    def _describe(
        client: Client, sql: str, params: Mapping[str, Any] | None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The columns of a query (chDB sends none with an empty result)."""
        try:
            described = client.query(f"DESCRIBE TABLE ({sql})", parameters=dict(params or {}))
        except DatabaseError:
            return (), ()
        names = tuple(str(row[0]) for row in described.result_rows)
        return names, tuple(str(row[1]) for row in described.result_rows)

    def _current_database(self, client: Client) -> str:
        if self._database is None:
            self._database = str(client.query("SELECT currentDatabase()").result_rows[0][0])
        return self._database

    def check(self, sql: str, params: Mapping[str, Any] | None = None) -> Checked:
        """The statement guard's decision on ``sql`` (:mod:`sinks.sql_guard`), parsed by this
        warehouse. Raises :class:`sinks.sql_guard.Refused` or :class:`QueryFailed`."""
        with self._reader() as client:
            return self._checked(client, sql, params)

    def _checked(self, client: Client, sql: str, params: Mapping[str, Any] | None) -> Checked:
        values = {k: str(v) for k, v in (params or {}).items()}
        return check_query(sql, values, _ClientParser(client), self._current_database(client))

    def query_raw(
        self,
        sql: str,
        params: Mapping[str, str],
        default_format: str,
        scope: ReadScope = EVERY_ROW,
    ) -> RawResult:
        """Run one read-only statement and answer the engine's bytes in its output format
        (the query's ``FORMAT``, else ``default_format``; one of :data:`OUTPUT_FORMATS`): the
        ClickHouse HTTP protocol's answer. ``scope``: the caller's row filters. Raises as
        :meth:`query` does."""
        with self._reader(scope) as client:
            checked = self._checked(client, sql, params)
            fmt = checked.output_format or default_format
            if fmt not in OUTPUT_FORMATS:
                raise Refused(f"refused: output format {fmt} is not served here")
            data = client.raw_query(checked.sql, parameters=dict(params), fmt=fmt)
            return RawResult(bytes(data), fmt)

    def platform_raw(self, sql: str, fmt: str) -> RawResult:
        """The platform's own read (not a caller's text: no guard), as bytes in ``fmt``."""
        with self._reader() as client:
            return RawResult(bytes(client.raw_query(sql, fmt=fmt)), fmt)

    def query(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        scope: ReadScope = EVERY_ROW,
    ) -> QueryResult:
        """Run one read-only statement (``{name:Type}`` parameters bound by the server), on
        the rows ``scope`` allows.

        Raises :class:`sinks.sql_guard.Refused` (a :class:`queries.sqltext.NotReadOnly`) for
        anything the statement guard does not let through, :class:`QueryLimitExceeded` when
        it stops at a limit, and :class:`QueryFailed` when the warehouse rejects the SQL.
        """
        with self._reader(scope) as client:
            checked = self._checked(client, sql, params)
            if checked.output_format is not None:
                raise Refused(
                    f"refused: FORMAT {checked.output_format}: this port answers JSON, "
                    "choose the format on the client side"
                )
            return self._run(client, checked.sql, params)

    def _count(self, sql: str, table: str, device_prefix: str) -> int:
        if table not in DEDUPLICATED_TABLES:
            raise ValueError(f"unknown table {table!r}")
        result = self._select(sql, {"table": table, "device_prefix": device_prefix})
        return int(result.rows[0][0])

    def count_stored(self, table: str = TELEMETRY_TABLE, device_prefix: str = "") -> int:
        """Distinct (device_id, seq) messages stored (optionally of devices with a prefix)."""
        return self._count(STORED_SQL, table, device_prefix)

    def count_duplicates(self, table: str = TELEMETRY_TABLE, device_prefix: str = "") -> int:
        """(device_id, seq) pairs an analyst would see more than once (reading FINAL): 0 when
        exactly-once holds."""
        return self._count(DUPLICATES_SQL, table, device_prefix)
