"""The owner's query endpoint: chDB admits one process per folder, so it answers for the rest.

The process that owns the embedded warehouse (the cold-path sink) runs this small stdlib
HTTP server on ``settings.host:settings.query_port``; ``fleet sql`` posts its query here and
only opens the folder itself when nothing listens.

``POST /query`` with ``{"sql": "...", "params": {"name": "value"}, "warehouse": "<dsn>"}``
answers ``{"columns": [...], "types": [...], "rows": [[...]]}`` (datetimes as ISO 8601
strings). Errors are JSON too: ``{"error": "...", "kind": "..."}`` with 400 for a refused or
failed statement, 409 when ``warehouse`` names another warehouse than the one served, 503
when the warehouse is unavailable. ``GET /health`` answers ``{"status": "ok", "warehouse"}``.
Only reads are served: the statement guard refuses anything else and the session runs with
``readonly=2``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from infra.settings import Settings
from queries.sqltext import NotReadOnly
from sinks.clickhouse import QueryFailed, QueryResult, SinkUnavailable, normalize_dsn

__all__ = [
    "MAX_REQUEST_BYTES",
    "QueryBackend",
    "QueryServer",
    "answer",
    "serve_queries",
    "start_query_server",
]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20


class QueryBackend(Protocol):
    """What the server needs: a ClickHouseSink fits."""

    @property
    def dsn(self) -> str: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult: ...


@dataclass(frozen=True, slots=True)
class Reply:
    status: HTTPStatus
    body: dict[str, Any]


def _error(status: HTTPStatus, kind: str, message: str) -> Reply:
    return Reply(status, {"error": message, "kind": kind})


def parse_request(raw: bytes) -> tuple[str, dict[str, str], str | None]:
    """The (sql, params, warehouse) of a request body; ValueError when malformed."""
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise ValueError("the body is a JSON object")
    sql, params, warehouse = (
        payload.get("sql"),
        payload.get("params") or {},
        payload.get("warehouse"),
    )
    if not isinstance(sql, str):
        raise ValueError('"sql" must be a string')
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError('"params" must be an object')
    if warehouse is not None and not isinstance(warehouse, str):
        raise ValueError('"warehouse" must be a string')
    return sql, {k: str(v) for k, v in params.items()}, warehouse


def answer(backend: QueryBackend, raw: bytes) -> Reply:
    """The reply to one ``POST /query`` body (no I/O besides the query: unit-testable)."""
    try:
        sql, params, warehouse = parse_request(raw)
    except ValueError as exc:
        return _error(HTTPStatus.BAD_REQUEST, "bad_request", str(exc))
    if warehouse is not None and normalize_dsn(warehouse) != backend.dsn:
        return _error(
            HTTPStatus.CONFLICT, "other_warehouse", f"this server answers for {backend.dsn}"
        )
    try:
        return Reply(HTTPStatus.OK, backend.query(sql, params).to_json())
    except NotReadOnly as exc:
        return _error(HTTPStatus.BAD_REQUEST, "not_read_only", str(exc))
    except QueryFailed as exc:
        return _error(HTTPStatus.BAD_REQUEST, "sql", str(exc))
    except SinkUnavailable as exc:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", str(exc))
    except Exception as exc:  # a bug: the client still gets an answer, the log the trace
        log.exception("query server: unexpected failure")
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal", repr(exc))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _send(self, reply: Reply) -> None:
        body = json.dumps(reply.body, ensure_ascii=False).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._send(Reply(HTTPStatus.OK, {"status": "ok", "warehouse": self.server.backend.dsn}))
        else:
            self._send(_error(HTTPStatus.NOT_FOUND, "not_found", f"no {self.path}"))

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/query":
            self._send(_error(HTTPStatus.NOT_FOUND, "not_found", f"no {self.path}"))
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self.close_connection = True
            self._send(_error(HTTPStatus.BAD_REQUEST, "bad_request", "bad Content-Length"))
            return
        self._send(answer(self.server.backend, self.rfile.read(length)))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("query server: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: QueryBackend) -> None:
        self.backend = backend
        super().__init__(address, _Handler)


class QueryServer:
    """A running query server (see :func:`start_query_server`); ``close()`` stops it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> QueryServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_query_server(backend: QueryBackend, host: str, port: int) -> QueryServer:
    """Serve ``backend``'s reads on ``host:port`` (port 0 picks a free one) from a daemon
    thread; returns at once. Raises OSError when the port is taken."""
    server = _Server((host, port), backend)
    thread = threading.Thread(target=server.serve_forever, name=f"query-server:{port}", daemon=True)
    thread.start()
    return QueryServer(server, thread)


def serve_queries(settings: Settings, backend: QueryBackend) -> QueryServer:
    """The query server for this stack: ``settings.host:settings.query_port``."""
    return start_query_server(backend, settings.host, settings.query_port)
