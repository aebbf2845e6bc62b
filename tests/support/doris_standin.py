"""A STAND-IN for Apache Doris, for tests only: Doris cannot be installed on these machines (no
Debian, PyPI, npm or Maven package ships its backend). It is NOT Doris; it answers the parts of
Doris's documented contract the sink uses, so the sink's requests and its handling of the
answers are exercised over real sockets:

* an "FE" HTTP port: ``PUT /api/<db>/<table>/_stream_load`` answers ``307`` to a "BE" port
  under another host name (``localhost`` instead of ``127.0.0.1``: a client that drops the
  credentials on a cross-host redirect is refused there with 401); ``PUT
  /api/<db>/_stream_load_2pc`` commits (or aborts) a pre-committed load by ``txn_id`` or
  ``label``;
* the "BE": a Stream Load of JSON lines or an Arrow IPC stream under a label, with
  ``two_phase_commit``; the answers Doris documents (``Success`` with ``TxnId`` and
  ``TwoPhaseCommit``, ``Label Already Exists`` with ``ExistingJobStatus``, ``Fail`` with
  ``ErrorURL``); UNIQUE KEY tables with a sequence column (an upsert that keeps the row with
  the highest sequence value);
* a MySQL-protocol port (mysql-mimic, statements parsed as Doris SQL by sqlglot): ``CREATE
  TABLE`` in Doris's dialect (UNIQUE KEY, ``function_column.sequence_col``) becomes a SQLite
  table; other statements run on SQLite (``starts_with`` is registered).

``faults`` makes the next commits fail, as a crash between pre-commit and commit would leave
them. Everything lives in memory and stops with :meth:`DorisStandIn.stop`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow as pa
from mysql_mimic import MysqlServer, Session
from mysql_mimic.auth import NativePasswordAuthPlugin, SimpleIdentityProvider, User
from sqlglot import exp


@dataclass
class TableMeta:
    columns: list[str]
    key: list[str]
    sequence: str | None
    defaults: dict[str, Any] = field(default_factory=dict)  # literal DEFAULTs of the DDL


@dataclass
class Load:
    label: str
    table: str
    txn_id: int
    rows: list[dict[str, Any]]
    state: str  # PRECOMMITTED, VISIBLE, ABORTED


@dataclass
class Faults:
    failing_commits: int = 0  # the next N commits answer a failure


@dataclass
class StandInState:
    user: str
    password: str
    database: str
    db: sqlite3.Connection
    lock: threading.RLock = field(default_factory=threading.RLock)
    tables: dict[str, TableMeta] = field(default_factory=dict)
    loads: dict[str, Load] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)  # every Stream Load Status sent, in order
    faults: Faults = field(default_factory=Faults)
    next_txn: int = 1000

    # --- DDL and SQL ---

    def create_table(self, create: exp.Create) -> None:
        table = create.this.this.name if isinstance(create.this, exp.Schema) else create.this.name
        columns = [c.name for c in create.find_all(exp.ColumnDef)]
        defaults = {
            c.name: _number_or_text(constraint.kind.this.this)
            for c in create.find_all(exp.ColumnDef)
            for constraint in c.args.get("constraints") or []
            if isinstance(constraint.kind, exp.DefaultColumnConstraint)
            and isinstance(constraint.kind.this, exp.Literal)
        }
        props = create.args.get("properties")
        key: list[str] = []
        sequence = None
        for prop in props.expressions if props else []:
            if isinstance(prop, exp.UniqueKeyProperty):
                key = [e.name for e in prop.expressions]
            elif isinstance(prop, exp.Property) and prop.name == "function_column.sequence_col":
                sequence = prop.args["value"].name
        with self.lock:
            if table in self.tables:
                return
            self.tables[table] = TableMeta(columns, key, sequence, defaults)
            defs = ", ".join(f'"{c}"' for c in columns)
            unique = f", PRIMARY KEY ({', '.join(key)})" if key else ""
            self.db.execute(f'CREATE TABLE "{table}" ({defs}{unique})')

    def execute(self, sql: str) -> tuple[list[tuple[Any, ...]], list[str]]:
        if sql.lstrip().upper().startswith("INSERT INTO"):
            sql = "INSERT OR REPLACE INTO" + sql.lstrip()[len("INSERT INTO") :]
        with self.lock:
            cursor = self.db.execute(sql)
            names = [d[0] for d in cursor.description or ()]
            return [tuple(r) for r in cursor.fetchall()], names

    # --- loads ---

    def upsert(self, table: str, rows: list[dict[str, Any]]) -> None:
        meta = self.tables[table]
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        for row in rows:
            values = {c: row.get(c, meta.defaults.get(c)) for c in meta.columns}
            if "stored_at" in values and values["stored_at"] is None:
                values["stored_at"] = now
            names = ", ".join(f'"{c}"' for c in values)
            marks = ", ".join("?" for _ in values)
            updates = ", ".join(f'"{c}" = excluded."{c}"' for c in values if c not in meta.key)
            newer = f' WHERE excluded."{meta.sequence}" >= "{table}"."{meta.sequence}"'
            sql = (
                f'INSERT INTO "{table}" ({names}) VALUES ({marks}) '
                f"ON CONFLICT ({', '.join(meta.key)}) DO UPDATE SET {updates}"
                f"{newer if meta.sequence else ''}"
            )
            self.db.execute(sql, list(values.values()))

    def stream_load(self, table: str, headers: Any, body: bytes) -> dict[str, Any]:
        label = headers.get("label", "")
        with self.lock:
            existing = self.loads.get(label)
            if existing is not None and existing.state != "ABORTED":
                status = "FINISHED" if existing.state == "VISIBLE" else "RUNNING"
                return {
                    "Status": "Label Already Exists",
                    "ExistingJobStatus": status,
                    "Label": label,
                    "Message": f"Label [{label}] has already been used.",
                }
            if table not in self.tables:
                return {"Status": "Fail", "Message": f"unknown table, tableName={table}"}
            try:
                rows = _rows(headers, body, self.tables[table])
            except (ValueError, KeyError, pa.ArrowException) as exc:
                return {
                    "Status": "Fail",
                    "Message": f"[DATA_QUALITY_ERROR] {exc}",
                    "NumberFilteredRows": 1,
                    "ErrorURL": "http://be/api/_load_error_log",
                }
            self.next_txn += 1
            two_phase = headers.get("two_phase_commit", "false") == "true"
            load = Load(label, table, self.next_txn, rows, "PRECOMMITTED")
            self.loads[label] = load
            if not two_phase:
                self.commit(load)
            return {
                "TxnId": load.txn_id,
                "Label": label,
                "Status": "Success",
                "TwoPhaseCommit": str(two_phase).lower(),
                "Message": "OK",
                "NumberTotalRows": len(rows),
                "NumberLoadedRows": len(rows),
                "NumberFilteredRows": 0,
            }

    def commit(self, load: Load) -> None:
        self.upsert(load.table, load.rows)
        load.state = "VISIBLE"

    def two_phase(self, headers: Any) -> dict[str, Any]:
        with self.lock:
            txn, label = headers.get("txn_id"), headers.get("label")
            found = [
                load
                for load in self.loads.values()
                if (txn is not None and str(load.txn_id) == txn) or load.label == label
            ]
            if not found:
                return {"status": "ANALYSIS_ERROR", "msg": f"transaction {txn or label} not found"}
            load = found[0]
            if self.faults.failing_commits:
                self.faults.failing_commits -= 1
                return {"status": "INTERNAL_ERROR", "msg": "stand-in fault: commit failed"}
            if headers.get("txn_operation") == "abort":
                load.state = "ABORTED"
                return {"status": "Success", "msg": f"transaction [{load.txn_id}] aborted."}
            if load.state == "VISIBLE":
                message = f"transaction [{load.txn_id}] is already VISIBLE, not pre-committed."
                return {"status": "ANALYSIS_ERROR", "msg": message}
            self.commit(load)
            return {"status": "Success", "msg": f"transaction [{load.txn_id}] commit successfully."}

    def visible_rows(self, table: str) -> int:
        rows, _ = self.execute(f'SELECT count(*) FROM "{table}"')
        return int(rows[0][0])


def _number_or_text(literal: str) -> Any:
    """A DDL default as Doris would store it in its column (``"0"`` in a TINYINT is 0)."""
    try:
        return int(literal)
    except ValueError:
        return literal


def _seconds_diff(a: str, b: str) -> int:
    """Doris's seconds_diff(a, b) on the stand-in's text datetimes."""
    return int((datetime.fromisoformat(a) - datetime.fromisoformat(b)).total_seconds())


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, dict | list):
        return json.dumps(dict(value) if isinstance(value, list) else value, sort_keys=True)
    return value


def _rows(headers: Any, body: bytes, meta: TableMeta) -> list[dict[str, Any]]:
    columns = [c.strip().strip("`") for c in headers.get("columns", "").split(",") if c.strip()]
    unknown = [c for c in columns if c not in meta.columns]
    if unknown:
        raise ValueError(f"Unknown column(s) {unknown}")
    fmt = headers.get("format", "csv")
    if fmt == "json":
        raw = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    elif fmt == "arrow":
        raw = pa.ipc.open_stream(body).read_all().to_pylist()
    else:
        raise ValueError(f"format {fmt} is not served by the stand-in")
    rows = [{c: _cell(r.get(c)) for c in (columns or meta.columns)} for r in raw]
    for row in rows:
        for key in meta.key:
            if row.get(key) is None:
                raise ValueError(f"key column {key} is NULL")
    return rows


def _handler(state: StandInState, role: str, be_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _authorized(self) -> bool:
            token = base64.b64encode(f"{state.user}:{state.password}".encode()).decode()
            return self.headers.get("Authorization") == f"Basic {token}"

        def _answer(self, code: int, body: dict[str, Any] | None, location: str = "") -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length)
            parts = self.path.strip("/").split("/")
            if not self._authorized():
                self._answer(401, {"status": "FAILED", "msg": "Access denied"})
                return
            if parts[-1] == "_stream_load_2pc" and role == "fe":
                self._answer(200, state.two_phase(self.headers))
                return
            if len(parts) != 4 or parts[:1] != ["api"] or parts[3] != "_stream_load":
                self._answer(404, {"status": "FAILED", "msg": f"no such path {self.path}"})
                return
            if parts[1] != state.database:
                self._answer(200, {"Status": "Fail", "Message": f"unknown database {parts[1]}"})
                return
            if role == "fe":  # the FE hands the load to a BE: another host name, same machine
                self._answer(307, None, f"http://localhost:{be_port}{self.path}")
                return
            answer = state.stream_load(parts[2], self.headers, body)
            state.answers.append(str(answer["Status"]))
            self._answer(200, answer)

    return Handler


def _session_class(state: StandInState) -> type[Session]:
    class StandInSession(Session):
        dialect = "doris"

        async def query(
            self, expression: exp.Expression, sql: str, attrs: dict[str, str]
        ) -> tuple[list[tuple[Any, ...]], list[str]]:
            if isinstance(expression, exp.Create) and expression.kind == "TABLE":
                state.create_table(expression)
                return [], []
            return state.execute(expression.sql("sqlite"))

        async def schema(self) -> dict[str, Any]:
            tables = {t: {c: "TEXT" for c in m.columns} for t, m in state.tables.items()}
            return {state.database: tables}

    return StandInSession


class _OneUser(SimpleIdentityProvider):
    """The MySQL port admits the stand-in's one user with its password (native password)."""

    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._auth = NativePasswordAuthPlugin.create_auth_string(password)

    async def get_user(self, username: str) -> User | None:
        if username != self._user:
            return None
        plugin = NativePasswordAuthPlugin.name
        return User(name=username, auth_string=self._auth, auth_plugin=plugin)


@dataclass
class DorisStandIn:
    state: StandInState
    fe_port: int
    be_port: int
    mysql_port: int

    @property
    def url(self) -> str:
        s = self.state
        where = f"127.0.0.1:{self.mysql_port}/{s.database}?http_port={self.fe_port}"
        return f"doris://{s.user}:{s.password}@{where}"


@contextmanager
def doris_standin(
    user: str = "loader", password: str = "stand-in-pw", database: str = "fleet"
) -> Iterator[DorisStandIn]:
    """Start the stand-in (FE, BE and MySQL ports on free loopback ports); stop it after."""
    db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    db.create_function("starts_with", 2, lambda s, p: int(str(s).startswith(str(p))))
    db.create_function("now", 1, lambda _: datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"))
    db.create_function("seconds_diff", 2, _seconds_diff)
    state = StandInState(user, password, database, db)
    be = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, "be", 0))
    fe = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, "fe", be.server_address[1]))
    loop = asyncio.new_event_loop()
    mysql = MysqlServer(
        session_factory=_session_class(state), identity_provider=_OneUser(user, password)
    )
    loop.run_until_complete(mysql.start_server(host="127.0.0.1", port=0))
    mysql_port = mysql._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    threads = [
        threading.Thread(target=be.serve_forever, daemon=True),
        threading.Thread(target=fe.serve_forever, daemon=True),
        threading.Thread(target=loop.run_forever, daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield DorisStandIn(state, fe.server_address[1], be.server_address[1], mysql_port)
    finally:
        fe.shutdown()
        be.shutdown()
        fe.server_close()
        be.server_close()
        loop.call_soon_threadsafe(mysql.close)
        loop.call_soon_threadsafe(loop.stop)
        threads[2].join(timeout=10)
        db.close()
