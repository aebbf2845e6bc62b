"""The owner's query endpoint: chDB admits one process per folder, so it answers for the rest.

The process that owns the embedded warehouse (the cold-path sink) runs this small stdlib
HTTP server on ``settings.host:settings.query_port``; ``fleet sql`` sends its query here and
only opens the folder itself when nothing listens.

The port speaks the ClickHouse HTTP protocol (:mod:`sinks.clickhouse_http`) and nothing else
for queries: ``GET``/``POST /`` with the query in the body or the ``query`` parameter, and
``GET /ping``. ClickHouse clients connect unchanged, the platform token as password (or
``Authorization: Bearer``); ``fleet sql`` is one of them (clickhouse-connect). Errors are
written as ClickHouse writes them (text, ``X-ClickHouse-Exception-Code``): 401 without a valid
token, 403 when its principal may not read telemetry or the statement is refused, 400 for a
failed statement or one stopped at a limit, 503 when the warehouse is unavailable. ``GET
/health`` answers ``{"status": "ok", "warehouse": "<dsn>"}`` (which warehouse is served:
``fleet sql`` and the dashboard check it before reading through the port).

An :class:`Authenticator` decides who may query, built by the process that serves
(``streams.registry.query_access``: platform tokens and the ``rbac.grants`` table). Denied
calls are logged with the principal and reason, never the token. Only reads are served: the
statement guard (:mod:`sinks.sql_guard`) refuses anything else; each query runs on a read
connection of its own (side by side, the slowest holds no one else up) whose limits and
``readonly=1`` it cannot change.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from queries.result import RawResult
from queries.sqltext import NotReadOnly
from sinks.base import ClosesOnExit
from sinks.clickhouse import QueryFailed, SinkUnavailable
from sinks.clickhouse_http import (
    PROBE_SQL,
    ChRequest,
    content_type,
    credential,
    error_body,
    is_settings_probe,
)
from sinks.clickhouse_http import (
    parse_request as parse_ch_request,
)
from sinks.row_filters import NO_ROW, ReadScope

__all__ = [
    "MAX_REQUEST_BYTES",
    "PLATFORM_SECRET_FILE",
    "AccessDenied",
    "Authenticator",
    "Caller",
    "QueryBackend",
    "QueryServer",
    "read_platform_secret",
    "start_query_server",
    "write_platform_secret",
]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20


class QueryBackend(Protocol):
    """What the server needs: a ClickHouseSink fits."""

    @property
    def dsn(self) -> str: ...

    def query_raw(
        self, sql: str, params: Mapping[str, str], default_format: str, scope: ReadScope = ...
    ) -> RawResult: ...

    def platform_raw(self, sql: str, fmt: str) -> RawResult: ...


# The platform's own credential for this port (`fleet demo`'s counts, `fleet sql` run by the
# operator on the machine): a random secret per start of the serving process, in its run folder
# (mode 0600). Whoever reads it could read the platform's signing key beside it too.
PLATFORM_SECRET_FILE = "query-port.secret"  # noqa: S105 - a file name


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked, as the log names them (never a secret), and the rows they may read (deny
    by default: no scope, no row; the platform's own reads are :data:`EVERY_ROW`)."""

    principal: str
    reason: str = ""
    scope: ReadScope = NO_ROW


class AccessDenied(Exception):
    """401 (no valid credential) or 403 (a valid one without the grant); the reason is safe
    to send and to log (it never holds the token)."""

    def __init__(self, status: HTTPStatus, reason: str, principal: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.principal = principal


class Authenticator(Protocol):
    """Who may query: ``authenticate`` returns the caller or raises :class:`AccessDenied`."""

    def authenticate(self, token: str | None) -> Caller: ...


def write_platform_secret(run_dir: Path) -> str:
    """A new platform secret in ``run_dir`` (atomically, mode 0600); returns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{PLATFORM_SECRET_FILE}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret)
        os.replace(tmp, run_dir / PLATFORM_SECRET_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return secret


def read_platform_secret(run_dir: Path) -> str | None:
    """The serving process's platform secret, if this user can read it."""
    try:
        return (run_dir / PLATFORM_SECRET_FILE).read_text().strip() or None
    except OSError:
        return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _send_json(self, status: HTTPStatus, body: Mapping[str, str]) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json; charset=utf-8")

    # --- the ClickHouse HTTP protocol: GET or POST on "/", GET /ping ---

    def _send_bytes(
        self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _ch_error(self, status: int, code: int, name: str, message: str) -> None:
        headers = {"X-ClickHouse-Exception-Code": str(code)}
        if status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = 'Basic realm="fleetstream", charset="UTF-8"'
        self._send_bytes(
            status, error_body(code, name, message), "text/plain; charset=UTF-8", headers
        )

    def _clickhouse(self, body: bytes) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        try:
            caller = self.server.access.authenticate(
                credential(
                    self.headers.get("Authorization"), self.headers.get("X-ClickHouse-Key"), query
                )
            )
        except AccessDenied as denied:
            self._log_denied(denied)
            code, name = (
                (516, "AUTHENTICATION_FAILED") if denied.status == 401 else (497, "ACCESS_DENIED")
            )
            self._ch_error(denied.status, code, name, denied.reason)
            return
        try:
            request = parse_ch_request(query, body)
        except NotReadOnly as exc:
            self._ch_error(HTTPStatus.FORBIDDEN, 497, "ACCESS_DENIED", str(exc))
            return
        except ValueError as exc:
            self._ch_error(HTTPStatus.BAD_REQUEST, 62, "SYNTAX_ERROR", str(exc))
            return
        log.debug("query port (ClickHouse HTTP): query by %s", caller.principal)
        self._ch_answer(request, replace(caller.scope, final=request.final))

    def _ch_answer(self, request: ChRequest, scope: ReadScope) -> None:
        backend = self.server.backend
        try:
            probe = is_settings_probe(request.sql)
            if probe is not None:
                result = backend.platform_raw(PROBE_SQL, probe or request.default_format)
            else:
                result = backend.query_raw(
                    request.sql, request.params, request.default_format, scope
                )
        except NotReadOnly as exc:
            self._ch_error(HTTPStatus.FORBIDDEN, 497, "ACCESS_DENIED", str(exc))
            return
        except QueryFailed as exc:  # the engine's own code when it gave one (159: timeout...)
            code = re.match(r"Code: (\d+)\.", str(exc))
            self._ch_error(
                HTTPStatus.BAD_REQUEST, int(code.group(1)) if code else 1, "QUERY_FAILED", str(exc)
            )
            return
        except SinkUnavailable as exc:
            self._ch_error(HTTPStatus.SERVICE_UNAVAILABLE, 210, "NETWORK_ERROR", str(exc))
            return
        except Exception as exc:  # a bug: the client still gets an answer, the log the trace
            log.exception("query server: unexpected failure")
            self._ch_error(HTTPStatus.INTERNAL_SERVER_ERROR, 1001, "STD_EXCEPTION", repr(exc))
            return
        headers = {
            "X-ClickHouse-Format": result.fmt,
            "X-ClickHouse-Query-Id": request.query_id,
            "X-ClickHouse-Summary": "{}",
        }
        self._send_bytes(HTTPStatus.OK, result.data, content_type(result.fmt), headers)

    def _log_denied(self, denied: AccessDenied) -> None:
        log.warning(
            "query port: %d for %s from %s: %s",
            denied.status,
            denied.principal or "an unauthenticated caller",
            self.client_address[0],
            denied.reason,
        )

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/ping":
            self._send_bytes(HTTPStatus.OK, b"Ok.\n", "text/plain; charset=UTF-8")
            return
        if path == "/":
            self._clickhouse(b"")
            return
        if path.rstrip("/") == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok", "warehouse": self.server.backend.dsn})
        else:
            self._not_found(path)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path != "/":
            self._not_found(path)  # no other protocol here (the JSON `POST /query` is retired)
            return
        body = self._read_body()
        if body is None:
            self._ch_error(HTTPStatus.BAD_REQUEST, 62, "SYNTAX_ERROR", "bad Content-Length")
        else:
            self._clickhouse(body)

    def _not_found(self, path: str) -> None:
        self.close_connection = True  # the body of an unknown POST may be left unread
        self._send_bytes(
            HTTPStatus.NOT_FOUND,
            f"There is no handle {path}: this port speaks the ClickHouse HTTP protocol "
            "(GET or POST /, GET /ping, GET /health)\n".encode(),
            "text/plain; charset=UTF-8",
        )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("query server: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], backend: QueryBackend, access: Authenticator
    ) -> None:
        self.backend = backend
        self.access = access
        super().__init__(address, _Handler)


class QueryServer(ClosesOnExit):
    """A running query server (see :func:`start_query_server`); ``close()`` stops it."""

    def __init__(
        self, server: _Server, thread: threading.Thread, on_close: Callable[[], None] | None
    ) -> None:
        self._server = server
        self._thread = thread
        self._on_close = on_close

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._on_close is not None:
            self._on_close()


def start_query_server(
    backend: QueryBackend,
    host: str,
    port: int,
    access: Authenticator,
    on_close: Callable[[], None] | None = None,
) -> QueryServer:
    """Serve ``backend``'s reads on ``host:port`` (port 0 picks a free one) to the callers
    ``access`` lets in, from a daemon thread; returns at once. ``on_close`` runs after the
    server stopped. Raises OSError when the port is taken."""
    server = _Server((host, port), backend, access)
    thread = threading.Thread(target=server.serve_forever, name=f"query-server:{port}", daemon=True)
    thread.start()
    return QueryServer(server, thread, on_close)
