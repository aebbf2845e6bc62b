"""The Doris sink against Doris's documented Stream Load contract, without services: labels
from Kafka offsets, request headers, the FE's 307 to a BE (credentials kept), two-phase
commit, and every ``Status`` a load answers (sinks/doris_load.py, sinks/doris.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import requests
import sqlglot

from queries.runner import CHECKOUT
from queries.sqltext import check_read_only, load_sql_file
from sinks.base import (
    ALERTS_TABLE,
    EVENTS_TABLE,
    TELEMETRY_TABLE,
    BatchOrigin,
    InvalidBatch,
    QueryFailed,
    SinkUnavailable,
)
from sinks.doris import (
    DORIS_SCHEMAS,
    DorisSink,
    bind_params,
    load_format,
    parse_doris_dsn,
)
from sinks.doris_load import (
    LoadOutcome,
    LoadRequest,
    StreamLoader,
    classify_commit,
    classify_load,
    load_headers,
)

DSN = "doris://loader:s%40cret@127.0.0.1:9030/fleet?http_port=8030"


def _response(status: int, body: Any = None, location: str | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = b"" if body is None else json.dumps(body).encode()
    if location:
        response.headers["Location"] = location
    return response


@dataclass
class FakeSession:
    """Answers PUTs from a script, keyed by URL; records what was sent."""

    script: dict[str, list[requests.Response]]
    sent: list[dict[str, Any]] = field(default_factory=list)

    def put(self, url: str, **kwargs: Any) -> requests.Response:
        self.sent.append({"url": url, **kwargs})
        answers = self.script.get(url)
        if not answers:
            raise requests.ConnectionError(f"nothing scripted for {url}")
        return answers.pop(0)


def _request(label: str = "fleet_telemetry_telemetry_raw_p0_0_9") -> LoadRequest:
    return LoadRequest(
        "http://fe:8030", "fleet", "telemetry", label, b'{"a":1}\n', "json", ("a", "b")
    )


LOAD_URL = "http://fe:8030/api/fleet/telemetry/_stream_load"
BE_URL = "http://be-3:8040/api/fleet/telemetry/_stream_load"
COMMIT_URL = "http://fe:8030/api/fleet/_stream_load_2pc"


# --- the URL -----------------------------------------------------------------------------


def test_the_url_names_both_ports_the_database_and_the_user() -> None:
    config = parse_doris_dsn(DSN)
    assert (config.host, config.mysql_port, config.http_port) == ("127.0.0.1", 9030, 8030)
    assert (config.database, config.user, config.password) == ("fleet", "loader", "s@cret")
    assert config.http_base == "http://127.0.0.1:8030"
    assert "s@cret" not in config.dsn
    assert "cret" not in config.dsn


@pytest.mark.parametrize(
    "bad", ["http://h:9030/db", "doris://u@h:9030/", "doris://u@h:9030/bad-name;drop"]
)
def test_a_url_that_is_not_a_doris_one_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="Doris URL"):
        parse_doris_dsn(bad)


# --- labels ------------------------------------------------------------------------------


def test_the_label_is_the_batch_offset_range_whatever_the_record_order() -> None:
    one = BatchOrigin.of("telemetry.raw", [(0, 12), (1, 7), (0, 10), (1, 9), (0, 11)])
    other = BatchOrigin.of("telemetry.raw", [(1, 9), (0, 10), (0, 12), (1, 7), (0, 11)])
    assert one == other
    assert one.label("telemetry") == "fleet_telemetry_telemetry_raw_p0_10_12_p1_7_9"
    assert one.label("quarantine") != one.label("telemetry")  # one label per table
    later = BatchOrigin.of("telemetry.raw", [(0, 13), (1, 10)])
    assert later.label("telemetry") != one.label("telemetry")


def test_a_long_label_is_cut_and_hashed_within_dorises_limit() -> None:
    origin = BatchOrigin.of("telemetry.raw", [(p, 10_000_000 + p) for p in range(40)])
    label = origin.label("telemetry")
    assert len(label) <= 128
    assert label.startswith("fleet_telemetry_telemetry_raw_p0_")
    assert all(c.isalnum() or c in "_-" for c in label)
    shifted = BatchOrigin.of("telemetry.raw", [(p, 10_000_001 + p) for p in range(40)])
    assert shifted.label("telemetry") != label


# --- request building ----------------------------------------------------------------------


def test_load_headers_ask_for_two_phase_commit_under_the_label() -> None:
    headers = load_headers(_request())
    assert headers["label"] == "fleet_telemetry_telemetry_raw_p0_0_9"
    assert headers["two_phase_commit"] == "true"
    assert headers["format"] == "json"
    assert headers["read_json_by_line"] == "true"
    assert headers["columns"] == "`a`,`b`"
    assert headers["max_filter_ratio"] == "0"
    assert headers["Expect"] == "100-continue"
    arrow = LoadRequest("http://fe:8030", "fleet", "ota_events", "l", b"", "arrow", ("x",))
    assert "read_json_by_line" not in load_headers(arrow)


def test_tables_with_a_map_load_as_json_the_others_as_arrow() -> None:
    formats = {table: load_format(schema) for table, schema in DORIS_SCHEMAS.items()}
    assert formats == {
        "telemetry": "json",
        "device_events": "json",
        "quarantine": "json",
        "twin_history": "arrow",
        "ota_events": "arrow",
        "alerts": "arrow",
    }


# --- every Status ------------------------------------------------------------------------


def test_success_with_two_phase_commit_is_precommitted_with_its_transaction() -> None:
    body = {"Status": "Success", "TxnId": 42, "TwoPhaseCommit": "true", "NumberLoadedRows": 3}
    result = classify_load(body, "l1")
    assert (result.outcome, result.txn_id, result.rows) == (LoadOutcome.PRECOMMITTED, 42, 3)
    assert classify_load({"Status": "Success", "TxnId": 5}, "l1").outcome is LoadOutcome.COMMITTED


def test_publish_timeout_is_committed_and_not_resent() -> None:
    body = {"Status": "Publish Timeout", "TxnId": 7, "NumberLoadedRows": 2}
    assert classify_load(body, "l1").outcome is LoadOutcome.COMMITTED


def test_label_already_exists_is_loaded_when_finished_and_to_commit_when_running() -> None:
    finished = {"Status": "Label Already Exists", "ExistingJobStatus": "FINISHED"}
    running = {"Status": "Label Already Exists", "ExistingJobStatus": "RUNNING"}
    assert classify_load(finished, "l1").outcome is LoadOutcome.ALREADY_LOADED
    assert classify_load(running, "l1").outcome is LoadOutcome.TO_COMMIT


@pytest.mark.parametrize(
    "body",
    [
        {"Status": "Fail", "Message": "too many filtered rows", "ErrorURL": "http://be/err"},
        {"Status": "Fail", "Message": "[DATA_QUALITY_ERROR] bad value", "NumberFilteredRows": 1},
        {"Status": "Fail", "Message": "Parse json data for JsonDoc failed"},
    ],
)
def test_a_failed_load_of_bad_rows_is_an_invalid_batch(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidBatch, match="stream load l1"):
        classify_load(body, "l1")


@pytest.mark.parametrize(
    "body",
    [
        {"Status": "Fail", "Message": "[E-235] too many versions, wait for compaction"},
        {"Status": "Fail", "Message": "timeout when waiting for the tablet writer"},
        {"Status": "Whatever"},
        {},
    ],
)
def test_any_other_failure_is_retried(body: dict[str, Any]) -> None:
    with pytest.raises(SinkUnavailable):
        classify_load(body, "l1")


def test_a_commit_answer_decides_by_its_status() -> None:
    classify_commit({"status": "Success", "msg": "transaction [42] commit successfully."}, "l")
    classify_commit({"status": "ANALYSIS_ERROR", "msg": "transaction [42] is already VISIBLE"}, "l")
    with pytest.raises(SinkUnavailable, match="commit of l failed"):
        classify_commit({"status": "ANALYSIS_ERROR", "msg": "transaction not found"}, "l")


# --- the HTTP exchange ---------------------------------------------------------------------


def test_the_fe_redirect_is_followed_with_credentials_then_the_load_is_committed() -> None:
    ok = {"Status": "Success", "TxnId": 42, "TwoPhaseCommit": "true", "NumberLoadedRows": 1}
    session = FakeSession(
        {
            LOAD_URL: [_response(307, location=BE_URL)],
            BE_URL: [_response(200, ok)],
            COMMIT_URL: [_response(200, {"status": "Success", "msg": "committed"})],
        }
    )
    loader = StreamLoader(session, "loader", "pw")  # type: ignore[arg-type]
    result = loader.load(_request())
    assert result.outcome is LoadOutcome.PRECOMMITTED
    assert [s["url"] for s in session.sent] == [LOAD_URL, BE_URL, COMMIT_URL]
    assert all(s["auth"] == ("loader", "pw") for s in session.sent)
    assert all(s["allow_redirects"] is False for s in session.sent)
    assert session.sent[1]["data"] == session.sent[0]["data"] == b'{"a":1}\n'
    assert session.sent[1]["headers"]["label"] == "fleet_telemetry_telemetry_raw_p0_0_9"
    commit = session.sent[2]["headers"]
    assert (commit["txn_id"], commit["txn_operation"]) == ("42", "commit")


def test_a_resent_batch_is_loaded_already_and_not_committed_again() -> None:
    exists = {"Status": "Label Already Exists", "ExistingJobStatus": "FINISHED"}
    session = FakeSession({LOAD_URL: [_response(200, exists)]})
    result = StreamLoader(session, "u", "p").load(_request())  # type: ignore[arg-type]
    assert result.outcome is LoadOutcome.ALREADY_LOADED
    assert [s["url"] for s in session.sent] == [LOAD_URL]


def test_a_load_left_precommitted_by_a_crash_is_committed_by_its_label() -> None:
    running = {"Status": "Label Already Exists", "ExistingJobStatus": "RUNNING"}
    session = FakeSession(
        {
            LOAD_URL: [_response(200, running)],
            COMMIT_URL: [_response(200, {"status": "Success", "msg": "ok"})],
        }
    )
    StreamLoader(session, "u", "p").load(_request())  # type: ignore[arg-type]
    commit = session.sent[-1]["headers"]
    assert commit["label"] == "fleet_telemetry_telemetry_raw_p0_0_9"
    assert "txn_id" not in commit


def test_a_failed_commit_is_retried_and_so_is_an_unreachable_fe() -> None:
    ok = {"Status": "Success", "TxnId": 9, "TwoPhaseCommit": "true"}
    session = FakeSession(
        {
            LOAD_URL: [_response(200, ok)],
            COMMIT_URL: [_response(200, {"status": "Fail", "msg": "txn 9 not PRECOMMITTED"})],
        }
    )
    with pytest.raises(SinkUnavailable, match="commit"):
        StreamLoader(session, "u", "p").load(_request())  # type: ignore[arg-type]
    with pytest.raises(SinkUnavailable, match="PUT"):
        StreamLoader(FakeSession({}), "u", "p").load(_request())  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_said_plainly_and_retried(status: int) -> None:
    session = FakeSession({LOAD_URL: [_response(status, {"msg": "denied"})]})
    with pytest.raises(SinkUnavailable, match="LOAD privilege"):
        StreamLoader(session, "u", "p").load(_request())  # type: ignore[arg-type]


def test_an_answer_that_is_not_json_is_retried() -> None:
    response = requests.Response()
    response.status_code, response._content = 502, b"<html>bad gateway</html>"
    session = FakeSession({LOAD_URL: [response]})
    with pytest.raises(SinkUnavailable, match="not a JSON answer"):
        StreamLoader(session, "u", "p").load(_request())  # type: ignore[arg-type]


def test_a_redirect_loop_ends() -> None:
    session = FakeSession({LOAD_URL: [_response(307, location=LOAD_URL) for _ in range(9)]})
    with pytest.raises(SinkUnavailable, match="redirects"):
        StreamLoader(session, "u", "p").load(_request())  # type: ignore[arg-type]


# --- the sink's bodies -----------------------------------------------------------------------


@dataclass
class RecordingLoader:
    requests: list[LoadRequest] = field(default_factory=list)

    def load(self, request: LoadRequest) -> Any:
        self.requests.append(request)
        return type("R", (), {"rows": 0})()


def _telemetry(seq: int, **extra: Any) -> dict[str, Any]:
    return {
        "device_id": "pump-1",
        "seq": seq,
        "ts": 1_767_225_600_000 + seq,
        "received_at": 1_767_225_600_500 + seq,
        "temperature": 21.5,
        "extra": {"rpm": 1200.0},
        **extra,
    }


def test_telemetry_goes_as_json_lines_with_utc_times_tenant_columns_and_no_nan() -> None:
    sink = DorisSink(DSN)
    recorder = RecordingLoader()
    sink._loader = recorder  # type: ignore[assignment]
    origin = BatchOrigin.of("telemetry.raw", [(2, 40), (2, 41)])
    result = sink.write(
        TELEMETRY_TABLE, [_telemetry(1), _telemetry(2, temperature=math.nan)], origin
    )
    assert result.token == "fleet_telemetry_telemetry_raw_p2_40_41"
    (request,) = recorder.requests
    assert (request.table, request.fmt, request.label) == ("telemetry", "json", result.token)
    rows = [json.loads(line) for line in request.body.decode().splitlines()]
    assert rows[0]["ts"] == "2026-01-01 00:00:00.001"
    assert rows[0]["extra"] == {"rpm": 1200.0}
    assert rows[1]["temperature"] is None
    assert (rows[0]["org"], rows[0]["project"], rows[0]["group"]) == ("", "", "")
    assert request.columns == tuple(DORIS_SCHEMAS["telemetry"].names)


def test_alerts_go_as_an_arrow_stream_keeping_given_tenant_columns() -> None:
    sink = DorisSink(DSN)
    recorder = RecordingLoader()
    sink._loader = recorder  # type: ignore[assignment]
    alert = {
        "alert_id": "a-1",
        "device_id": "pump-1",
        "rule_id": "hot",
        "status": "raised",
        "metric": "temperature",
        "value": 91.0,
        "threshold": 90.0,
        "severity": "critical",
        "seq": 7,
        "ts": 1_767_225_600_000,
        "org": "acme",
        "project": "p",
        "group": "g",
    }
    sink.write(ALERTS_TABLE, [alert], BatchOrigin.of("alerts", [(0, 3)]))
    (request,) = recorder.requests
    assert request.fmt == "arrow"
    table = pa.ipc.open_stream(request.body).read_all()
    assert table.column("alert_id").to_pylist() == ["a-1"]
    assert table.column("org").to_pylist() == ["acme"]


def test_the_batchs_tenants_are_the_rows_tenant_columns() -> None:
    sink = DorisSink(DSN)
    recorder = RecordingLoader()
    sink._loader = recorder  # type: ignore[assignment]
    tenants = {"org": ["acme", ""], "project": ["p", ""], "group": ["g", ""]}
    records = [_telemetry(1, org="stale"), _telemetry(2)]
    sink.write(TELEMETRY_TABLE, records, BatchOrigin.of("telemetry.raw", [(0, 1)]), tenants)
    (request,) = recorder.requests
    rows = [json.loads(line) for line in request.body.decode().splitlines()]
    assert [(r["org"], r["project"], r["group"]) for r in rows] == [
        ("acme", "p", "g"),
        ("", "", ""),
    ]


def test_a_doris_write_needs_the_batch_origin_and_skips_an_empty_batch() -> None:
    sink = DorisSink(DSN)
    recorder = RecordingLoader()
    sink._loader = recorder  # type: ignore[assignment]
    with pytest.raises(ValueError, match="origin"):
        sink.write(EVENTS_TABLE, [], None)
    assert sink.write(EVENTS_TABLE, [], BatchOrigin.of("device.events", [])).rows == 0
    assert recorder.requests == []
    with pytest.raises(InvalidBatch):
        sink.write(TELEMETRY_TABLE, [{"device_id": "x"}], BatchOrigin.of("telemetry.raw", [(0, 1)]))


# --- reads --------------------------------------------------------------------------------


def test_query_parameters_are_bound_by_the_driver_not_pasted() -> None:
    sql, values = bind_params(
        "SELECT * FROM {t:Identifier} WHERE d LIKE 'x%' AND m > {minutes:UInt32}",
        {"t": "telemetry", "minutes": "15"},
    )
    assert sql == "SELECT * FROM `telemetry` WHERE d LIKE 'x%%' AND m > %(minutes)s"
    assert values == {"minutes": 15}
    with pytest.raises(QueryFailed, match="not an identifier"):
        bind_params("SELECT * FROM {t:Identifier}", {"t": "x; DROP TABLE y"})
    with pytest.raises(QueryFailed, match="missing"):
        bind_params("SELECT {a:String}", {})


# --- DDL ----------------------------------------------------------------------------------


def test_the_sink_applies_a_migration_per_contract_table_with_the_urls_replication() -> None:
    sink = DorisSink(DSN + "&replication_num=3")
    statements = {m.name: " ".join(m.statements) for m in sink._migrations}
    assert set(statements) == set(DORIS_SCHEMAS)
    for name, ddl in statements.items():
        assert f"CREATE TABLE IF NOT EXISTS `{name}`" in ddl
        assert '"replication_num" = "3"' in ddl
    assert parse_doris_dsn(DSN).replication_num == 1


# --- analyst queries side by side -------------------------------------------------------------


def _analyst_files() -> list[Path]:
    return sorted(Path(CHECKOUT, "queries").glob("*.sql"))


@pytest.mark.parametrize("path", _analyst_files(), ids=lambda p: p.name)
def test_every_analyst_query_has_a_doris_twin_with_the_same_parameters(path: Path) -> None:
    twin = path.parent / "doris" / path.name
    assert twin.is_file(), f"queries/doris/{path.name} is missing"
    clickhouse, doris = load_sql_file(path), load_sql_file(twin)
    assert doris.bind({}) == clickhouse.bind({})
    check_read_only(doris.sql)
    sql, values = bind_params(doris.sql, doris.bind({}))
    literal = sql % {k: repr(v) for k, v in values.items()}
    sqlglot.parse_one(literal.replace("%%", "%"), read="doris")  # Doris SQL, as sqlglot reads it
