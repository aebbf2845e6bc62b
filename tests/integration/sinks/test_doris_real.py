"""The Doris sink against a REAL Apache Doris: runs only when FLEET_TEST_DORIS_URL points at one
(``doris://user:pass@host:9030/db?http_port=8030``; the database must exist and the user may
create tables in it and load them). Doris cannot be installed on these machines, so in CI this
is the one test that skips, and says why; tests/integration/sinks/test_doris_standin.py covers the
documented contract against a stand-in there."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.quality import quarantined
from infra.settings import Settings
from infra.warehouse import fetch, warehouse_counts
from queries.runner import CHECKOUT
from sinks.base import TELEMETRY_TABLE, BatchOrigin
from sinks.doris import DorisSink
from sinks.quality.rules import load_rules
from streams.cold.quality import QualityPath
from streams.runtime.records import SourceRecord

DORIS_URL = os.environ.get("FLEET_TEST_DORIS_URL", "")

pytestmark = pytest.mark.skipif(
    not DORIS_URL,
    reason=(
        "FLEET_TEST_DORIS_URL is not set: no Apache Doris is reachable (none can be installed "
        "on these machines); the stand-in tests (test_doris_standin.py) cover its contract"
    ),
)
T0 = 1_767_225_600_000


@pytest.fixture(scope="module")
def sink() -> Iterator[DorisSink]:
    with DorisSink(DORIS_URL) as doris:
        doris.ensure_schema()
        yield doris


def _readings(prefix: str, seqs: range, shift: int = 0) -> list[dict[str, Any]]:
    return [
        {"device_id": f"{prefix}pump", "seq": s, "ts": T0 + s, "received_at": T0 + s + shift,
         "temperature": 20.0 + s, "battery": 90.0 - s, "extra": {"rpm": 1000.0 + s}}
        for s in seqs
    ]  # fmt: skip


def test_a_real_doris_loads_a_batch_once_and_replaces_a_resent_message(sink: DorisSink) -> None:
    prefix = f"rd{uuid.uuid4().hex[:8]}-"
    topic = f"test.{prefix}"
    origin = BatchOrigin.of(topic, [(0, o) for o in range(10)])
    first = sink.write(TELEMETRY_TABLE, _readings(prefix, range(10)), origin)
    again = sink.write(
        TELEMETRY_TABLE, _readings(prefix, range(10)), origin
    )  # Label Already Exists
    assert (first.rows, again.rows) == (10, 0)
    later = BatchOrigin.of(topic, [(0, o) for o in range(10, 14)])
    sink.write(TELEMETRY_TABLE, _readings(prefix, range(8, 12), 60_000), later)
    assert sink.count_stored(device_prefix=prefix) == 12
    assert sink.count_duplicates(device_prefix=prefix) == 0
    assert sink.ensure_schema() == ()


def test_every_analyst_query_runs_on_a_real_doris(sink: DorisSink, tmp_path: Path) -> None:
    prefix = f"rq{uuid.uuid4().hex[:8]}-"
    sink.write(
        TELEMETRY_TABLE, _readings(prefix, range(5)), BatchOrigin.of(prefix, [(0, 0), (0, 4)])
    )
    settings = Settings(warehouse_url=DORIS_URL, state_dir=tmp_path)
    counts = warehouse_counts(settings, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (5, 0)
    for path in sorted(Path(CHECKOUT, "queries", "doris").glob("*.sql")):
        fetch(settings, f"queries/{path.name}", {"device_prefix": prefix})
    latest = fetch(settings, "queries/latest_reading.sql", {"device_prefix": prefix})
    assert [r["seq"] for r in latest.records()] == [4]


def test_the_quality_gate_quarantines_and_releases_on_a_real_doris(
    sink: DorisSink, tmp_path: Path
) -> None:
    device = f"rg{uuid.uuid4().hex[:8]}-pump"
    gate = QualityPath(sink, load_rules(), lambda dead: None)
    now = int(time.time() * 1000)
    records = [
        {"device_id": device, "seq": s, "ts": now, "received_at": now, "humidity": 50.0 + s}
        for s in range(4)
    ]
    records[1]["humidity"] = 500.0
    sources = [SourceRecord(f"test.{device}", 0, o, None, b"v") for o in range(4)]
    gate.write_telemetry(records, sources)
    gate.write_telemetry(records, sources)  # re-read: Label Already Exists
    settings = Settings(warehouse_url=DORIS_URL, state_dir=tmp_path)
    assert sink.count_stored(device_prefix=device) == 3
    assert quarantined(settings, device) == 1
    gate.apply_releases([{"request_id": "r", "rule": "range", "device_id": device}])
    assert (sink.count_stored(device_prefix=device), quarantined(settings, device)) == (4, 0)
