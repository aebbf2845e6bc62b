"""The Apache Doris warehouse sink: ``doris://user:pass@host:9030/db?http_port=8030``.

DDL, migrations and reads go over the MySQL protocol (pymysql, port 9030); batches are loaded
with Stream Load over HTTP (the FE's ``http_port``; sinks/doris_load.py): Arrow where the
table has no MAP column, JSON lines otherwise. Exactly once (``queries/README.md``):

1. each load's **label** is derived from the batch's Kafka topic/partition/offset range
   (:meth:`sinks.base.BatchOrigin.label`): a re-sent batch answers ``Label Already Exists``
   and is counted as loaded;
2. **two-phase commit**: a write returns only after the load's transaction is committed, and
   the loader commits the Kafka offsets after that; a crash in between re-sends the batch,
   whose label then says it was loaded (or commits the pre-committed transaction);
3. tables use the **UNIQUE KEY** model on (device_id, seq) with a sequence column, so a message
   re-sent in another batch replaces its row rather than doubling it.

Its tables are derived from the Arrow declarations (sinks/doris_ddl.py, versioned migrations
recorded in ``schema_migrations``); its analyst queries are ``queries/doris/*.sql``.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pymysql
import requests
from pymysql.connections import Connection

from queries.migrations import Migration, pending_migrations
from queries.result import QueryResult
from sinks.base import (
    EVENTS_TABLE,
    QUARANTINE_TABLE,
    TELEMETRY_TABLE,
    BatchOrigin,
    ClosesOnExit,
    Dialect,
    InvalidBatch,
    QueryFailed,
    Record,
    SinkUnavailable,
    WriteResult,
)
from sinks.clickhouse import dedup_token, records_to_arrow
from sinks.doris_ddl import DORIS_TABLES, doris_migrations, schema_migrations_ddl
from sinks.doris_load import LoadRequest, StreamLoader, json_lines
from sinks.warehouse_tables import Columns

__all__ = [
    "DORIS_SCHEMAS",
    "DorisConfig",
    "DorisSink",
    "bind_params",
    "is_doris_dsn",
    "parse_doris_dsn",
]

# Per table: its load columns (Arrow; Stream Load names them, so their order is free), and
# whether Stream Load gets Arrow (no MAP column: Doris reads Arrow primitives, strings and
# timestamps) or JSON lines.
DORIS_SCHEMAS: Final[Mapping[str, pa.Schema]] = {t.name: t.schema for t in DORIS_TABLES}
DEDUPLICATED_TABLES: Final = frozenset({TELEMETRY_TABLE, EVENTS_TABLE, QUARANTINE_TABLE})

APPLIED_SQL: Final = "SELECT version, name FROM schema_migrations"
RECORD_SQL: Final = (
    "INSERT INTO schema_migrations (version, name, applied_at) "
    "VALUES (%(version)s, %(name)s, %(at)s)"
)
STORED_SQL: Final = (
    "SELECT count(*) FROM (SELECT DISTINCT device_id, seq FROM `{table}` "
    "WHERE starts_with(device_id, %(device_prefix)s)) s"
)
DUPLICATES_SQL: Final = (
    "SELECT count(*) FROM (SELECT device_id, seq FROM `{table}` "
    "WHERE starts_with(device_id, %(device_prefix)s) "
    "GROUP BY device_id, seq HAVING count(*) > 1) d"
)


@dataclass(frozen=True, slots=True)
class DorisConfig:
    host: str
    mysql_port: int
    http_port: int
    database: str
    user: str
    password: str
    http_scheme: str = "http"
    replication_num: int = 1  # copies of each tablet the migrations' tables ask for

    @property
    def http_base(self) -> str:
        return f"{self.http_scheme}://{self.host}:{self.http_port}"

    @property
    def dsn(self) -> str:
        """The DSN without its password (safe to log and compare)."""
        return f"doris://{self.user}@{self.host}:{self.mysql_port}/{self.database}"


def is_doris_dsn(dsn: str) -> bool:
    return dsn.startswith("doris://")


def parse_doris_dsn(dsn: str) -> DorisConfig:
    """``doris://user:pass@host:9030/db?http_port=8030`` (``http_scheme=https`` and
    ``replication_num=3`` optional)."""
    parts = urlsplit(dsn)
    if parts.scheme != "doris" or not parts.hostname:
        raise ValueError(f"not a Doris URL (doris://user:pass@host:9030/db?http_port=N): {dsn!r}")
    database = parts.path.strip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise ValueError(f"Doris URL: a database name is required after the port: {dsn!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return DorisConfig(
        host=parts.hostname,
        mysql_port=parts.port or 9030,
        http_port=int(query.get("http_port", "8030")),
        database=database,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        http_scheme=query.get("http_scheme", "http"),
        replication_num=int(query.get("replication_num", "1")),
    )


_PARAM = re.compile(r"\{(\w+):([^{}]+)\}")


def bind_params(sql: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A statement with ClickHouse-style ``{name:Type}`` parameters (the ``queries/*.sql``
    convention, shared by ``queries/doris/*.sql``) as pymysql's ``%(name)s`` form; an
    ``Identifier`` is quoted in place (a plain name only). Literal ``%`` are escaped."""
    values: dict[str, Any] = {}

    def replace(match: re.Match[str]) -> str:
        name, kind = match.group(1), match.group(2).strip()
        if name not in params:
            raise QueryFailed(f"missing parameter {name!r}")
        if kind == "Identifier":
            ident = str(params[name])
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ident):
                raise QueryFailed(f"parameter {name}: not an identifier: {ident!r}")
            return f"`{ident}`"
        values[name] = _typed(params[name], kind)
        return f"%({name})s"

    parts = []
    last = 0
    for match in _PARAM.finditer(sql):
        parts.append(sql[last : match.start()].replace("%", "%%"))
        parts.append(replace(match))
        last = match.end()
    parts.append(sql[last:].replace("%", "%%"))
    return "".join(parts), values


def _typed(value: Any, kind: str) -> Any:
    """A parameter's value as its declared type says (``fleet sql --param`` gives text)."""
    try:
        if re.fullmatch(r"U?Int\d+", kind):
            return int(value)
        if re.fullmatch(r"Float\d+|Decimal.*", kind):
            return float(value)
    except (TypeError, ValueError) as exc:
        raise QueryFailed(f"parameter of type {kind}: {value!r} is not a number") from exc
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf: stored as NULL (see queries/README.md)
    if isinstance(value, list):  # an Arrow map as (key, value) pairs
        return {k: _json_value(v) for k, v in value}
    return value


def _rows_json(batch: pa.Table) -> bytes:
    return json_lines([{k: _json_value(v) for k, v in row.items()} for row in batch.to_pylist()])


def _arrow_stream(batch: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_table(batch)
    return bytes(sink.getvalue())


def _label(table: str, origin: BatchOrigin | None) -> str:
    if origin is None:
        raise ValueError(f"{table}: a Doris load needs the batch's Kafka origin for its label")
    return origin.label(table)


def load_format(schema: pa.Schema) -> str:
    """``arrow`` for a table Doris reads from Arrow, ``json`` when a column is a map."""
    return "json" if any(isinstance(f.type, pa.MapType) for f in schema) else "arrow"


class DorisSink(ClosesOnExit):
    """Writes batches into Doris with Stream Load and answers reads over the MySQL protocol.
    Thread-safe: one MySQL connection per call, one HTTP session (requests is thread-safe for
    independent requests)."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout_s: float = 5.0,
        query_timeout_s: float = 300.0,
        load_timeout_s: float = 120.0,
        migrations: Sequence[Migration] | None = None,
    ) -> None:
        self._config = parse_doris_dsn(dsn)
        self._connect_timeout_s = connect_timeout_s
        self._query_timeout_s = query_timeout_s
        self._load_timeout_s = load_timeout_s
        # None: the declared tables' (sinks/doris_ddl.py), with the URL's replication_num.
        self._migrations = tuple(
            doris_migrations(self._config.replication_num) if migrations is None else migrations
        )
        self._session = requests.Session()
        self._loader = StreamLoader(
            self._session, self._config.user, self._config.password, connect_timeout_s
        )
        self._lock = threading.Lock()

    @property
    def dsn(self) -> str:
        return self._config.dsn

    @property
    def config(self) -> DorisConfig:
        return self._config

    @property
    def dialect(self) -> Dialect:
        return "doris"

    # --- MySQL protocol ---

    @contextmanager
    def _connection(self, failure: type[Exception] = QueryFailed) -> Iterator[Connection[Any]]:
        cfg = self._config
        try:
            conn = pymysql.connect(
                host=cfg.host,
                port=cfg.mysql_port,
                user=cfg.user,
                password=cfg.password,
                database=cfg.database,
                connect_timeout=self._connect_timeout_s,
                read_timeout=self._query_timeout_s,
                autocommit=True,
                charset="utf8mb4",
            )
        except pymysql.err.OperationalError as exc:
            raise SinkUnavailable(f"{self.dsn}: {exc}") from exc
        try:
            yield conn
        except pymysql.err.OperationalError as exc:
            raise SinkUnavailable(f"{self.dsn}: {exc}") from exc
        except pymysql.err.MySQLError as exc:
            raise failure(str(exc)) from exc
        finally:
            with suppress(pymysql.err.MySQLError, OSError):
                conn.close()

    def _fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult:
        with self._connection() as conn, conn.cursor() as cursor:
            cursor.execute(sql, dict(params) if params else None)
            description = cursor.description or ()
            columns = tuple(str(d[0]) for d in description)
            types = tuple(_type_name(d[1]) for d in description)
            rows = tuple(tuple(row) for row in cursor.fetchall())
        return QueryResult(columns, types, rows)

    def ping(self) -> bool:
        try:
            self._fetch("SELECT 1")
            return True
        except (SinkUnavailable, QueryFailed):
            return False

    def close(self) -> None:
        self._session.close()

    # --- schema ---

    def applied_migrations(self) -> dict[int, str]:
        with self._connection() as conn, conn.cursor() as cursor:
            cursor.execute(schema_migrations_ddl(self._config.replication_num))
            cursor.execute(APPLIED_SQL)
            return {int(version): str(name) for version, name in cursor.fetchall()}

    def ensure_schema(self) -> tuple[Migration, ...]:
        """Apply the Doris migrations not yet recorded, in order; returns those applied."""
        pending = pending_migrations(self._migrations, self.applied_migrations())
        for migration in pending:
            with self._connection() as conn, conn.cursor() as cursor:
                for statement in migration.statements:
                    cursor.execute(statement)
                at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                params = {"version": migration.version, "name": migration.name, "at": at}
                cursor.execute(RECORD_SQL, params)
        return pending

    # --- writes ---

    def _schema(self, table: str) -> pa.Schema:
        schema = DORIS_SCHEMAS.get(table)
        if schema is None:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(DORIS_SCHEMAS)}")
        return schema

    def write(
        self,
        table: str,
        records: Sequence[Record],
        origin: BatchOrigin | None = None,
        tenants: Columns | None = None,
    ) -> WriteResult:
        """Load ``records`` (dicts, with ``tenants``' columns when given) into ``table`` with
        one Stream Load, committed on return."""
        schema = self._schema(table)
        label = _label(table, origin)
        if not records:
            return WriteResult(table, 0, label)
        # As on ClickHouse: the tenants' columns taken from `tenants`, else empty.
        return self._load(table, records_to_arrow(records, schema, tenants), label)

    def write_arrow(
        self, table: str, batch: pa.Table, origin: BatchOrigin | None = None
    ) -> WriteResult:
        """Load an Arrow table with ``table``'s columns. The label is the batch's origin and a
        digest of its keys: the same rows re-sent answer ``Label Already Exists``, while rows
        the gate judged otherwise on a re-read (the registry changed in between) load under a
        new label; the UNIQUE KEY keeps one row per message either way, so nothing is lost and
        nothing doubled."""
        schema = self._schema(table)
        label = _label(f"{table}_{dedup_token(table, batch)[-12:]}", origin)
        if not len(batch):
            return WriteResult(table, 0, label)
        try:
            cast = batch.select(schema.names).cast(schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InvalidBatch(f"{table}: {exc}") from exc
        return self._load(table, cast, label)

    def _load(self, table: str, batch: pa.Table, label: str) -> WriteResult:
        """One Stream Load of ``batch`` under ``label``, committed on return."""
        fmt = load_format(batch.schema)
        body = _rows_json(batch) if fmt == "json" else _arrow_stream(batch)
        request = LoadRequest(
            self._config.http_base,
            self._config.database,
            table,
            label,
            body,
            fmt,
            tuple(batch.schema.names),
            self._load_timeout_s,
        )
        result = self._loader.load(request)
        return WriteResult(table, result.rows, label)

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run one of the platform's own statements (``{name:Type}`` parameters bound by
        pymysql); a single-value answer (``SELECT count(*) ...``) is returned."""
        bound, values = bind_params(sql, params or {})
        with self._connection(SinkUnavailable) as connection, connection.cursor() as cursor:
            cursor.execute(bound, values)
            rows: list[tuple[Any, ...]] = list(cursor.fetchall()) if cursor.description else []
        if len(rows) == 1 and len(rows[0]) == 1:
            return rows[0][0]
        return rows

    # --- reads ---

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult:
        """Run one read (``{name:Type}`` parameters bound by pymysql, never pasted in). The
        caller (queries/runner.py) has checked it is read-only; give the DSN's user SELECT
        only where analysts reach it (see queries/README.md)."""
        bound, values = bind_params(sql, params or {})
        return self._fetch(bound, values)

    def _count(self, sql: str, table: str, device_prefix: str) -> int:
        if table not in DEDUPLICATED_TABLES:
            raise ValueError(f"unknown table {table!r}")
        result = self._fetch(sql.format(table=table), {"device_prefix": device_prefix})
        return int(result.rows[0][0])

    def count_stored(self, table: str = TELEMETRY_TABLE, device_prefix: str = "") -> int:
        return self._count(STORED_SQL, table, device_prefix)

    def count_duplicates(self, table: str = TELEMETRY_TABLE, device_prefix: str = "") -> int:
        """(device_id, seq) pairs stored more than once: 0 by the UNIQUE KEY model, measured."""
        return self._count(DUPLICATES_SQL, table, device_prefix)


def _type_name(code: Any) -> str:
    """A MySQL column type code as a name the renderer knows (numbers right-aligned)."""
    names = {
        1: "Int8", 2: "Int16", 3: "Int32", 8: "Int64", 9: "Int32",
        4: "Float32", 5: "Float64", 246: "Decimal",
        7: "DateTime", 12: "DateTime64(3)", 10: "Date",
    }  # fmt: skip
    return names.get(int(code), "String") if isinstance(code, int) else "String"
