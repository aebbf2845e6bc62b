"""The Doris sink and the cold path against a STAND-IN for Apache Doris (tests/support/
doris_standin.py: Doris cannot be installed here; the stand-in answers its documented Stream
Load, two-phase-commit and MySQL-protocol contract over real sockets). What a real Doris does
beyond that contract is tested by tests/integration/sinks/test_doris_real.py when
FLEET_TEST_DORIS_URL points at one."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from confluent_kafka import Producer

from infra.quality import pending_by_rule, quarantined
from infra.settings import Settings
from infra.warehouse import fetch, warehouse_counts
from schemas.codec import AvroCodec, load_schema
from sinks.base import QUARANTINE_TABLE, TELEMETRY_TABLE, BatchOrigin, InvalidBatch, SinkUnavailable
from sinks.doris import DorisSink
from sinks.doris_load import LoadRequest, StreamLoader
from sinks.quality.rules import load_rules
from streams.cold.loader import cold_writers
from streams.cold.quality import QualityPath
from streams.runtime.clients import KafkaConfig
from streams.runtime.loader import LoaderLoop, LoaderOptions, LoaderSpec, LoadSource
from streams.runtime.records import DeadLetter, SourceRecord
from tests.support.doris_standin import DorisStandIn, doris_standin

T0 = 1_767_225_600_000  # 2026-01-01 00:00:00 UTC


@pytest.fixture(scope="module")
def standin() -> Iterator[DorisStandIn]:
    with doris_standin() as running:
        yield running


@pytest.fixture(scope="module")
def sink(standin: DorisStandIn) -> Iterator[DorisSink]:
    with DorisSink(standin.url, connect_timeout_s=5) as doris:
        doris.ensure_schema()
        yield doris


@pytest.fixture
def prefix() -> str:
    return f"dx{uuid.uuid4().hex[:8]}-"


def _readings(prefix: str, seqs: range, received_shift: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "device_id": f"{prefix}pump",
            "seq": seq,
            "ts": T0 + seq,
            "received_at": T0 + 500 + seq + received_shift,
            "temperature": 20.0 + seq,
            "extra": {"rpm": 1000.0 + seq},
        }
        for seq in seqs
    ]


def _origin(topic: str, partition: int, offsets: range) -> BatchOrigin:
    return BatchOrigin.of(topic, [(partition, offset) for offset in offsets])


def test_the_migrations_are_applied_once_with_every_contract_table(
    sink: DorisSink, standin: DorisStandIn
) -> None:
    assert sink.ensure_schema() == ()
    assert set(standin.state.tables) >= {
        "telemetry", "device_events", "twin_history", "ota_events", "alerts", "quarantine",
        "schema_migrations",
    }  # fmt: skip
    assert sorted(sink.applied_migrations()) == [1, 2, 3, 4, 5, 6]


def test_a_resent_batch_answers_label_already_exists_and_is_loaded_once(
    sink: DorisSink, standin: DorisStandIn, prefix: str
) -> None:
    topic = f"telemetry.{prefix}"
    batch, origin = _readings(prefix, range(10)), _origin(topic, 0, range(100, 110))
    first = sink.write(TELEMETRY_TABLE, batch, origin)
    again = sink.write(TELEMETRY_TABLE, batch, origin)
    assert (first.rows, again.rows) == (10, 0)
    assert first.token == again.token == f"fleet_telemetry_telemetry_{prefix}_p0_100_109"
    assert standin.state.answers[-2:] == ["Success", "Label Already Exists"]
    assert sink.count_stored(device_prefix=prefix) == 10
    assert sink.count_duplicates(device_prefix=prefix) == 0


def test_a_message_resent_in_another_batch_replaces_its_row_by_the_sequence_column(
    sink: DorisSink, prefix: str
) -> None:
    topic = f"telemetry.{prefix}"
    sink.write(TELEMETRY_TABLE, _readings(prefix, range(5)), _origin(topic, 0, range(0, 5)))
    # seq 3 and 4 again (the bridge re-published them, received later) with 5 and 6.
    sink.write(
        TELEMETRY_TABLE, _readings(prefix, range(3, 7), 60_000), _origin(topic, 0, range(5, 9))
    )
    # and an older copy of seq 0 arriving last: the sequence column keeps the newer row.
    sink.write(
        TELEMETRY_TABLE, _readings(prefix, range(0, 1), -60_000), _origin(topic, 1, range(0, 1))
    )
    assert sink.count_stored(device_prefix=prefix) == 7
    assert sink.count_duplicates(device_prefix=prefix) == 0
    rows = sink.query(
        "SELECT seq, received_at FROM telemetry WHERE device_id = {d:String} ORDER BY seq",
        {"d": f"{prefix}pump"},
    ).rows
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[0][1] == "2026-01-01 00:00:00.500"  # the copy received first was newer
    assert rows[3][1] == "2026-01-01 00:01:00.503"  # the re-published copy replaced it


def test_a_commit_lost_after_the_precommit_is_completed_by_the_retry_without_doubling(
    sink: DorisSink, standin: DorisStandIn, prefix: str
) -> None:
    batch, origin = _readings(prefix, range(4)), _origin(f"telemetry.{prefix}", 2, range(7, 11))
    standin.state.faults.failing_commits = 1
    with pytest.raises(SinkUnavailable, match="commit"):
        sink.write(TELEMETRY_TABLE, batch, origin)
    assert sink.count_stored(device_prefix=prefix) == 0  # pre-committed: not visible
    sink.write(TELEMETRY_TABLE, batch, origin)  # what the loader's retry does
    assert standin.state.answers[-1] == "Label Already Exists"
    assert standin.state.loads[origin.label("telemetry")].state == "VISIBLE"
    assert sink.count_stored(device_prefix=prefix) == 4


def test_rows_the_warehouse_refuses_are_an_invalid_batch(
    sink: DorisSink, standin: DorisStandIn
) -> None:
    loader = StreamLoader(sink._session, standin.state.user, standin.state.password)
    bad = LoadRequest(
        sink.config.http_base, "fleet", "telemetry", f"bad-{uuid.uuid4().hex}",
        b'{"device_id": null, "seq": 1}\n', "json", ("device_id", "seq"),
    )  # fmt: skip
    with pytest.raises(InvalidBatch, match="rejected rows"):
        loader.load(bad)


def test_the_be_refuses_a_load_whose_credentials_were_dropped_on_the_redirect(
    sink: DorisSink, standin: DorisStandIn
) -> None:
    loader = StreamLoader(sink._session, standin.state.user, "wrong")
    request = LoadRequest(
        sink.config.http_base, "fleet", "telemetry", "x", b"", "json", ("device_id",)
    )
    with pytest.raises(SinkUnavailable, match="HTTP 401"):
        loader.load(request)


def test_a_client_following_the_redirect_itself_loses_the_credentials_at_the_be(
    standin: DorisStandIn,
) -> None:
    """Why the sink follows the 307 by hand: requests drops Authorization on a redirect to
    another host, and the BE refuses the load."""
    url = f"http://127.0.0.1:{standin.fe_port}/api/fleet/telemetry/_stream_load"
    auth = (standin.state.user, standin.state.password)
    answer = requests.put(url, data=b"", auth=auth, headers={"label": "x"}, timeout=30)
    assert answer.status_code == 401
    assert answer.url.startswith(f"http://localhost:{standin.be_port}/")


def test_fleet_sql_and_the_demo_counts_read_the_doris_warehouse(
    sink: DorisSink, standin: DorisStandIn, prefix: str, tmp_path: Path
) -> None:
    sink.write(TELEMETRY_TABLE, _readings(prefix, range(3)), _origin(f"t.{prefix}", 0, range(3)))
    settings = Settings(warehouse_url=standin.url, state_dir=tmp_path)
    result = fetch(
        settings,
        "SELECT count(*) AS n FROM telemetry WHERE starts_with(device_id, {p:String})",
        {"p": prefix},
    )
    assert result.records() == [{"n": 3}]
    counts = warehouse_counts(settings, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (3, 0)
    latest = fetch(settings, "queries/latest_reading.sql", {"device_prefix": prefix})
    assert [(r["device_id"], r["seq"]) for r in latest.records()] == [(f"{prefix}pump", 2)]


def test_the_quality_gate_quarantines_into_doris_and_a_release_moves_rows_back(
    sink: DorisSink, standin: DorisStandIn, prefix: str, tmp_path: Path
) -> None:
    dead: list[DeadLetter] = []
    gate = QualityPath(sink, load_rules(), dead.extend)
    now = int(time.time() * 1000)
    device = f"{prefix}pump"
    records = [
        {"device_id": device, "seq": seq, "ts": now, "received_at": now, "humidity": 50.0}
        for seq in range(5)
    ]
    records[2]["humidity"] = 500.0  # out of the rules' range
    sources = [SourceRecord("telemetry.raw", 1, 100 + i, device.encode(), b"v") for i in range(5)]
    mark = len(standin.state.answers)
    for _ in range(2):  # the batch re-read after a crash: both loads answer by their labels
        gate.write_telemetry(records, sources)
    assert standin.state.answers[mark:] == ["Success"] * 2 + ["Label Already Exists"] * 2
    assert sink.count_stored(device_prefix=prefix) == 4
    assert sink.count_stored(QUARANTINE_TABLE, prefix) == 1
    assert [(d.source.offset, d.reason) for d in dead] == [(102, "range"), (102, "range")]
    settings = Settings(warehouse_url=standin.url, state_dir=tmp_path)
    assert quarantined(settings, prefix) == 1
    assert pending_by_rule(settings, prefix) == {"range": 1}

    for request in ("r-1", "r-2"):  # a release is idempotent
        gate.apply_releases([{"request_id": request, "rule": "range", "device_id": device}])
    assert gate.counters.releases == {"r-1": 1, "r-2": 0}
    assert sink.count_stored(device_prefix=prefix) == 5
    assert quarantined(settings, prefix) == 0
    assert pending_by_rule(settings, prefix) == {}


# --- the cold path's loader on real Kafka (the session stack), into the stand-in ---------


def _run_loader(loop_: LoaderLoop) -> tuple[threading.Thread, Callable[[], None]]:
    ready: dict[str, Any] = {}

    def main() -> None:
        async def run() -> None:
            ready["loop"], ready["stop"] = asyncio.get_running_loop(), asyncio.Event()
            await loop_.run(ready["stop"])

        asyncio.run(run())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()

    def stop() -> None:
        while "stop" not in ready:
            time.sleep(0.01)
        ready["loop"].call_soon_threadsafe(ready["stop"].set)
        thread.join(timeout=60)
        loop_.close()

    return thread, stop


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_the_cold_loader_loads_kafka_into_doris_exactly_once(
    stack: object,
    settings: Settings,
    new_topic: Callable[..., str],
    sink: DorisSink,
    standin: DorisStandIn,
    prefix: str,
    tmp_path: Path,
) -> None:
    topic = new_topic(partitions=3)
    codec = AvroCodec(load_schema("Telemetry"), schema_id=1)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "acks": "all"})
    devices = [f"{prefix}d{i}" for i in range(6)]
    for seq in range(20):
        for device in devices:
            record = {"device_id": device, "seq": seq, "ts": T0 + seq, "received_at": T0 + seq}
            producer.produce(topic, key=device.encode(), value=codec.encode(record))
    for device in devices[:2]:  # re-published after a bridge crash: same messages, new offsets
        for seq in range(15, 20):
            record = {"device_id": device, "seq": seq, "ts": T0 + seq, "received_at": T0 + 99}
            producer.produce(topic, key=device.encode(), value=codec.encode(record))
    assert producer.flush(30) == 0
    kafka = KafkaConfig(settings.bootstrap_servers, settings.registry_url, "test-doris")

    def loader(group: str) -> LoaderLoop:
        spec = LoaderSpec("doris-test", group, [LoadSource(topic, "Telemetry", "telemetry")],
                          "dlq.cold")  # fmt: skip
        options = LoaderOptions(tmp_path / f"{group}.json", batch_rows=40, batch_seconds=0.3)
        return LoaderLoop(
            spec, kafka, options, {}, retryable=(SinkUnavailable,), rejected=(InvalidBatch,),
            codecs={topic: codec}, sourced_writers=cold_writers(sink),
        )  # fmt: skip

    labelled = topic.replace(".", "_")
    answered: dict[str, list[str]] = {}
    for group in ("first", "replay"):  # the replay: a new group reads it all again, as after
        # a crash before any offset commit; batches cut the same way answer by their labels
        job = loader(f"doris-{prefix}{group}")
        mark = len(standin.state.answers)
        _, stop = _run_loader(job)
        try:
            _wait_for(lambda j=job: j.counters.stored_rows == 130, 120, f"{group}: 130 records")
        finally:
            stop()
        answered[group] = standin.state.answers[mark:]
        assert sink.count_stored(device_prefix=prefix) == 120
        assert sink.count_duplicates(device_prefix=prefix) == 0
    loads = [load for load in standin.state.loads.values() if labelled in load.label]
    assert all(load.state == "VISIBLE" for load in loads)
    assert sum(len(load.rows) for load in loads) >= 130  # every record, under a label
    assert set(answered["first"]) == {"Success"}
    assert answered["replay"]
    assert set(answered["replay"]) <= {"Success", "Label Already Exists"}
