"""The warehouse on a real chDB (ClickHouse in-process, in a temporary folder).

chDB hosts one engine folder per process: a process may open many clients on that folder,
but another folder only once every client is closed, and another process not at all while
this one holds it. So this module shares one sink (module scope) and keeps tests apart by
device-id prefix; the one-owner rule itself is tested from subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import numpy as np
import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from infra.settings import PROJECT_ROOT, Settings
from infra.warehouse import fetch, warehouse_counts
from queries.runner import QueryError
from sinks.clickhouse import (
    ALERTS_TABLE,
    EVENTS_TABLE,
    OTA_EVENTS_TABLE,
    TELEMETRY_SCHEMA,
    TELEMETRY_TABLE,
    TWIN_HISTORY_TABLE,
    ClickHouseSink,
    QueryFailed,
    SinkUnavailable,
)
from sinks.query_server import QueryServer, start_query_server, write_platform_secret
from sinks.row_filters import ReadScope
from sinks.sql_guard import Refused
from streams.cold.rows import ota_events_rows, twin_history_rows
from streams.hot.twin import Accepted, Twin, apply_desired, apply_reported, to_record
from streams.ota.model import OtaStatus
from streams.ota.model import to_record as rollout_to_record
from streams.registry.query_access import TokenAccess
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.registry.tokens import TokenAuthority
from tests.support.records import telemetry_record

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def now_ms() -> int:
    return int(time.time() * 1000)


def reading(device_id: str, seq: int, ts: int, **metrics: Any) -> dict[str, Any]:
    return telemetry_record(device_id, seq, ts, received_after_ms=15, **metrics)


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseSink]:
    warehouse = ClickHouseSink(f"chdb://{tmp_path_factory.mktemp('warehouse')}")
    assert [m.name for m in warehouse.ensure_schema()][:3] == [
        "telemetry",
        "device_events",
        "telemetry_1m",
    ]
    yield warehouse
    warehouse.close()


@pytest.fixture(scope="module")
def raw(sink: ClickHouseSink) -> Iterator[Client]:
    """A plain client on the same folder: rows as stored, before FINAL."""
    client = clickhouse_connect.get_client(dsn=sink.dsn, tz_mode="aware")
    yield client
    client.close()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state folder of the server's "stack": its run folder holds the platform secret."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(sink: ClickHouseSink, state_dir: Path) -> Iterator[QueryServer]:
    tokens = TokenAuthority.load_or_create(state_dir / "pki" / "api")
    access = TokenAccess(tokens, dict, write_platform_secret(state_dir / "run"))
    with start_query_server(sink, "127.0.0.1", 0, access) as running:
        yield running


@pytest.fixture(scope="module", params=["server", "direct"])
def via(
    request: pytest.FixtureRequest, sink: ClickHouseSink, server: QueryServer, state_dir: Path
) -> Settings:
    """Settings for `fleet sql`: through the owner's query server, or opening the folder."""
    port = server.address[1] if request.param == "server" else free_port()
    return Settings(warehouse_url=sink.dsn, query_port=port, state_dir=state_dir)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}-"


def raw_count(raw: Client, prefix: str, table: str = "telemetry") -> int:
    result = raw.query(
        "SELECT count() FROM {table:Identifier} WHERE startsWith(device_id, {p:String})",
        parameters={"table": table, "p": prefix},
    )
    return int(result.result_rows[0][0])


def rows(settings: Settings, query: str, **params: Any) -> list[dict[str, Any]]:
    return fetch(settings, query, {k: str(v) for k, v in params.items()}).records()


# --- schema --------------------------------------------------------------------------------


def test_migrations_are_applied_once(sink: ClickHouseSink) -> None:
    assert sink.ensure_schema() == ()
    applied = sink.query("SELECT version, name FROM schema_migrations ORDER BY version").rows
    assert applied[:3] == ((1, "telemetry"), (2, "device_events"), (3, "telemetry_1m"))


# --- exactly once --------------------------------------------------------------------------


def test_a_redelivered_batch_is_dropped_at_insert(
    sink: ClickHouseSink, raw: Client, prefix: str
) -> None:
    t0 = now_ms()
    batch = [reading(f"{prefix}a", seq, t0 + seq, temperature=20.0) for seq in range(100)]
    first = sink.write(TELEMETRY_TABLE, batch)
    second = sink.write(TELEMETRY_TABLE, list(reversed(batch)))  # same messages, another order
    assert first.token == second.token
    assert raw_count(raw, prefix) == 100  # the second insert never landed
    assert sink.count_stored(device_prefix=prefix) == 100
    assert sink.count_duplicates(device_prefix=prefix) == 0


def test_redelivered_events_are_dropped_too(sink: ClickHouseSink, raw: Client, prefix: str) -> None:
    t0 = now_ms()
    events = [
        {
            "device_id": f"{prefix}e",
            "seq": seq,
            "ts": t0,
            "received_at": t0 + 1,
            "type": "connect" if seq % 2 else "disconnect",
            "message": None if seq else "first",
            "attributes": {"fw": "1.0"},
        }
        for seq in range(10)
    ]
    sink.write(EVENTS_TABLE, events)
    sink.write(EVENTS_TABLE, events)
    assert raw_count(raw, prefix, "device_events") == 10
    assert sink.count_stored("device_events", prefix) == 10
    stored = sink.query(
        "SELECT message, attributes FROM device_events WHERE device_id = {d:String} AND seq = 0",
        {"d": f"{prefix}e"},
    )
    assert stored.rows == (("first", {"fw": "1.0"}),)


def test_a_message_resent_in_another_batch_is_counted_once(
    sink: ClickHouseSink, raw: Client, via: Settings, prefix: str
) -> None:
    t0 = now_ms()
    device = f"{prefix}r"
    raw.command("SYSTEM STOP MERGES telemetry")
    try:
        sink.write(
            TELEMETRY_TABLE, [reading(device, s, t0 + s, temperature=1.0) for s in range(10)]
        )
        sink.write(
            TELEMETRY_TABLE, [reading(device, s, t0 + s, temperature=1.0) for s in range(5, 15)]
        )
        assert raw_count(raw, prefix) == 20  # both copies are stored until a merge
        assert sink.count_stored(device_prefix=prefix) == 15
        assert sink.count_duplicates(device_prefix=prefix) == 0
        # Ad-hoc SQL is exact too: the read path runs with final=1.
        adhoc = "SELECT count() AS n FROM telemetry WHERE startsWith(device_id, {p:String})"
        assert rows(via, adhoc, p=prefix) == [{"n": 15}]
        assert warehouse_counts(via, device_prefix=prefix).stored == 15
        assert warehouse_counts(via, device_prefix=prefix).duplicates == 0
    finally:
        raw.command("SYSTEM START MERGES telemetry")
    raw.command("OPTIMIZE TABLE telemetry FINAL")
    assert raw_count(raw, prefix) == 15  # and a merge keeps one copy


def test_a_resend_in_another_partition_is_still_read_once(
    sink: ClickHouseSink, raw: Client, prefix: str
) -> None:
    # The partition key (device ts) is part of the message, so a re-send lands in the same
    # partition. Were it not so, merges would never meet the copies; FINAL still reads one,
    # because the partition key is not in the sorting key (FINAL merges across partitions).
    device = f"{prefix}p"
    sink.write(TELEMETRY_TABLE, [reading(device, 1, now_ms())])
    sink.write(
        TELEMETRY_TABLE, [reading(device, 1, 1_735_689_600_000)]
    )  # 2025-01-01: another month
    raw.command("OPTIMIZE TABLE telemetry FINAL")
    assert raw_count(raw, prefix) == 2
    assert sink.count_duplicates(device_prefix=prefix) == 0
    assert sink.count_stored(device_prefix=prefix) == 1


def test_a_large_batch_is_stored_whole(sink: ClickHouseSink, prefix: str) -> None:
    n = 100_000
    t0 = now_ms() - n
    batch = pa.Table.from_arrays(
        [
            pa.array([f"{prefix}{i % 500:03d}" for i in range(n)]),
            *(pa.array(["acme"] * n) for _ in range(3)),  # org, project, group
            pa.array(np.arange(n, dtype=np.uint64)),
            pa.array(t0 + np.arange(n), pa.timestamp("ms", tz="UTC")),
            pa.array(t0 + np.arange(n) + 20, pa.timestamp("ms", tz="UTC")),
            pa.array(np.random.default_rng(1).normal(20, 2, n)),
            pa.nulls(n, pa.float64()),
            pa.array(np.linspace(100, 50, n)),
            pa.nulls(n, pa.float64()),
            pa.array([[("rpm", 1.0)]] * n, pa.map_(pa.string(), pa.float64())),
        ],
        schema=TELEMETRY_SCHEMA,
    )
    assert sink.write_arrow("telemetry", batch).rows == n
    assert sink.write_arrow("telemetry", batch).rows == n  # re-delivered: dropped
    assert sink.count_stored(device_prefix=prefix) == n
    assert sink.count_duplicates(device_prefix=prefix) == 0


# --- the rollup ----------------------------------------------------------------------------


def test_the_rollup_counts_messages_once_and_weighs_resends_only_in_averages(
    sink: ClickHouseSink, via: Settings, prefix: str
) -> None:
    minute = (now_ms() // MINUTE_MS - 3) * MINUTE_MS
    device = f"{prefix}roll-1"
    batch = [
        reading(device, seq, minute + seq * 1000, temperature=10.0 * seq) for seq in range(1, 5)
    ]
    sink.write(TELEMETRY_TABLE, batch)
    sink.write(TELEMETRY_TABLE, batch)  # re-delivered batch: dropped, also for the view
    params = {"minutes": 10, "bucket_minutes": 1, "device_prefix": prefix}
    (trend,) = rows(via, "queries/temperature_trend.sql", **params)
    assert trend["bucket_messages"] == 4
    assert (trend["min_temperature"], trend["max_temperature"]) == (10.0, 40.0)
    assert trend["avg_temperature"] == pytest.approx(25.0)
    assert trend["p50_temperature"] == pytest.approx(25.0)
    assert trend["bucket"] == datetime.fromtimestamp(minute / 1000, UTC).isoformat()

    sink.write(TELEMETRY_TABLE, [batch[-1]])  # one message re-sent in another batch
    (trend,) = rows(via, "queries/temperature_trend.sql", **params)
    assert trend["bucket_messages"] == 4  # uniqExact(seq): exact
    assert (trend["min_temperature"], trend["max_temperature"]) == (10.0, 40.0)
    assert trend["avg_temperature"] == pytest.approx(28.0)  # documented: weighs it twice


# --- analyst queries on known data ---------------------------------------------------------


def test_latest_reading_is_the_highest_seq_with_its_own_nulls(
    sink: ClickHouseSink, via: Settings, prefix: str
) -> None:
    t0 = now_ms() - 10 * MINUTE_MS
    device = f"{prefix}l"
    newest = reading(device, 5, t0 + 5000, humidity=33.0, battery=70.0, extra={"rpm": 5.0})
    sink.write(TELEMETRY_TABLE, [newest])  # arrives first
    sink.write(
        TELEMETRY_TABLE,
        [
            reading(device, s, t0 + s * 1000, temperature=20.0 + s, battery=75.0)
            for s in range(1, 5)
        ],
    )
    sink.write(TELEMETRY_TABLE, [reading(f"{prefix}m", 1, t0, temperature=1.0)])
    result = rows(via, "queries/latest_reading.sql", device_prefix=prefix)
    assert [r["device_id"] for r in result] == [device, f"{prefix}m"]
    latest = result[0]
    assert latest["seq"] == 5
    assert latest["temperature"] is None  # not seq 4's temperature
    assert (latest["humidity"], latest["battery"], latest["extra"]) == (33.0, 70.0, {"rpm": 5.0})
    assert latest["ts"] == datetime.fromtimestamp((t0 + 5000) / 1000, UTC).isoformat()
    assert 590 <= latest["age_s"] <= 700


def test_metric_percentiles_over_a_window(sink: ClickHouseSink, via: Settings, prefix: str) -> None:
    t0 = now_ms() - 30 * MINUTE_MS
    device = f"{prefix}q"
    values = list(range(1, 102))  # p50 51, p95 96, p99 100 (linear interpolation)
    np.random.default_rng(7).shuffle(values)
    batch = [
        reading(
            device, i, t0 + i * 1000, temperature=float(v), humidity=40.0, extra={"rpm": v * 10.0}
        )
        for i, v in enumerate(values)
    ]
    sink.write(TELEMETRY_TABLE, batch[:60])
    sink.write(TELEMETRY_TABLE, batch[50:])  # ten messages re-sent in another batch: no effect
    sink.write(
        TELEMETRY_TABLE, [reading(device, 999, t0 - 2 * HOUR_MS, temperature=1000.0)]
    )  # too old
    result = rows(via, "queries/metric_percentiles.sql", minutes=60, device_prefix=prefix)
    by_metric = {r["metric"]: r for r in result}
    assert set(by_metric) == {"temperature", "humidity", "rpm"}
    temperature = by_metric["temperature"]
    assert temperature["samples"] == 101
    assert (temperature["p50"], temperature["p95"], temperature["p99"]) == pytest.approx(
        (51.0, 96.0, 100.0)
    )
    assert by_metric["rpm"]["p50"] == pytest.approx(510.0)
    assert by_metric["humidity"]["p99"] == pytest.approx(40.0)
    wider = rows(via, "queries/metric_percentiles.sql", minutes=180, device_prefix=prefix)
    assert {r["metric"]: r["samples"] for r in wider}["temperature"] == 102


def test_messages_per_minute_per_group(sink: ClickHouseSink, via: Settings, prefix: str) -> None:
    m1 = (now_ms() // MINUTE_MS - 10) * MINUTE_MS
    m2 = m1 + 5 * MINUTE_MS
    batch = [
        *(reading(f"{prefix}a-{d}", s, m1 + s * 1000) for d in (1, 2) for s in (1, 2, 3)),
        *(reading(f"{prefix}a-{d}", 4, m2 + 1000) for d in (1, 2)),
        *(reading(f"{prefix}b-1", s, m1 + s * 1000) for s in (1, 2)),
    ]
    sink.write(TELEMETRY_TABLE, batch)
    sink.write(TELEMETRY_TABLE, [batch[0], batch[-1]])  # re-sent in another batch
    result = rows(via, "queries/messages_per_minute.sql", minutes=30, device_prefix=prefix)
    iso = {m: datetime.fromtimestamp(m / 1000, UTC).isoformat() for m in (m1, m2)}
    assert [(r["minute"], r["device_group"], r["messages"], r["devices"]) for r in result] == [
        (iso[m1], f"{prefix}a", 6, 2),
        (iso[m1], f"{prefix}b", 2, 1),
        (iso[m2], f"{prefix}a", 2, 2),
    ]


def test_silent_devices(sink: ClickHouseSink, via: Settings, prefix: str) -> None:
    now = now_ms()
    sink.write(
        TELEMETRY_TABLE,
        [
            *(
                reading(f"{prefix}quiet", s, now - m * MINUTE_MS)
                for s, m in enumerate((40, 35, 30))
            ),
            *(reading(f"{prefix}chatty", s, now - m * MINUTE_MS) for s, m in enumerate((40, 1))),
        ],
    )
    result = rows(via, "queries/silent_devices.sql", minutes=15, device_prefix=prefix)
    assert [r["device_id"] for r in result] == [f"{prefix}quiet"]
    assert result[0]["last_seq"] == 2
    assert 1790 <= result[0]["silent_s"] <= 1900
    assert rows(via, "queries/silent_devices.sql", minutes=60, device_prefix=prefix) == []


def test_fastest_battery_drain(sink: ClickHouseSink, via: Settings, prefix: str) -> None:
    now = now_ms()
    batch = []
    for name, per_hour in (("slow", 0.5), ("fast", 2.0), ("charging", -1.0)):
        for k in range(13):  # every 30 minutes over the last 6 hours
            hours_ago = 6 - k / 2
            battery = 90.0 - per_hour * (6 - hours_ago)
            batch.append(
                reading(f"{prefix}{name}", k, now - int(hours_ago * HOUR_MS), battery=battery)
            )
    sink.write(TELEMETRY_TABLE, batch)
    result = rows(via, "queries/battery_drain.sql", minutes=480, device_prefix=prefix)
    assert [r["device_id"].removeprefix(prefix) for r in result] == ["fast", "slow", "charging"]
    assert [r["drain_per_hour"] for r in result] == pytest.approx([2.0, 0.5, -1.0], abs=1e-5)
    assert (result[0]["first_battery"], result[0]["last_battery"]) == (90.0, 78.0)
    assert result[0]["samples"] == 13
    top = rows(via, "queries/battery_drain.sql", minutes=480, limit=1, device_prefix=prefix)
    assert len(top) == 1
    assert rows(via, "queries/battery_drain.sql", min_samples=20, device_prefix=prefix) == []


def test_parameters_are_bound_not_pasted(via: Settings) -> None:
    hostile = "x' OR 1=1 --"
    assert rows(via, "queries/latest_reading.sql", device_prefix=hostile) == []


def test_an_empty_result_keeps_its_columns(via: Settings) -> None:
    # chDB sends no column names with an empty result: the sink asks DESCRIBE for them.
    result = fetch(via, "queries/silent_devices.sql", {"device_prefix": "nobody-"})
    assert result.rows == ()
    assert result.columns == ("device_id", "last_seen", "last_seq", "silent_s")
    assert result.types[1] == "DateTime64(3, 'UTC')"


# --- the read path -------------------------------------------------------------------------


def test_the_read_path_is_read_only_in_the_engine(sink: ClickHouseSink, via: Settings) -> None:
    with pytest.raises(Refused, match="SETTINGS"):
        sink.query("SELECT 1 SETTINGS readonly = 0")
    # Past the guard, the engine refuses too: the read connections run with readonly=1.
    with pytest.raises(QueryFailed, match="readonly"):
        sink._select("SELECT 1 SETTINGS max_execution_time = 0")
    with pytest.raises(QueryError, match="read-only"):
        fetch(via, "INSERT INTO telemetry (device_id, seq) VALUES ('x', 1)")
    with pytest.raises(QueryError, match="UNKNOWN_IDENTIFIER"):
        fetch(via, "SELECT no_such_column FROM telemetry")


def run_fleet_sql(
    sql: str, port: int, dsn: str, state_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`fleet sql --format json` in another process (what an analyst runs)."""
    code = (
        "import sys\n"
        "from infra.settings import load_settings\n"
        "from infra.warehouse import run_sql\n"
        "from queries.runner import QueryError\n"
        "try:\n"
        "    print(run_sql(load_settings(), sys.argv[1], {}, 'json'))\n"
        "except QueryError as exc:\n"
        "    print(f'{type(exc).__name__}: {exc}', file=sys.stderr)\n"
        "    sys.exit(2)\n"
    )
    env = {**os.environ, "FLEET_WAREHOUSE_URL": dsn, "FLEET_QUERY_PORT": str(port)}
    if state_dir is not None:  # where the platform secret is
        env["FLEET_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-c", code, sql],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_another_process_queries_through_the_owner(
    sink: ClickHouseSink, server: QueryServer, prefix: str, state_dir: Path
) -> None:
    sink.write(TELEMETRY_TABLE, [reading(f"{prefix}x", s, now_ms()) for s in range(3)])
    sql = f"SELECT count() AS n, any(device_id) AS d FROM telemetry WHERE device_id = '{prefix}x'"
    done = run_fleet_sql(sql, server.address[1], sink.dsn, state_dir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [{"n": 3, "d": f"{prefix}x"}]


def test_without_the_owner_server_another_process_is_told_why(sink: ClickHouseSink) -> None:
    done = run_fleet_sql("SELECT 1", free_port(), sink.dsn)
    assert done.returncode == 2
    assert "WarehouseUnavailable" in done.stderr
    assert "owned by another process" in done.stderr


def test_another_process_cannot_open_the_folder_and_gets_sink_unavailable(
    sink: ClickHouseSink,
) -> None:
    code = (
        "import sys\n"
        "from sinks.clickhouse import ClickHouseSink, SinkUnavailable\n"
        "try:\n"
        "    ClickHouseSink(sys.argv[1]).ensure_schema()\n"
        "except SinkUnavailable as exc:\n"
        "    print('SinkUnavailable', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, sink.dsn],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.startswith("SinkUnavailable"), done.stdout + done.stderr


def test_an_unreachable_server_is_sink_unavailable() -> None:
    sink = ClickHouseSink(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
    record = reading("dev-1", 1, now_ms())
    with pytest.raises(SinkUnavailable, match=r"127\.0\.0\.1"):
        sink.write(TELEMETRY_TABLE, [record])
    with pytest.raises(SinkUnavailable):  # and again: the caller's retry loop
        sink.write(TELEMETRY_TABLE, [record])
    with pytest.raises(SinkUnavailable):
        sink.ensure_schema()
    assert sink.ping() is False
    sink.close()


def test_the_warehouse_folder_is_where_settings_say(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert ClickHouseSink(settings.warehouse_dsn).dsn == f"chdb://{tmp_path.resolve()}/warehouse"


# --- twin history --------------------------------------------------------------------------


def twin_versions(device_id: str, t0: int) -> list[dict[str, Any]]:
    """``twin_history`` rows of one device: desired set (v1), half reported (v2), converged (v3)."""
    twin, states = Twin(device_id), []
    for step in (
        lambda t: apply_desired(t, {"rate": 2, "fw": "1.2"}, None, t0),
        lambda t: apply_reported(t, {"rate": 2}, 10, t0 + MINUTE_MS),
        lambda t: apply_reported(t, {"fw": "1.2"}, 11, t0 + 2 * MINUTE_MS),
    ):
        result = step(twin)
        assert isinstance(result, Accepted)
        twin = result.twin
        states.append(to_record(twin))
    return twin_history_rows(states)


def test_twin_versions_written_twice_are_one_row_each(
    sink: ClickHouseSink, raw: Client, prefix: str
) -> None:
    device = f"{prefix}twin"
    versions = twin_versions(device, now_ms())
    raw.command("SYSTEM STOP MERGES twin_history")
    try:
        first = sink.write(TWIN_HISTORY_TABLE, versions[:2])
        again = sink.write(TWIN_HISTORY_TABLE, list(reversed(versions[:2])))  # a re-delivered batch
        assert first.token == again.token
        assert raw_count(raw, prefix, "twin_history") == 2  # dropped at insert
        sink.write(TWIN_HISTORY_TABLE, versions)  # v1 and v2 again, in another batch
        assert raw_count(raw, prefix, "twin_history") == 5  # both copies until a merge
        final = sink.query(
            "SELECT version, count() AS n FROM twin_history FINAL "
            "WHERE device_id = {d:String} GROUP BY version ORDER BY version",
            {"d": device},
        )
        assert final.rows == ((1, 1), (2, 1), (3, 1))
        # v3 re-published with only last_reported_seq advanced: kept, and it wins.
        sink.write(TWIN_HISTORY_TABLE, [{**versions[2], "last_reported_seq": 12}])
        sink.write(TWIN_HISTORY_TABLE, [versions[2]])  # the older copy arriving late loses anyway
        latest = sink.query(
            "SELECT count() AS n, max(last_reported_seq) AS seq FROM twin_history FINAL "
            "WHERE device_id = {d:String} AND version = 3",
            {"d": device},
        )
        assert latest.rows == ((1, 12),)
    finally:
        raw.command("SYSTEM START MERGES twin_history")
    raw.command("OPTIMIZE TABLE twin_history FINAL")
    assert raw_count(raw, prefix, "twin_history") == 3
    stored = raw.query(
        "SELECT version, delta, delta_keys, last_reported_seq FROM twin_history "
        "WHERE device_id = {d:String} ORDER BY version",
        parameters={"d": device},
    ).result_rows
    assert stored == [
        (1, '{"fw":"1.2","rate":2}', 2, -1),
        (2, '{"fw":"1.2"}', 1, 10),
        (3, "{}", 0, 12),
    ]


def test_twin_history_query_at_a_time_and_latest(
    sink: ClickHouseSink, via: Settings, prefix: str
) -> None:
    t0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    sink.write(TWIN_HISTORY_TABLE, twin_versions(f"{prefix}a", t0))  # converged at 00:02
    sink.write(TWIN_HISTORY_TABLE, twin_versions(f"{prefix}b", t0 + 30_000)[:2])  # never converges

    def state(at: str) -> list[tuple[Any, ...]]:
        result = rows(via, "queries/twin_history.sql", at=at, device_prefix=prefix)
        return [
            (
                r["device_id"].removeprefix(prefix),
                r["version"],
                json.loads(r["delta"]),
                r["delta_keys"],
                r["not_converged_devices"],
            )
            for r in result
        ]

    desired = {"fw": "1.2", "rate": 2}
    assert state("") == [("a", 3, {}, 0, 1), ("b", 2, {"fw": "1.2"}, 1, 1)]
    assert state("2026-01-01 00:00:10") == [("a", 1, desired, 2, 1)]  # b has no twin yet
    # A version counts from its updated_at on (inclusive): a's v2 is from 00:01:00.
    assert state("2026-01-01T00:01:00Z") == [("a", 2, {"fw": "1.2"}, 1, 2), ("b", 1, desired, 2, 2)]
    assert state("2026-01-01T01:02:00+01:00") == state("")
    (latest, _) = rows(via, "queries/twin_history.sql", device_prefix=prefix)
    assert json.loads(latest["desired"]) == {"fw": "1.2", "rate": 2}
    assert json.loads(latest["reported"]) == {"fw": "1.2", "rate": 2}
    assert latest["updated_at"] == datetime.fromtimestamp(t0 / 1000 + 120, UTC).isoformat()
    assert latest["last_reported_seq"] == 11
    with pytest.raises(QueryError, match="CANNOT_PARSE"):
        rows(via, "queries/twin_history.sql", at="yesterday-ish", device_prefix=prefix)


# --- OTA events ----------------------------------------------------------------------------


def ota_rollout_versions(rollout_id: str) -> list[dict[str, Any]]:
    """``Rollout`` records of one rollout on 10 devices (cohorts of 2, 3 and 5): created,
    running with a canary half done, then the canary passed and cohort 1 2/3 done."""
    from tests.unit.streams.ota.test_ota import Harness, fleet

    h = Harness(fleet(10, prefix=rollout_id))
    versions = []
    h.create()
    versions.append(replace(h.r, rollout_id=rollout_id))
    h.approve()
    h.tick(1)
    canary = h.r.current_cohort
    h.tick(1)
    h.succeed(canary[:1])
    versions.append(replace(h.r, rollout_id=rollout_id))
    h.pass_cohort()
    assert h.r.cohort_index == 1
    cohort = h.r.current_cohort
    h.tick(1)
    h.succeed(cohort[:2])
    h.report(cohort[2], OtaStatus.downloading)
    versions.append(replace(h.r, rollout_id=rollout_id))
    assert len({v.updated_ms for v in versions}) == 3
    return [rollout_to_record(v) for v in versions]


def test_a_rollout_written_twice_is_one_row_per_cohort_and_version(
    sink: ClickHouseSink, raw: Client, prefix: str
) -> None:
    rollout_id = f"{prefix}ro"
    versions = ota_rollout_versions(rollout_id)

    def raw_rows() -> int:
        result = raw.query(
            "SELECT count() FROM ota_events WHERE rollout_id = {r:String}",
            parameters={"r": rollout_id},
        )
        return int(result.result_rows[0][0])

    raw.command("SYSTEM STOP MERGES ota_events")
    try:
        first = sink.write(OTA_EVENTS_TABLE, ota_events_rows(versions[:2]))
        again = sink.write(OTA_EVENTS_TABLE, ota_events_rows(versions[1::-1]))  # re-delivered
        assert first.token == again.token
        assert first.rows == 1 + 3  # created: one row; running: one per cohort
        assert raw_rows() == 4  # dropped at insert
        sink.write(
            OTA_EVENTS_TABLE, ota_events_rows(versions)
        )  # the first two again, another batch
        assert raw_rows() == 4 + 4 + 3  # both copies until a merge
        final = sink.query(
            "SELECT cohort, updated_at, count() AS n FROM ota_events FINAL "
            "WHERE rollout_id = {r:String} GROUP BY cohort, updated_at",
            {"r": rollout_id},
        )
        assert len(final.rows) == 7
        assert {row[2] for row in final.rows} == {1}
    finally:
        raw.command("SYSTEM START MERGES ota_events")
    raw.command("OPTIMIZE TABLE ota_events FINAL")
    assert raw_rows() == 7


def test_ota_progress_per_rollout_and_cohort(
    sink: ClickHouseSink, via: Settings, prefix: str
) -> None:
    rollout_id = f"{prefix}ro"
    versions = ota_rollout_versions(rollout_id)
    sink.write(OTA_EVENTS_TABLE, ota_events_rows(versions))
    pending = f"{prefix}pending"
    sink.write(OTA_EVENTS_TABLE, ota_events_rows([{**versions[0], "rollout_id": pending}]))

    def progress(**params: str) -> list[tuple[Any, ...]]:
        return [
            (
                r["rollout_id"],
                r["cohort"],
                r["state"],
                r["current_cohort"],
                r["cohort_size"],
                r["succeeded"],
                r["failed"],
                r["rolled_back"],
                r["in_progress"],
                r["share_succeeded"],
            )
            for r in rows(via, "queries/ota_progress.sql", **params)
        ]

    assert progress(rollout_id=rollout_id) == [
        (rollout_id, 0, "running", 1, 2, 2, 0, 0, 0, 1.0),
        (rollout_id, 1, "running", 1, 3, 2, 0, 0, 1, 0.6667),
        (rollout_id, 2, "running", 1, 5, 0, 0, 0, 0, 0.0),
    ]
    assert progress(rollout_id=pending) == [
        (pending, 0, "pending_approval", -1, 0, 0, 0, 0, 0, None)
    ]
    everything = progress()
    assert [r[:2] for r in everything if r[0].startswith(prefix)] == [
        (pending, 0),
        (rollout_id, 0),
        (rollout_id, 1),
        (rollout_id, 2),
    ]
    (latest, *_) = rows(via, "queries/ota_progress.sql", rollout_id=rollout_id)
    assert latest["version"] == versions[-1]["artifact"]["version"]
    assert (
        latest["updated_at"]
        == datetime.fromtimestamp(versions[-1]["updated_ms"] / 1000, UTC).isoformat()
    )
    # A device prefix keeps the rollouts its devices reported on (device_events, ota_status).
    device = f"{rollout_id}-0001"
    sink.write(
        EVENTS_TABLE,
        [
            {
                "device_id": device,
                "seq": 1,
                "ts": now_ms(),
                "received_at": now_ms(),
                "type": "ota_status",
                "message": None,
                "attributes": {"status": "succeeded", "rollout_id": rollout_id, "version": "2.0.0"},
            }
        ],
    )
    reported = sink.query(
        "SELECT rollout_id, status, version FROM ota_device_events WHERE device_id = {d:String}",
        {"d": device},
    )
    assert reported.rows == ((rollout_id, "succeeded", "2.0.0"),)
    assert {r[0] for r in progress(device_prefix=prefix)} == {rollout_id}
    assert progress(device_prefix=f"{prefix}nobody") == []


# --- tenant columns and row filters (issue 14) --------------------------------------------


def tenant_rows(device: str, org: str, at: datetime) -> dict[str, list[dict[str, Any]]]:
    """One row of each tenant table for ``device`` of ``org`` (project p, group g)."""
    ts = int(at.timestamp() * 1000)
    counts = dict.fromkeys(
        ("planned", "skipped", "sent", "in_progress", "succeeded", "failed"), 0
    ) | dict.fromkeys(("rollback_sent", "rolled_back", "rollback_failed"), 0)
    tenant = {"org": org, "project": "p", "group": "g"}
    return {
        "telemetry": [reading(device, 1, ts, temperature=1.0)],
        "device_events": [
            {"device_id": device, "seq": 1, "ts": ts, "received_at": ts, "type": "connect"}
        ],
        "alerts": [
            {"device_id": device, "alert_id": f"{device}-a", "rule_id": "r", "status": "raised"}
            | {"metric": "t", "value": 9.0, "threshold": 5.0, "severity": "warning"}
            | {"seq": 1, "ts": ts}
        ],
        "twin_history": [
            {"device_id": device, "version": 1, "updated_at": ts, "desired": "{}"}
            | {"reported": "{}", "delta": "{}", "delta_keys": 0, "last_reported_seq": 1}
        ],
        "ota_events": [
            {"rollout_id": f"{device}-r", "updated_at": ts, "state": "running", "version": "2"}
            | {"target": f"org/{org}", "current_cohort": 0, "cohort": 0, "devices": 1}
            | counts
            | tenant
        ],
    }


def test_an_analyst_sees_only_the_rows_of_its_grants_in_every_tenant_table(
    sink: ClickHouseSink, state_dir: Path, prefix: str
) -> None:
    org_a, org_b = f"{prefix}a".replace("-", ""), f"{prefix}b".replace("-", "")
    now = datetime.now(UTC)
    for org in (org_a, org_b):
        device = f"{prefix}{org}"
        rows_of = tenant_rows(device, org, now)
        tenants = {"org": [org], "project": ["p"], "group": ["g"]}
        sink.write(TELEMETRY_TABLE, rows_of["telemetry"], tenants=tenants)
        sink.write(EVENTS_TABLE, rows_of["device_events"], tenants=tenants)
        sink.write(ALERTS_TABLE, rows_of["alerts"], tenants=tenants)
        sink.write(TWIN_HISTORY_TABLE, rows_of["twin_history"], tenants=tenants)
        sink.write(
            OTA_EVENTS_TABLE, rows_of["ota_events"]
        )  # its tenant is in its rows (the target's)
    tables = ("telemetry", "device_events", "alerts", "twin_history", "ota_events", "telemetry_1m")
    union = " UNION ALL ".join(
        f"SELECT '{t}' AS t, org, count() AS n FROM {t} "
        f"WHERE org IN ('{org_a}', '{org_b}') GROUP BY org"
        for t in tables
    )

    # An analyst of organization A, through the port, with clickhouse-connect.
    tokens = TokenAuthority.load_or_create(state_dir / "pki" / "tenants")
    analyst = Principal.user(f"analyst-{uuid.uuid4().hex[:6]}")
    grants: dict[str, GrantSet] = {}
    access = TokenAccess(tokens, lambda: dict(grants))
    token = tokens.issue(analyst, ttl_s=600)
    with start_query_server(sink, "127.0.0.1", 0, access) as server:
        host, port = server.address

        def seen() -> set[tuple[str, str, int]]:
            client = clickhouse_connect.get_client(
                host=host, port=port, username="analyst", password=token
            )
            try:
                return {tuple(row) for row in client.query(union).result_rows}  # type: ignore[misc]
            finally:
                client.close()

        grants[analyst.key] = GrantSet.of(analyst, (Role.viewer, Resource(org_a)))
        assert seen() == {(t, org_a, 1) for t in tables}
        # Another grant applies at the next request: B only (a project-level grant).
        grants[analyst.key] = GrantSet.of(analyst, (Role.viewer, Resource(org_b, "p")))
        assert seen() == {(t, org_b, 1) for t in tables}
        # The rollup's materialized view reads as its table: filtered too.
        client = clickhouse_connect.get_client(
            host=host, port=port, username="analyst", password=token
        )
        try:
            sql = f"SELECT DISTINCT org FROM telemetry_1m_mv WHERE org IN ('{org_a}', '{org_b}')"
            assert client.query(sql).result_rows == [(org_b,)]
        finally:
            client.close()
        # A grant revoked: refused at the next request.
        grants.pop(analyst.key)
        with pytest.raises(DatabaseError, match=r"telemetry\.read"):
            seen()
    # The platform's own reads and a caller with no scope.
    assert len(sink.query(union).rows) == 2 * len(tables)
    assert sink.query(union, scope=ReadScope(())).rows == ()


def test_row_filters_cannot_be_lifted_and_final_can_be_opted_out(
    sink: ClickHouseSink, raw: Client, prefix: str
) -> None:
    org = prefix.replace("-", "")
    device, t0 = f"{prefix}f", now_ms()
    scope = ReadScope(((org,),))
    lifted = "SELECT count() FROM telemetry SETTINGS additional_table_filters={}"
    with pytest.raises(Refused, match="SETTINGS"):
        sink.query(lifted, None, scope)
    count = "SELECT count() FROM telemetry WHERE device_id = {d:String}"
    raw.command("SYSTEM STOP MERGES telemetry")
    try:
        for seqs in (range(2), range(1, 2)):  # seq 1 twice, in two batches
            tenant = {"org": [org] * len(seqs), "project": ["p"] * len(seqs)}
            sink.write(TELEMETRY_TABLE, [reading(device, s, t0 + s) for s in seqs], tenants=tenant)
        assert sink.query(count, {"d": device}, scope).rows == ((2,),)  # FINAL: once each
        unfinal = ReadScope(((org,),), final=False)  # opted out: the parts as they are
        assert sink.query(count, {"d": device}, unfinal).rows == ((3,),)
        assert sink.query(count, {"d": device}, ReadScope((("other",),))).rows == ((0,),)
    finally:
        raw.command("SYSTEM START MERGES telemetry")
