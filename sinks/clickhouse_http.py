"""The ClickHouse HTTP protocol on the SQL port (pure parts): requests, credentials, errors.

What a ClickHouse HTTP client sends (clickhouse-connect, curl, DBeaver's HTTP driver): the query
in the body and/or the ``query`` URL parameter (joined by a newline, as ClickHouse does), its
parameters as ``param_<name>``, ``default_format``, ``database``, ``query_id``, transport
options, and settings as other URL parameters. The platform token is the password (HTTP Basic,
``X-ClickHouse-Key`` or ``password=``) or ``Authorization: Bearer``.

Settings cannot be changed on this port: the read connections run with ``readonly=1``, the
port's limits (:class:`sinks.clickhouse.ReadLimits`) and the caller's row filters
(:mod:`sinks.row_filters`). One exception: ``final`` (1 by default: every table read FINAL, so
each message is seen once) may be set to 0 to read the parts as they are (faster, duplicates
possible until merges). Transport options (compression, progress
headers, sessions, protocol version) and the input-format settings clickhouse-connect sends are
ignored; any other setting is refused by name. A client's settings probe
(``SELECT name, value, readonly FROM system.settings``) is answered by the platform with the
port's limits, all read-only, so clients do not try to change them.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sinks.sql_guard import Refused

__all__ = [
    "IGNORED_PARAMS",
    "PROBE_SQL",
    "ChRequest",
    "content_type",
    "credential",
    "error_body",
    "is_settings_probe",
    "parse_request",
    "unescape_param",
]

# URL parameters of the HTTP interface that are not settings, or settings about the transport.
IGNORED_PARAMS: Final = frozenset(
    {
        "user",
        "password",
        "quota_key",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "client_protocol_version",
        "role",
        "http_response_buffer_size",
        # input formats (inserts only; none here), sent by clickhouse-connect when allowed
        "date_time_input_format",
        "cast_string_to_dynamic_use_inference",
    }
)
_PROBE = re.compile(
    r"\s*SELECT\s+name\s*,\s*value\s*,\s*readonly\s+FROM\s+system\.settings"
    r"(?:\s+LIMIT\s+\d+)?(?:\s+FORMAT\s+(\w+))?\s*;?\s*",
    re.IGNORECASE,
)
# The platform's answer to that probe: the port's limits, every one read-only but `final`,
# which a caller may set to 0 (clients only send settings the probe says they may change).
PROBE_SQL: Final = (
    "SELECT name, value, toUInt8(name != 'final') AS readonly FROM system.settings WHERE name IN ("
    "'readonly', 'max_execution_time', 'max_memory_usage', 'max_result_rows', "
    "'max_result_bytes', 'result_overflow_mode', 'max_threads', 'final')"
)
_CONTENT_TYPES: Final = {
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONStrings": "application/json; charset=UTF-8",
    "JSONCompactStrings": "application/json; charset=UTF-8",
    "JSONColumns": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
    "JSONCompactEachRow": "application/x-ndjson; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8",
    "CSVWithNames": "text/csv; charset=UTF-8",
    "CSVWithNamesAndTypes": "text/csv; charset=UTF-8",
}
_TSV_ESCAPES: Final = {"t": "\t", "n": "\n", "r": "\r", "0": "\0", "b": "\b", "f": "\f"}


@dataclass(frozen=True, slots=True)
class ChRequest:
    sql: str
    params: dict[str, str]
    default_format: str
    query_id: str
    final: bool = True  # FINAL on every table (each message once); `final=0` opts out


def unescape_param(value: str) -> str:
    """A ``param_<name>`` value as its text: the HTTP interface takes them TSV-escaped."""
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append(_TSV_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def credential(
    authorization: str | None, clickhouse_key: str | None, query: Mapping[str, str]
) -> str | None:
    """The platform token a request carries: ``Authorization: Bearer``, the password of HTTP
    Basic, ``X-ClickHouse-Key``, or ``password=``; None without one."""
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return clickhouse_key or query.get("password") or None


def parse_request(
    query: Mapping[str, str], body: bytes, warehouse_database: str = "default"
) -> ChRequest:
    """The query of a ClickHouse HTTP request. Raises :class:`Refused` for a setting it tries
    to change or another database, ValueError for a malformed request."""
    text = body.decode("utf-8")  # UnicodeDecodeError is a ValueError
    sql = "\n".join(part for part in (query.get("query", ""), text) if part.strip())
    if not sql.strip():
        raise ValueError("no query: send it in the body or as the query parameter")
    database = query.get("database")
    if database and database != warehouse_database:
        raise Refused(f"refused: database {database}: this port serves {warehouse_database!r}")
    params: dict[str, str] = {}
    for name, value in query.items():
        if name.startswith("param_"):
            params[name.removeprefix("param_")] = unescape_param(value)
        elif name in ("query", "database", "default_format", "query_id", "final"):
            continue
        elif name not in IGNORED_PARAMS:
            raise Refused(
                f"refused: setting {name} cannot be changed on this port (its limits and "
                "readonly stand)"
            )
    final = query.get("final", "1")
    if final not in ("0", "1"):
        raise ValueError(f"final={final!r}: 1 (the default: each message once) or 0")
    return ChRequest(
        sql,
        params,
        query.get("default_format") or "TabSeparated",
        query.get("query_id") or str(uuid.uuid4()),
        final=final == "1",
    )


def is_settings_probe(sql: str) -> str | None:
    """If ``sql`` is a client's settings probe, its FORMAT ("" when none); else None."""
    match = _PROBE.fullmatch(sql)
    return None if match is None else (match.group(1) or "")


def content_type(fmt: str) -> str:
    return _CONTENT_TYPES.get(
        fmt,
        "text/plain; charset=UTF-8" if "TSV" in fmt or "Tab" in fmt else "application/octet-stream",
    )


def error_body(code: int, name: str, message: str) -> bytes:
    """An error as ClickHouse writes one (clients show it as it is)."""
    if message.startswith("Code: "):
        return (message.rstrip() + "\n").encode()
    return f"Code: {code}. DB::Exception: {message}. ({name})\n".encode()
