"""The warehouse sink without a warehouse: Arrow conversion, dedup tokens, results, the query
server's request handling (against a fake backend)."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Any
from uuid import UUID

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queries.result import QueryResult, RawResult, json_value
from queries.sqltext import check_read_only
from sinks.clickhouse import (
    ALERTS_TABLE,
    EVENT_SCHEMA,
    EVENTS_TABLE,
    TELEMETRY_SCHEMA,
    TENANT_COLUMNS,
    TWIN_HISTORY_TABLE,
    InvalidBatch,
    QueryFailed,
    SinkUnavailable,
    dedup_token,
    normalize_dsn,
    table_to_arrow,
    telemetry_to_arrow,
)
from sinks.query_server import (
    AccessDenied,
    Caller,
    QueryServer,
    read_platform_secret,
    start_query_server,
    write_platform_secret,
)
from sinks.row_filters import EVERY_ROW, ReadScope
from tests.support.records import telemetry_record

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in epoch ms


def reading(device_id: str = "dev-1", seq: int = 1, **metrics: Any) -> dict[str, Any]:
    ts = T0 + seq % 1_000_000 * 1000
    return telemetry_record(
        device_id, seq, ts, 20, **{"temperature": 21.5, "battery": 88.0, **metrics}
    )


def event(device_id: str = "dev-1", seq: int = 1, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "ts": T0,
        "received_at": T0 + 5,
        "type": "connect",
        "message": None,
        "attributes": {},
    }
    record.update(fields)
    return record


# --- Arrow conversion ----------------------------------------------------------------------


def test_telemetry_becomes_the_table_columns() -> None:
    records = [
        reading(seq=1, extra={"rpm": 1200.0}),
        reading(seq=2, temperature=None, humidity=40.5),
    ]
    table = telemetry_to_arrow(records)
    assert table.schema == TELEMETRY_SCHEMA
    assert table.num_rows == 2
    assert table.column("seq").to_pylist() == [1, 2]
    assert table.column("temperature").to_pylist() == [21.5, None]
    assert table.column("humidity").to_pylist() == [None, 40.5]
    assert table.column("extra").to_pylist() == [[("rpm", 1200.0)], []]
    ts = table.column("ts").to_pylist()
    assert ts[0] == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert table.column("received_at").type == pa.timestamp("ms", tz="UTC")


def test_tenant_columns_come_with_the_batch_or_are_empty() -> None:
    records = [reading(seq=1), reading(seq=2)]
    tenants = {"org": ["acme", ""], "project": ["plant", ""], "group": ["line-1", ""]}
    table = telemetry_to_arrow(records, tenants)
    assert {name: table.column(name).to_pylist() for name in TENANT_COLUMNS} == tenants
    untold = telemetry_to_arrow(records)
    assert untold.column("org").to_pylist() == ["", ""]
    for table in (EVENTS_TABLE, ALERTS_TABLE, TWIN_HISTORY_TABLE):
        assert {*TENANT_COLUMNS} <= set(table_to_arrow(table, []).schema.names)
    with pytest.raises(InvalidBatch, match="column org: 1 values for 2 rows"):
        telemetry_to_arrow(records, {"org": ["acme"]})


def test_optional_telemetry_keys_may_be_missing() -> None:
    record = {"device_id": "d", "seq": 3, "ts": T0, "received_at": T0}
    table = telemetry_to_arrow([record])
    assert table.column("battery").to_pylist() == [None]
    assert table.column("extra").to_pylist() == [[]]


def test_events_become_the_table_columns() -> None:
    records = [event(attributes={"fw": "1.2.3"}, message="hello"), event(seq=2, type="reboot")]
    table = table_to_arrow(EVENTS_TABLE, records)
    assert table.schema == EVENT_SCHEMA
    assert table.column("type").to_pylist() == ["connect", "reboot"]
    assert table.column("message").to_pylist() == ["hello", None]
    assert table.column("attributes").to_pylist() == [[("fw", "1.2.3")], []]


def test_an_empty_batch_is_an_empty_table() -> None:
    assert telemetry_to_arrow([]).num_rows == 0
    assert table_to_arrow(EVENTS_TABLE, []).schema == EVENT_SCHEMA


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"seq": -1}, "seq"),
        ({"seq": None}, "seq"),
        ({"device_id": None}, "device_id"),
        ({"ts": "yesterday"}, "ts"),
        ({"temperature": "warm"}, "temperature"),
        ({"extra": {"rpm": "fast"}}, "extra"),
    ],
)
def test_records_that_do_not_fit_are_refused_with_the_column(
    change: dict[str, Any], column: str
) -> None:
    with pytest.raises(InvalidBatch, match=f"column {column}"):
        telemetry_to_arrow([reading(), {**reading(seq=2), **change}])


def test_a_missing_required_key_is_refused() -> None:
    record = reading()
    del record["received_at"]
    with pytest.raises(InvalidBatch, match="received_at"):
        telemetry_to_arrow([record])
    assert issubclass(InvalidBatch, ValueError)


# --- deduplication token -------------------------------------------------------------------


def test_the_token_is_deterministic() -> None:
    records = [reading(seq=s) for s in range(5)]
    assert dedup_token("telemetry", telemetry_to_arrow(records)) == dedup_token(
        "telemetry", telemetry_to_arrow([dict(r) for r in records])
    )


def test_the_token_names_the_table_and_the_keys() -> None:
    batch = telemetry_to_arrow([reading(seq=s) for s in range(5)])
    token = dedup_token("telemetry", batch)
    assert token.startswith("telemetry-")
    assert dedup_token("device_events", batch) != token
    assert dedup_token("telemetry", batch.slice(0, 4)) != token
    other_device = telemetry_to_arrow([reading(device_id="dev-2", seq=s) for s in range(5)])
    assert dedup_token("telemetry", other_device) != token


def test_the_token_does_not_mistake_key_boundaries() -> None:
    # ("ab", "c") and ("a", "bc") concatenate to the same bytes: lengths are hashed too.
    first = telemetry_to_arrow([reading("ab", 1), reading("c", 1)])
    second = telemetry_to_arrow([reading("a", 1), reading("bc", 1)])
    assert dedup_token("telemetry", first) != dedup_token("telemetry", second)


def test_an_empty_batch_has_a_token() -> None:
    assert dedup_token("telemetry", telemetry_to_arrow([])).startswith("telemetry-")


keys = st.lists(
    st.tuples(st.sampled_from(["a", "b", "dev-1", "dev-22", "ü"]), st.integers(0, 2**63)),
    min_size=1,
    max_size=40,
    unique=True,
)


@settings(max_examples=60, deadline=None)
@given(keys=keys, seed=st.integers(0, 1000), split=st.integers(0, 40))
def test_the_token_ignores_row_order_and_chunking(
    keys: list[tuple[str, int]], seed: int, split: int
) -> None:
    records = [reading(d, s) for d, s in keys]
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    split = min(split, len(shuffled))
    chunked = pa.concat_tables(
        [telemetry_to_arrow(shuffled[:split]), telemetry_to_arrow(shuffled[split:])]
    )
    expected = dedup_token("telemetry", telemetry_to_arrow(records))
    assert dedup_token("telemetry", chunked) == expected
    # A slice of a bigger table (an Arrow offset) hashes the same as the rows alone.
    padded = telemetry_to_arrow([reading("zz", 1), *records])
    assert dedup_token("telemetry", padded.slice(1)) == expected


# --- results -------------------------------------------------------------------------------


def test_values_become_json_safe() -> None:
    moment = datetime(2026, 1, 1, 12, 30, 0, 123000, tzinfo=UTC)
    assert json_value(moment) == "2026-01-01T12:30:00.123000+00:00"
    assert json_value(date(2026, 1, 2)) == "2026-01-02"
    assert json_value(float("nan")) is None
    assert json_value(float("inf")) is None
    assert json_value(Decimal("1.10")) == "1.10"
    assert json_value(UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert json_value(b"ab") == "ab"
    assert json_value({"k": (1.5, moment)}) == {"k": [1.5, "2026-01-01T12:30:00.123000+00:00"]}
    assert json_value(True) is True


def test_a_result_survives_its_json_form() -> None:
    result = QueryResult(
        ("device_id", "ts", "p"),
        ("String", "DateTime64(3, 'UTC')", "Array(Float64)"),
        (("d1", datetime(2026, 1, 1, tzinfo=UTC), [1.0, 2.0]),),
    )
    wire = json.loads(json.dumps(result.to_json()))
    back = QueryResult.from_json(wire)
    assert back == result.json_safe()
    assert back.records() == [
        {"device_id": "d1", "ts": "2026-01-01T00:00:00+00:00", "p": [1.0, 2.0]}
    ]


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("chdb:///tmp/x/../wh", "chdb:///tmp/wh"),
        ("chdb://memory", "chdb://:memory:"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
    ],
)
def test_dsns_are_normalized(dsn: str, expected: str) -> None:
    assert normalize_dsn(dsn) == expected


# --- the query server (the ClickHouse HTTP protocol only), against a fake backend ---------


class FakeBackend:
    dsn = "chdb:///tmp/fleet-test-wh"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], str, ReadScope]] = []

    def query_raw(
        self, sql: str, params: Mapping[str, str], default_format: str, scope: ReadScope
    ) -> RawResult:
        statement = check_read_only(sql)
        self.calls.append((statement, dict(params), default_format, scope))
        if "boom" in statement:
            raise QueryFailed("Code: 47. DB::Exception: Unknown identifier boom")
        if "down" in statement:
            raise SinkUnavailable("warehouse down")
        if "bug" in statement:
            raise ZeroDivisionError("bug")
        return RawResult(b'{"n":1}\n', default_format)

    def platform_raw(self, sql: str, fmt: str) -> RawResult:
        return RawResult(b"", fmt)


class OneToken:
    """An authenticator that knows one token (the real one: streams/registry/query_access.py)."""

    def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise AccessDenied(HTTPStatus.UNAUTHORIZED, "a token is required")
        if token != "good":
            raise AccessDenied(HTTPStatus.FORBIDDEN, "no grant", "user:x")
        return Caller("user:a", scope=EVERY_ROW)


@dataclass
class Served:
    server: QueryServer
    backend: FakeBackend


@pytest.fixture
def served() -> Iterator[Served]:
    backend = FakeBackend()
    with start_query_server(backend, "127.0.0.1", 0, OneToken()) as running:
        yield Served(running, backend)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


def call(
    served: Served,
    path: str,
    data: bytes | None,
    token: str | None = "good",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    host, port = served.server.address
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data)
    if token is not None:
        request.add_header("X-ClickHouse-Key", token)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Reply(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), dict(exc.headers))


def test_the_server_answers_a_clickhouse_request_in_the_format_asked(served: Served) -> None:
    reply = call(served, "/?param_n=1&default_format=JSONEachRow", b"SELECT {n:UInt8}")
    assert (reply.status, reply.body) == (200, b'{"n":1}\n')
    assert reply.headers["X-ClickHouse-Format"] == "JSONEachRow"
    statement, params, fmt, scope = served.backend.calls[0]
    assert (statement, params, fmt) == ("SELECT {n:UInt8}", {"n": "1"}, "JSONEachRow")
    assert scope.final  # each message once unless the caller opts out
    assert call(served, "/?final=0&query=SELECT%201", None).status == 200
    assert not served.backend.calls[1][3].final


@pytest.mark.parametrize(
    ("sql", "status", "code"),
    [
        ("INSERT INTO telemetry VALUES (1)", 403, "497"),
        ("DROP TABLE telemetry", 403, "497"),
        ("SELECT boom", 400, "47"),
        ("SELECT down", 503, "210"),
        ("SELECT bug", 500, "1001"),
        ("", 400, "62"),
    ],
)
def test_the_server_refuses_as_clickhouse_does(
    served: Served, sql: str, status: int, code: str
) -> None:
    reply = call(served, "/", sql.encode())
    assert reply.status == status
    assert reply.body.startswith(b"Code: ")
    assert reply.headers["X-ClickHouse-Exception-Code"] == code


def test_the_json_protocol_is_retired(served: Served) -> None:
    body = json.dumps({"sql": "SELECT 1"}).encode()
    reply = call(served, "/query", body, headers={"Authorization": "Bearer good"})
    assert reply.status == 404
    assert b"ClickHouse HTTP protocol" in reply.body
    assert served.backend.calls == []
    assert call(served, "/nope", None).status == 404


def test_the_server_pings_and_names_its_warehouse(served: Served) -> None:
    assert call(served, "/ping", None, token=None).body == b"Ok.\n"
    health = call(served, "/health", None, token=None)
    assert json.loads(health.body) == {"status": "ok", "warehouse": FakeBackend.dsn}


def test_the_server_wants_a_token_before_anything(served: Served) -> None:
    reply = call(served, "/", b"SELECT 1", token=None)
    assert (reply.status, reply.headers["X-ClickHouse-Exception-Code"]) == (401, "516")
    assert "WWW-Authenticate" in reply.headers
    reply = call(served, "/", b"SELECT 1", token="bad")
    assert (reply.status, reply.headers["X-ClickHouse-Exception-Code"]) == (403, "497")
    assert b"no grant" in reply.body
    bearer = call(served, "/", b"SELECT 1", token=None, headers={"Authorization": "Bearer good"})
    assert bearer.status == 200
    assert [c[0] for c in served.backend.calls] == ["SELECT 1"]


def test_the_platform_secret_is_private_and_new_each_time(tmp_path: Any) -> None:
    first = write_platform_secret(tmp_path / "run")
    second = write_platform_secret(tmp_path / "run")
    assert first != second
    assert len(second) >= 40
    assert read_platform_secret(tmp_path / "run") == second
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["query-port.secret"]
    assert (tmp_path / "run" / "query-port.secret").stat().st_mode & 0o777 == 0o600
    assert read_platform_secret(tmp_path / "elsewhere") is None
