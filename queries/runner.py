"""``fleet sql``: run a statement or a ``queries/*.sql`` file against the warehouse.

Whether or not the pipeline runs: the query goes first to the query server of the process
that owns the warehouse (``settings.host:settings.query_port``); when nothing listens there
(or it serves another warehouse), the warehouse is opened directly — an embedded chDB folder
in this process (with its schema applied), or a ClickHouse server over HTTP.
Only reads are run, on either path, and always with FINAL applied (``final=1``).

The query server wants a bearer token (a platform token whose principal holds
``telemetry.read``): the one given (``fleet sql --token``, ``--as``), else the platform's own
secret from the stack's run folder, readable by the operator on the machine that runs it.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from rich.console import Console
from rich.table import Table

from infra.settings import PROJECT_ROOT, Settings
from queries.sqltext import NotReadOnly, check_read_only, load_sql_file
from sinks.clickhouse import (
    DUPLICATES_SQL,
    STORED_SQL,
    TELEMETRY_TABLE,
    ClickHouseSink,
    QueryFailed,
    QueryResult,
    SinkUnavailable,
    normalize_dsn,
)
from sinks.query_server import read_platform_secret

__all__ = [
    "FORMATS",
    "Format",
    "Prepared",
    "QueryError",
    "WarehouseCounts",
    "WarehouseUnavailable",
    "fetch",
    "prepare",
    "render",
    "run_sql",
    "warehouse_counts",
]

Format = Literal["table", "json", "csv"]
FORMATS: tuple[str, ...] = get_args(Format)
QUERY_TIMEOUT_S = 300.0
_SELECT = re.compile(r"[\s(]*(SELECT|WITH)\b", re.IGNORECASE)


class QueryError(Exception):
    """The query was refused or failed; the message says why (print it, exit non-zero)."""


class WarehouseUnavailable(QueryError):
    """Neither the query server nor the warehouse itself could be reached."""


@dataclass(frozen=True, slots=True)
class Prepared:
    sql: str
    params: dict[str, str]
    source: str  # the file it came from, or "<inline>"


def _sql_path(sql_or_file: str) -> Path | None:
    """The file ``sql_or_file`` names (relative to the working folder or the checkout), or
    None when it is a statement."""
    text = sql_or_file.strip()
    if not text.lower().endswith(".sql") or any(c.isspace() for c in text):
        return None
    for path in (Path(text), PROJECT_ROOT / text):
        if path.is_file():
            return path
    raise QueryError(f"no such query file: {text}")


def prepare(sql_or_file: str, params: Mapping[str, str] | None = None) -> Prepared:
    """The statement to run and its parameter values (a file's defaults filled in)."""
    given = dict(params or {})
    path = _sql_path(sql_or_file)
    try:
        if path is None:
            return Prepared(check_read_only(sql_or_file), given, "<inline>")
        sql_file = load_sql_file(path)
        return Prepared(check_read_only(sql_file.sql), sql_file.bind(given), str(path))
    except ValueError as exc:  # NotReadOnly, a bad header, an unknown or missing parameter
        raise QueryError(f"{path or 'query'}: {exc}") from exc


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
    prepared = prepare(sql_or_file, params)
    result = _via_server(settings, prepared, timeout_s, token)
    if result is None:
        result = _direct(settings, prepared, timeout_s)
    return result.json_safe()


# --- output ---------------------------------------------------------------------------------


def _datetime_text(value: str, type_name: str) -> str:
    """An ISO 8601 value as a table shows it: ``2026-01-31 12:00:00.123`` when in UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    offset = moment.utcoffset()
    if offset is not None and offset.total_seconds() != 0:
        return value
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    precision = re.search(r"DateTime64\((\d)", type_name)
    digits = int(precision.group(1)) if precision else 0
    return f"{text}.{moment.strftime('%f')[:digits]}" if digits else text


def _text(value: Any, type_name: str = "") -> str:
    if isinstance(value, str) and "DateTime" in type_name:
        return _datetime_text(value, type_name)
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == 0 or 1e-4 <= abs(value) < 1e15:
            return f"{value:.6f}".rstrip("0").rstrip(".")
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _numeric(type_name: str) -> bool:
    return any(word in type_name for word in ("Int", "Float", "Decimal"))


def render_table(result: QueryResult, width: int | None = None) -> str:
    table = Table(caption=f"{len(result.rows)} row{'s' if len(result.rows) != 1 else ''}")
    for name, type_name in zip(result.columns, result.types, strict=True):
        table.add_column(name, justify="right" if _numeric(type_name) else "left", overflow="fold")
    for row in result.rows:
        table.add_row(*(_text(v, t) for v, t in zip(row, result.types, strict=True)))
    out = io.StringIO()
    console = Console(
        file=out,
        width=width or shutil.get_terminal_size((120, 24)).columns,
        color_system=None,
        force_terminal=False,
        soft_wrap=False,
    )
    console.print(table)
    return out.getvalue().rstrip("\n")


def _csv_cell(value: Any) -> str:
    """Full precision, ISO 8601 times: CSV is data, not display."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_csv(result: QueryResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow([_csv_cell(v) for v in row])
    return out.getvalue().rstrip("\n")


def render(result: QueryResult, fmt: Format = "table", width: int | None = None) -> str:
    """``result`` as ``fleet sql`` prints it: a table, a JSON list of row objects, or CSV."""
    if fmt == "json":
        return json.dumps(result.records(), ensure_ascii=False)
    if fmt == "csv":
        return render_csv(result)
    if fmt == "table":
        return render_table(result, width)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


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
    params = {"table": table, "device_prefix": device_prefix}
    stored = fetch(settings, STORED_SQL, params).rows[0][0]
    duplicates = fetch(settings, DUPLICATES_SQL, params).rows[0][0]
    return WarehouseCounts(int(stored), int(duplicates))
