"""The inline quality gate (sinks/quality/): each rule, the rules file, the quarantine rows, and
the cold path's use of it (streams/cold/quality.py) with a fake warehouse."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sinks.base import BatchOrigin, Dialect
from sinks.clickhouse import QUARANTINE_TABLE, TELEMETRY_TABLE, WriteResult, telemetry_to_arrow
from sinks.quality.gate import check_batch
from sinks.quality.quarantine import (
    QUARANTINE_SCHEMA,
    ReleaseFilter,
    ReleaseStatements,
    batch_id,
    quarantine_rows,
)
from sinks.quality.rules import (
    DEFAULT_RULES_PATH,
    RULE_ORDER,
    MetricBounds,
    QualityRules,
    RulesError,
    load_rules,
    parse_rules,
)
from streams.cold.quality import QualityPath
from streams.runtime.records import DeadLetter, SourceRecord
from tests.support.records import telemetry_record

NOW = 1_700_000_000_000
RULES = QualityRules(
    version=1,
    future_skew_ms=300_000,
    max_age_ms=86_400_000,
    metrics={
        "temperature": MetricBounds(-40.0, 125.0),
        "humidity": MetricBounds(0.0, 100.0),
        "battery": MetricBounds(0.0, 100.0, required=True),
    },
    groups={"acme/cold/freezers": {"temperature": MetricBounds(-60.0, 10.0)}},
)


def reading(device: str = "d-1", seq: int = 1, **values: Any) -> dict[str, Any]:
    metrics = {"temperature": 21.5, "humidity": 40.0, "battery": 90.0, "vibration_rms": 0.8}
    return telemetry_record(device, seq, NOW, 20, **{**metrics, **values})


def judge(*records: dict[str, Any], **kwargs: Any) -> tuple[list[str | None], list[str]]:
    """Per input row: the rule it failed (None: it loads); and the reasons, in order."""
    verdict = check_batch(telemetry_to_arrow(records), RULES, **kwargs)
    rules: list[str | None] = [None] * len(records)
    for row, rule in zip(
        verdict.bad_rows.to_pylist(), verdict.bad.column("rule").to_pylist(), strict=True
    ):
        rules[row] = rule
    assert len(verdict.good) + len(verdict.bad) == len(records)
    assert sum(verdict.failed.values()) == len(verdict.bad)
    return rules, verdict.bad.column("reason").to_pylist()


def test_good_rows_pass_untouched() -> None:
    batch = telemetry_to_arrow([reading(seq=1), reading(seq=2, temperature=None)])
    verdict = check_batch(batch, RULES)
    assert verdict.good.equals(batch)
    assert len(verdict.bad) == 0
    assert verdict.failed == {}


def test_range_per_metric_with_bounds_inclusive() -> None:
    rules, reasons = judge(
        reading(seq=1, humidity=100.0),
        reading(seq=2, humidity=100.5),
        reading(seq=3, temperature=-40.1),
        reading(seq=4, battery=0.0),
    )
    assert rules == [None, "range", "range", None]
    assert reasons == ["humidity=100.5 outside [0, 100]", "temperature=-40.1 outside [-40, 125]"]


def test_range_follows_the_device_group() -> None:
    warm = reading(seq=1, temperature=20.0)
    groups = pa.array(["acme/cold/freezers", "acme/cold/other", None])
    rules, reasons = judge(warm, reading(seq=2, temperature=20.0), warm | {"seq": 3}, groups=groups)
    assert rules == ["range", None, None]
    assert reasons == ["temperature=20 outside [-60, 10]"]


def test_nan_and_infinity_are_refused_null_is_not() -> None:
    rules, reasons = judge(
        reading(seq=1, temperature=math.nan),
        reading(seq=2, humidity=math.inf),
        reading(seq=3, temperature=None),
    )
    assert rules == ["nan", "nan", None]
    assert reasons == ["temperature is not a finite number", "humidity is not a finite number"]


def test_a_required_metric_may_not_be_missing() -> None:
    rules, reasons = judge(reading(seq=1, battery=None), reading(seq=2))
    assert rules == ["null", None]
    assert reasons == ["battery is missing (required)"]


def test_timestamps_in_the_future_beyond_the_skew_or_too_old() -> None:
    received = NOW + 20
    rules, reasons = judge(
        reading(seq=1, ts=received + 300_000),  # exactly the skew: accepted
        reading(seq=2, ts=received + 300_001),
        reading(seq=3, ts=received - 86_400_000),  # exactly the max age: accepted
        reading(seq=4, ts=received - 86_400_001 - 999),
    )
    assert rules == [None, "future", None, "stale"]
    assert reasons[0].startswith("ts is 300.001 s after received_at")
    assert reasons[1].startswith("ts is 86401 s before received_at")


def test_unknown_devices_only_with_a_registry() -> None:
    batch = (reading("d-1"), reading("ghost"))
    assert judge(*batch)[0] == [None, None]
    rules, reasons = judge(*batch, known_devices=pa.array(["d-1", "d-2"]))
    assert rules == [None, "unknown_device"]
    assert reasons == ["device ghost is not in the registry"]


def test_duplicates_with_other_content_are_refused_identical_copies_load() -> None:
    rules, reasons = judge(
        reading(seq=1),
        reading(seq=1),  # a re-sent copy: the warehouse deduplicates it
        reading(seq=1, temperature=30.0),  # the same key with other values: bad input
        reading("d-2", seq=1, temperature=30.0),
    )
    assert rules == [None, None, "duplicate", None]
    assert reasons == ["(device_id, seq) already in this batch with other values"]


def test_a_row_is_quarantined_under_the_first_rule_it_fails() -> None:
    both = reading("ghost", seq=1, humidity=500.0, ts=NOW + 10_000_000)
    rules, _ = judge(both, known_devices=pa.array(["d-1"]))
    assert rules == ["unknown_device"]
    rules, _ = judge(reading(seq=1, humidity=500.0, ts=NOW + 10_000_000))
    assert rules == ["range"]
    assert RULE_ORDER.index("range") < RULE_ORDER.index("future")


def test_counts_by_rule_and_good_rows_keep_their_order() -> None:
    records = [
        reading(seq=1),
        reading(seq=2, humidity=-1.0),
        reading(seq=3),
        reading(seq=4, temperature=math.nan),
        reading(seq=5, humidity=101.0),
    ]
    verdict = check_batch(telemetry_to_arrow(records), RULES)
    assert verdict.failed == {"range": 2, "nan": 1}
    assert verdict.good.column("seq").to_pylist() == [1, 3]
    assert verdict.bad_rows.to_pylist() == [1, 3, 4]


def test_the_shipped_rules_file_parses() -> None:
    rules = load_rules()
    assert rules.version >= 1
    assert rules.bounds("humidity") == MetricBounds(0.0, 100.0)
    assert DEFAULT_RULES_PATH.name == "rules.toml"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "version"),
        ({"version": 1, "timestamps": {"future_skew_s": 0, "max_age_s": 1}}, "future_skew_s"),
        (
            {
                "version": 1,
                "timestamps": {"future_skew_s": 1, "max_age_s": 1},
                "metrics": {"pressure": {"min": 0}},
            },
            "unknown metric",
        ),
        (
            {
                "version": 1,
                "timestamps": {"future_skew_s": 1, "max_age_s": 1},
                "metrics": {"humidity": {"min": 10, "max": 0}},
            },
            "min 10.0 > max 0.0",
        ),
        (
            {
                "version": 1,
                "timestamps": {"future_skew_s": 1, "max_age_s": 1},
                "metrics": {"humidity": {"min": "low"}},
            },
            "a number expected",
        ),
    ],
)
def test_bad_rules_are_refused_with_where(doc: Mapping[str, Any], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules(doc)


def test_a_broken_rules_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("version = [")
    with pytest.raises(RulesError, match=str(path)):
        load_rules(path)


def test_batch_id_names_offset_ranges_per_partition() -> None:
    where = [("telemetry.raw", 1, 7), ("telemetry.raw", 0, 3), ("telemetry.raw", 1, 9)]
    assert batch_id(where) == "telemetry.raw/0:3-3,telemetry.raw/1:7-9"


def test_quarantine_rows_carry_rule_reason_and_batch() -> None:
    verdict = check_batch(telemetry_to_arrow([reading(humidity=200.0)]), RULES)
    rows = quarantine_rows(verdict.bad, "telemetry.raw/0:1-1")
    assert rows.schema == QUARANTINE_SCHEMA
    [row] = rows.to_pylist()
    assert (row["rule"], row["batch_id"]) == ("range", "telemetry.raw/0:1-1")


class FakeSink:
    """Records what would be written; answers the pending count."""

    def __init__(self, pending: int = 0, dialect: Dialect = "clickhouse") -> None:
        self.tables: dict[str, list[pa.Table]] = {}
        self.origins: dict[str, list[BatchOrigin | None]] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.pending = pending
        self.dialect = dialect
        self.sql = ReleaseStatements.of(dialect)

    def write_arrow(
        self, table: str, batch: pa.Table, origin: BatchOrigin | None = None
    ) -> WriteResult:
        self.tables.setdefault(table, []).append(batch)
        self.origins.setdefault(table, []).append(origin)
        return WriteResult(table, len(batch), "token")

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        self.commands.append((sql, dict(params or {})))
        return self.pending if sql == self.sql.pending else None


def source(offset: int) -> SourceRecord:
    return SourceRecord("telemetry.raw", 2, offset, b"d-1", f"bytes-{offset}".encode())


def test_the_cold_path_splits_a_batch_and_dead_letters_the_bad_rows() -> None:
    sink = FakeSink()
    dead: list[DeadLetter] = []
    path = QualityPath(sink, RULES, dead.extend)  # type: ignore[arg-type]
    records = [reading(seq=1), reading(seq=2, humidity=120.0), reading(seq=3)]
    path.write_telemetry(records, [source(10), source(11), source(12)])
    [good] = sink.tables[TELEMETRY_TABLE]
    [bad] = sink.tables[QUARANTINE_TABLE]
    assert good.column("seq").to_pylist() == [1, 3]
    assert bad.column("batch_id").to_pylist() == ["telemetry.raw/2:10-12"]
    [letter] = dead
    assert (letter.source.offset, letter.source.value, letter.reason) == (11, b"bytes-11", "range")
    assert dict(letter.headers())["source"] == b"quality"
    assert path.status()["quality"]["by_rule"] == {"range": 1}
    assert path.counters.checked == 3
    # Both loads are named by where the batch was read (a Doris load's label needs it).
    read = BatchOrigin.of("telemetry.raw", [(2, 10), (2, 11), (2, 12)])
    assert sink.origins == {TELEMETRY_TABLE: [read], QUARANTINE_TABLE: [read]}


def test_without_rules_every_row_loads() -> None:
    sink = FakeSink()
    path = QualityPath(sink, None, lambda dead: None)  # type: ignore[arg-type]
    path.write_telemetry([reading(humidity=500.0)], [source(1)])
    assert QUARANTINE_TABLE not in sink.tables
    assert len(sink.tables[TELEMETRY_TABLE][0]) == 1


@pytest.mark.parametrize("dialect", ["clickhouse", "doris"])
def test_a_release_copies_then_marks_and_is_counted(dialect: Dialect) -> None:
    sink = FakeSink(pending=4, dialect=dialect)
    path = QualityPath(sink, RULES, lambda dead: None)  # type: ignore[arg-type]
    path.apply_releases([{"request_id": "r-1", "rule": "range", "device_id": None}])
    assert [sql for sql, _ in sink.commands] == [
        sink.sql.pending,
        sink.sql.to_telemetry,
        sink.sql.mark_released,
    ]
    assert sink.commands[1][1] == ReleaseFilter("range", "").params()
    assert path.counters.releases == {"r-1": 4}
    assert path.counters.released == 4


def test_an_empty_release_writes_nothing() -> None:
    sink = FakeSink(pending=0)
    path = QualityPath(sink, RULES, lambda dead: None)  # type: ignore[arg-type]
    path.apply_releases([{"request_id": "r-2", "rule": None, "device_id": "d-9"}])
    assert [sql for sql, _ in sink.commands] == [sink.sql.pending]
    assert path.counters.releases == {"r-2": 0}


def test_release_statements_differ_only_in_how_the_quarantine_is_read() -> None:
    clickhouse, doris = ReleaseStatements.of("clickhouse"), ReleaseStatements.of("doris")
    assert "FROM quarantine FINAL WHERE" in clickhouse.pending
    assert "FINAL" not in doris.pending + doris.to_telemetry + doris.mark_released
    assert doris.to_telemetry == clickhouse.to_telemetry.replace("quarantine FINAL", "quarantine")


def test_the_registry_switch_and_groups_come_from_the_rules_file() -> None:
    base = {"version": 1, "timestamps": {"future_skew_s": 1, "max_age_s": 1}}
    assert parse_rules(base).require_registered is False
    assert parse_rules({**base, "devices": {"require_registered": True}}).require_registered
    with pytest.raises(RulesError, match="devices"):
        parse_rules({**base, "devices": {"require_registered": "yes"}})


def registry_of(**devices: str) -> Any:
    from streams.cold.registry import DeviceTenants, Tenant

    tenants = DeviceTenants()
    for device, path in devices.items():
        tenants.set(device.replace("_", "-"), Tenant(*path.split("/")))
    return tenants


def test_the_cold_path_asks_the_registry_for_unknown_devices_and_groups() -> None:
    from dataclasses import replace

    sink = FakeSink()
    dead: list[DeadLetter] = []
    registry = registry_of(d_1="acme/cold/freezers", d_2="acme/cold/other")
    rules = replace(RULES, require_registered=True)
    path = QualityPath(sink, rules, dead.extend, registry)  # type: ignore[arg-type]
    records = [
        reading("d-1", 1, temperature=20.0),  # warm for a freezer: range, by its group
        reading("d-2", 1, temperature=20.0),
        reading("ghost", 1),
    ]
    path.write_telemetry(records, [source(1), source(2), source(3)])
    [bad] = sink.tables[QUARANTINE_TABLE]
    assert bad.column("rule").to_pylist() == ["range", "unknown_device"]
    assert bad.column("reason").to_pylist()[1] == "device ghost is not in the registry"
    assert sink.tables[TELEMETRY_TABLE][0].column("device_id").to_pylist() == ["d-2"]


def test_unregistered_devices_load_while_the_rule_is_off() -> None:
    sink = FakeSink()
    path = QualityPath(sink, RULES, lambda dead: None, registry_of())  # type: ignore[arg-type]
    path.write_telemetry([reading("ghost", 1)], [source(1)])
    assert QUARANTINE_TABLE not in sink.tables
