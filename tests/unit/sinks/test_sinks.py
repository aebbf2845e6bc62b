"""The warehouse sink without a warehouse: Arrow conversion, dedup tokens, results, the query
server's request handling (against a fake backend)."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Any
from uuid import UUID

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queries.result import QueryResult, json_value
from queries.sqltext import check_read_only
from sinks.clickhouse import (
    EVENT_SCHEMA,
    TELEMETRY_SCHEMA,
    InvalidBatch,
    QueryFailed,
    SinkUnavailable,
    dedup_token,
    events_to_arrow,
    normalize_dsn,
    telemetry_to_arrow,
)
from sinks.query_server import (
    AccessDenied,
    Caller,
    QueryServer,
    answer,
    bearer_token,
    read_platform_secret,
    start_query_server,
    write_platform_secret,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in epoch ms


def reading(device_id: str = "dev-1", seq: int = 1, **metrics: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "ts": T0 + seq % 1_000_000 * 1000,
        "received_at": T0 + seq % 1_000_000 * 1000 + 20,
        "temperature": 21.5,
        "humidity": None,
        "battery": 88.0,
        "vibration_rms": None,
        "extra": {},
    }
    record.update(metrics)
    return record


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


def test_optional_telemetry_keys_may_be_missing() -> None:
    record = {"device_id": "d", "seq": 3, "ts": T0, "received_at": T0}
    table = telemetry_to_arrow([record])
    assert table.column("battery").to_pylist() == [None]
    assert table.column("extra").to_pylist() == [[]]


def test_events_become_the_table_columns() -> None:
    records = [event(attributes={"fw": "1.2.3"}, message="hello"), event(seq=2, type="reboot")]
    table = events_to_arrow(records)
    assert table.schema == EVENT_SCHEMA
    assert table.column("type").to_pylist() == ["connect", "reboot"]
    assert table.column("message").to_pylist() == ["hello", None]
    assert table.column("attributes").to_pylist() == [[("fw", "1.2.3")], []]


def test_an_empty_batch_is_an_empty_table() -> None:
    assert telemetry_to_arrow([]).num_rows == 0
    assert events_to_arrow([]).schema == EVENT_SCHEMA


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


# --- the query server, against a fake backend ----------------------------------------------


class FakeBackend:
    dsn = "chdb:///tmp/fleet-test-wh"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> QueryResult:
        statement = check_read_only(sql)
        self.calls.append((statement, dict(params or {})))
        if "boom" in statement:
            raise QueryFailed("Code: 47. Unknown identifier boom")
        if "down" in statement:
            raise SinkUnavailable("warehouse down")
        if "bug" in statement:
            raise ZeroDivisionError("bug")
        moment = datetime(2026, 1, 1, tzinfo=UTC)
        return QueryResult(("n", "at"), ("UInt8", "DateTime('UTC')"), ((1, moment),))


def body(**payload: Any) -> bytes:
    return json.dumps(payload).encode()


def test_the_server_answers_columns_and_json_safe_rows() -> None:
    backend = FakeBackend()
    reply = answer(backend, body(sql="SELECT {n:UInt8}", params={"n": 1}))
    assert reply.status == HTTPStatus.OK
    assert reply.body["columns"] == ["n", "at"]
    assert reply.body["rows"] == [[1, "2026-01-01T00:00:00+00:00"]]
    assert backend.calls == [("SELECT {n:UInt8}", {"n": "1"})]


@pytest.mark.parametrize(
    ("payload", "status", "kind"),
    [
        (body(sql="INSERT INTO telemetry VALUES (1)"), HTTPStatus.BAD_REQUEST, "refused"),
        (body(sql="DROP TABLE telemetry"), HTTPStatus.BAD_REQUEST, "refused"),
        (body(sql="SELECT boom"), HTTPStatus.BAD_REQUEST, "sql"),
        (body(sql="SELECT down"), HTTPStatus.SERVICE_UNAVAILABLE, "unavailable"),
        (body(sql="SELECT bug"), HTTPStatus.INTERNAL_SERVER_ERROR, "internal"),
        (body(sql=42), HTTPStatus.BAD_REQUEST, "bad_request"),
        (body(sql="SELECT 1", params=[1]), HTTPStatus.BAD_REQUEST, "bad_request"),
        (b"not json", HTTPStatus.BAD_REQUEST, "bad_request"),
        (
            body(sql="SELECT 1", warehouse="chdb:///elsewhere"),
            HTTPStatus.CONFLICT,
            "other_warehouse",
        ),
    ],
)
def test_the_server_refuses_with_a_json_error(
    payload: bytes, status: HTTPStatus, kind: str
) -> None:
    reply = answer(FakeBackend(), payload)
    assert reply.status == status
    assert reply.body["kind"] == kind
    assert reply.body["error"]


def test_the_server_accepts_its_own_warehouse_by_any_spelling() -> None:
    reply = answer(FakeBackend(), body(sql="SELECT 1", warehouse="chdb:///tmp/./fleet-test-wh"))
    assert reply.status == HTTPStatus.OK


class OneToken:
    """An authenticator that knows one token (the real one: streams/registry/query_access.py)."""

    def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise AccessDenied(HTTPStatus.UNAUTHORIZED, "a bearer token is required")
        if token != "good":
            raise AccessDenied(HTTPStatus.FORBIDDEN, "no grant", "user:x")
        return Caller("user:a")


@pytest.fixture
def server() -> Iterator[QueryServer]:
    with start_query_server(FakeBackend(), "127.0.0.1", 0, OneToken()) as running:
        yield running


def post(
    server: QueryServer, path: str, data: bytes, token: str | None = "good"
) -> tuple[int, Any]:
    host, port = server.address
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_server_speaks_http(server: QueryServer) -> None:
    assert post(server, "/query", body(sql="SELECT 1"))[0] == 200
    status, error = post(server, "/query", body(sql="DELETE FROM telemetry WHERE 1"))
    assert (status, error["kind"]) == (400, "refused")
    assert post(server, "/nope", b"{}")[0] == 404
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as response:
        assert json.load(response) == {"status": "ok", "warehouse": FakeBackend.dsn}


def test_the_server_wants_a_token_before_anything(server: QueryServer) -> None:
    status, error = post(server, "/query", body(sql="SELECT 1"), token=None)
    assert (status, error["kind"]) == (401, "unauthorized")
    status, error = post(server, "/query", body(sql="SELECT 1"), token="bad")
    assert (status, error["kind"], error["error"]) == (403, "forbidden", "no grant")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer  ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer abc.def", "abc.def"),
        ("bearer  abc ", "abc"),
    ],
)
def test_bearer_tokens_are_read_from_the_authorization_header(
    header: str | None, token: str | None
) -> None:
    assert bearer_token(header) == token


def test_the_platform_secret_is_private_and_new_each_time(tmp_path: Any) -> None:
    first = write_platform_secret(tmp_path / "run")
    second = write_platform_secret(tmp_path / "run")
    assert first != second
    assert len(second) >= 40
    assert read_platform_secret(tmp_path / "run") == second
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["query-port.secret"]
    assert (tmp_path / "run" / "query-port.secret").stat().st_mode & 0o777 == 0o600
    assert read_platform_secret(tmp_path / "elsewhere") is None
