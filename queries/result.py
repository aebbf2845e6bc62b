"""A query's result, as every reader of the warehouse gets it (sinks, the query server,
`fleet sql`): columns, their ClickHouse types and rows, and its JSON-safe form; or the
engine's own bytes in one of the output formats the SQL port answers in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Final

__all__ = ["OUTPUT_FORMATS", "QueryResult", "RawResult", "json_value"]


def json_value(value: Any) -> Any:
    """``value`` as something ``json.dumps`` writes faithfully (datetimes as ISO 8601)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_value(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    return str(value)  # UUID, IP addresses, enums


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def json_safe(self) -> QueryResult:
        """The same result with every value JSON-safe (what the query server sends)."""
        rows = tuple(tuple(json_value(v) for v in row) for row in self.rows)
        return QueryResult(self.columns, self.types, rows)

    def to_json(self) -> dict[str, Any]:
        safe = self.json_safe()
        return {
            "columns": list(safe.columns),
            "types": list(safe.types),
            "rows": [list(row) for row in safe.rows],
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> QueryResult:
        columns = tuple(str(c) for c in payload["columns"])
        types = tuple(str(t) for t in payload.get("types", [""] * len(columns)))
        return cls(columns, types, tuple(tuple(row) for row in payload["rows"]))

    def records(self) -> list[dict[str, Any]]:
        """One JSON-safe object per row (``fleet sql --format json``)."""
        safe = self.json_safe()
        return [dict(zip(safe.columns, row, strict=True)) for row in safe.rows]


@dataclass(frozen=True, slots=True)
class RawResult:
    """A result as the engine wrote it, in an output format (the ClickHouse HTTP answer)."""

    data: bytes
    fmt: str


# Output formats the SQL port answers in: what ClickHouse clients ask for. Formats reading a
# schema file (Protobuf, CapnProto, Template) are not among them.
OUTPUT_FORMATS: Final = frozenset(
    {
        "Native",
        "RowBinary",
        "RowBinaryWithNames",
        "RowBinaryWithNamesAndTypes",
        "TabSeparated",
        "TSV",
        "TabSeparatedRaw",
        "TSVRaw",
        "TabSeparatedWithNames",
        "TSVWithNames",
        "TabSeparatedWithNamesAndTypes",
        "TSVWithNamesAndTypes",
        "CSV",
        "CSVWithNames",
        "CSVWithNamesAndTypes",
        "JSON",
        "JSONCompact",
        "JSONStrings",
        "JSONCompactStrings",
        "JSONEachRow",
        "JSONCompactEachRow",
        "JSONColumns",
        "Arrow",
        "ArrowStream",
        "Parquet",
        "Values",
        "Pretty",
        "PrettyCompact",
        "Vertical",
        "Markdown",
    }
)
