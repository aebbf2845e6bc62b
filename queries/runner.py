"""``fleet sql``'s pure half: a statement or a ``queries/*.sql`` file made ready to run
(read-only checked, parameters bound) and a result rendered as ``fleet sql`` prints it.

Running it against the warehouse (the owner's query server, else the warehouse opened
directly) is the composition root's: infra/warehouse.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from rich.console import Console
from rich.table import Table

from queries.result import QueryResult
from queries.sqltext import check_read_only, load_sql_file

__all__ = [
    "FORMATS",
    "Format",
    "Prepared",
    "QueryError",
    "WarehouseUnavailable",
    "prepare",
    "render",
]

Format = Literal["table", "json", "csv"]
FORMATS: tuple[str, ...] = get_args(Format)
# Where a relative query file is also looked for: the checkout (queries/ is at its top).
CHECKOUT = Path(__file__).resolve().parent.parent


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
    for path in (Path(text), CHECKOUT / text):
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
