"""``fleet sql`` and the demo's counts: run a read against the warehouse.

Whether or not the pipeline runs: the query goes first to the query server of the process
that owns the warehouse (``settings.host:settings.query_port``); when nothing listens there
(or it serves another warehouse), the warehouse is opened directly — an embedded chDB folder
in this process (with its schema applied), or a ClickHouse server over HTTP.
Only reads are run, on either path, and always with FINAL applied (``final=1``).

The query server wants a bearer token (a platform token whose principal holds
``telemetry.read``): the one given (``fleet sql --token``, ``--as``), else the platform's own
secret from the stack's run folder, readable by the operator on the machine that runs it.
Preparing the statement and rendering the result are queries/runner.py's.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from infra.settings import Settings
from queries.result import QueryResult
from queries.runner import (
    CHECKOUT,
    Format,
    Prepared,
    QueryError,
    WarehouseUnavailable,
    prepare,
    render,
)
from queries.sqltext import NotReadOnly
from sinks.clickhouse import (
    DUPLICATES_SQL,
    STORED_SQL,
    TELEMETRY_TABLE,
    ClickHouseSink,
    QueryFailed,
    SinkUnavailable,
    normalize_dsn,
)
from sinks.doris import DorisSink, is_doris_dsn
from sinks.query_server import read_platform_secret

__all__ = ["QUERY_TIMEOUT_S", "WarehouseCounts", "fetch", "run_sql", "warehouse_counts"]

QUERY_TIMEOUT_S = 300.0
_SELECT = re.compile(r"[\s(]*(SELECT|WITH)\b", re.IGNORECASE)


def _served_warehouse(base: str, timeout_s: float) -> str | None:
    """The warehouse the query server at ``base`` serves (its ``/health``), or None when
    nothing listens there."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as response:  # noqa: S310
            return str(json.load(response)["warehouse"])
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return None
        raise WarehouseUnavailable(f"query server at {base}: {exc.reason}") from exc
    except (http.client.HTTPException, OSError, ValueError, KeyError, TypeError) as exc:
        # A dropped connection, a timeout, or something else answering on that port.
        raise WarehouseUnavailable(f"query server at {base}: {exc!r}") from exc


def _result(client: Client, prepared: Prepared) -> QueryResult:
    result = client.query(prepared.sql, parameters=dict(prepared.params))
    columns = tuple(result.column_names)
    types = tuple(t.name for t in result.column_types)
    if not columns and _SELECT.match(prepared.sql):
        # an empty result may come without its columns: ask the port to describe the query
        described = client.query(
            f"DESCRIBE TABLE ({prepared.sql})", parameters=dict(prepared.params)
        ).result_rows
        columns = tuple(str(row[0]) for row in described)
        types = tuple(str(row[1]) for row in described)
    return QueryResult(columns, types, tuple(tuple(row) for row in result.result_rows))


def _via_server(
    settings: Settings, prepared: Prepared, timeout_s: float, token: str | None
) -> QueryResult | None:
    """The result from the owner's query server (the ClickHouse HTTP protocol, through
    clickhouse-connect as any client), or None when there is none for our warehouse."""
    base = f"http://{settings.host}:{settings.query_port}"
    served = _served_warehouse(base, min(timeout_s, 10.0))
    if served is None or normalize_dsn(served) != normalize_dsn(settings.warehouse_dsn):
        return None  # nothing there, or another stack's warehouse: ours is not owned through it
    try:
        client = clickhouse_connect.get_client(
            host=settings.host,
            port=settings.query_port,
            username="fleet-sql",
            password=token or read_platform_secret(settings.run_dir) or "",
            tz_mode="aware",
            connect_timeout=min(timeout_s, 10.0),
            send_receive_timeout=timeout_s,
            autogenerate_session_id=False,
        )
        try:
            return _result(client, prepared)
        finally:
            client.close()
    except DatabaseError as exc:
        message = str(exc)
        denied = "ACCESS_DENIED" in message and "telemetry.read" in message
        if denied or "AUTHENTICATION_FAILED" in message:
            raise QueryError(
                f"query server at {base}: {message} (pass a token with telemetry.read: "
                "`fleet sql --token` or `--as user:<id>`)"
            ) from exc
        if isinstance(exc, OperationalError) or "NETWORK_ERROR" in message:
            raise WarehouseUnavailable(f"query server at {base}: {message}") from exc
        raise QueryError(message) from exc


def _direct(settings: Settings, prepared: Prepared, timeout_s: float) -> QueryResult:
    try:
        with ClickHouseSink(settings.warehouse_dsn, query_timeout_s=timeout_s) as sink:
            if sink.embedded:
                sink.ensure_schema()  # a fresh folder answers with empty tables, not errors
            return sink.query(prepared.sql, prepared.params)
    except SinkUnavailable as exc:
        raise WarehouseUnavailable(str(exc)) from exc
    except (QueryFailed, NotReadOnly) as exc:
        raise QueryError(str(exc)) from exc


def _dialect_file(sql_or_file: str, dialect: str) -> str:
    """``queries/<name>.sql`` as ``queries/<dialect>/<name>.sql`` when that exists: the
    analyst queries whose text differs by warehouse live side by side (queries/README.md)."""
    path = Path(sql_or_file.strip())
    if path.suffix != ".sql" or any(c.isspace() for c in sql_or_file.strip()):
        return sql_or_file
    for base in (Path(), CHECKOUT):
        candidate = base / path.parent / dialect / path.name
        if candidate.is_file():
            return str(candidate)
    return sql_or_file


def _doris(settings: Settings, prepared: Prepared, timeout_s: float) -> QueryResult:
    """A read of a Doris warehouse: straight to it over the MySQL protocol (it is a server;
    there is no folder to own and no query port in between)."""
    try:
        with DorisSink(settings.warehouse_dsn, query_timeout_s=timeout_s) as sink:
            return sink.query(prepared.sql, prepared.params)
    except SinkUnavailable as exc:
        raise WarehouseUnavailable(str(exc)) from exc
    except (QueryFailed, NotReadOnly) as exc:
        raise QueryError(str(exc)) from exc


def fetch(
    settings: Settings,
    sql_or_file: str,
    params: Mapping[str, str] | None = None,
    *,
    timeout_s: float = QUERY_TIMEOUT_S,
    token: str | None = None,
) -> QueryResult:
    """Run one read (a statement, or a path to a ``.sql`` file); values come back JSON-safe.
    ``token``: the bearer token for the query server (default: the platform's secret)."""
    if is_doris_dsn(settings.warehouse_dsn):
        prepared = prepare(_dialect_file(sql_or_file, "doris"), params)
        return _doris(settings, prepared, timeout_s).json_safe()
    prepared = prepare(sql_or_file, params)
    result = _via_server(settings, prepared, timeout_s, token)
    if result is None:
        result = _direct(settings, prepared, timeout_s)
    return result.json_safe()


def run_sql(
    settings: Settings,
    sql_or_file: str,
    params: Mapping[str, str] | None = None,
    fmt: Format = "table",
    token: str | None = None,
) -> str:
    """What ``fleet sql`` prints. Raises :class:`QueryError` (and its
    :class:`WarehouseUnavailable`) with a message fit for the user."""
    return render(fetch(settings, sql_or_file, params, token=token), fmt)


# --- pipeline counts (fleet demo) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WarehouseCounts:
    stored: int
    duplicates: int


def warehouse_counts(
    settings: Settings, table: str = TELEMETRY_TABLE, device_prefix: str = ""
) -> WarehouseCounts:
    """``stored`` (distinct (device_id, seq)) and ``duplicates`` (pairs seen more than once
    reading FINAL), counted with SQL through the same path as ``fleet sql``."""
    if is_doris_dsn(settings.warehouse_dsn):
        try:
            with DorisSink(settings.warehouse_dsn) as sink:
                return WarehouseCounts(
                    sink.count_stored(table, device_prefix),
                    sink.count_duplicates(table, device_prefix),
                )
        except SinkUnavailable as exc:
            raise WarehouseUnavailable(str(exc)) from exc
    params = {"table": table, "device_prefix": device_prefix}
    stored = fetch(settings, STORED_SQL, params).rows[0][0]
    duplicates = fetch(settings, DUPLICATES_SQL, params).rows[0][0]
    return WarehouseCounts(int(stored), int(duplicates))
