"""The OTA controller's error channel and consumer group, without Kafka: a record that cannot be
decoded is counted and dead-lettered to `dlq.ota` (never taken for a tombstone), and `fleet
status` watches every topic the controller consumes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infra.stack import LAG_GROUPS
from infra.topics import TOPICS
from schemas.codec import AvroCodec, load_schema
from streams.ota.worker import (
    DEVICES,
    DLQ,
    EVENTS,
    GRANTS,
    INPUTS,
    OTA_GROUP,
    REQUESTS,
    ROLLOUTS,
    SCHEMAS,
    TELEMETRY,
    Batch,
    OtaConfig,
    OtaCounters,
    OtaWorker,
    decode_record,
)
from streams.registry.devices import DeviceRecord, DeviceStatus
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.transactions import Aborted

CODECS = {
    topic: AvroCodec(load_schema(schema), schema_id=i + 1)
    for i, (topic, schema) in enumerate(sorted(SCHEMAS.items()))
}
GARBAGE = b"\x07not avro at all"


def device(device_id: str = "dev-1") -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        org="acme",
        project="plant",
        group="line-1",
        region="eu",
        status=DeviceStatus.active,
        cert_serial="1",
        cert_fingerprint="ab" * 32,
        firmware_version="1.0.0",
        created_ms=1,
        updated_ms=1,
    )


@dataclass
class FakeMessage:
    """What the controller reads of a Kafka message."""

    topic_: str
    key_: bytes | None
    value_: bytes | None
    partition_: int = 0
    offset_: int = 0
    timestamp_: int = 0

    def topic(self) -> str:
        return self.topic_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_)

    def error(self) -> None:
        return None


@dataclass
class FakeProducer:
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.records.append((topic, kwargs))


@dataclass
class FakeTransactions:
    """Commits (or, with `fail`, aborts) what the worker produces in one transaction."""

    fail: bool = False
    committed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    aborts: int = 0

    def commit(self, consumer: object, produce: Callable[[Any], None], consumed: bool) -> bool:
        producer = FakeProducer()
        produce(producer)
        if self.fail:
            return False
        self.committed.extend(producer.records)
        return True

    def abort(self) -> None:
        self.aborts += 1


class FakeConsumer:
    def assignment(self) -> list[object]:
        return []


def worker(tmp_path: Path) -> OtaWorker:
    """A controller with its state and codecs, its Kafka clients replaced by stand-ins."""
    w = OtaWorker.__new__(OtaWorker)
    w.config = OtaConfig("127.0.0.1:1", "http://127.0.0.1:1", tmp_path)
    w.counters = OtaCounters()
    w.codecs = dict(CODECS)
    w.rollouts, w.by_device = {}, defaultdict(set)
    w.devices, w.grants, w.artifacts, w.last_seen = {}, {}, {}, {}
    w._joined, w._joins_in_flight = [], []
    w._table_dead, w._table_dead_in_flight, w._table_dead_seen = [], [], set()
    w.transactions = FakeTransactions()  # type: ignore[assignment]
    w.consumer = FakeConsumer()  # type: ignore[assignment]
    w._fenced = False
    w._restore_rollouts = lambda: None  # type: ignore[method-assign]
    return w


def dlq_headers(record: dict[str, Any]) -> dict[str, bytes]:
    return {k: v for k, v in record["headers"]}


# ---------------------------------------------------------------- decode_record (pure)


def test_decode_record_tells_a_tombstone_from_a_record_that_cannot_be_decoded() -> None:
    codec = CODECS[DEVICES]
    good = codec.encode(device().to_record())
    assert decode_record(codec, SourceRecord(DEVICES, 0, 1, b"d", good), compacted=True) == (
        device().to_record()
    )
    assert decode_record(codec, SourceRecord(DEVICES, 0, 2, b"d", None), compacted=True) is None

    dead = decode_record(codec, SourceRecord(DEVICES, 3, 7, b"d", GARBAGE), compacted=True)
    assert isinstance(dead, DeadLetter)
    assert dead.reason == "bad_magic"
    assert dead.source.value == GARBAGE
    headers = dict(dead.headers())
    assert headers["source"] == b"ota"
    assert (headers["topic"], headers["partition"], headers["offset"]) == (
        DEVICES.encode(),
        b"3",
        b"7",
    )


def test_a_record_without_a_value_on_an_input_topic_is_bad_input() -> None:
    dead = decode_record(
        CODECS[REQUESTS], SourceRecord(REQUESTS, 0, 5, b"r", None), compacted=False
    )
    assert isinstance(dead, DeadLetter)
    assert dead.reason == "no_value"


# ---------------------------------------------------------------- the controller


def test_a_corrupt_registry_record_is_dead_lettered_not_taken_for_a_deletion(
    tmp_path: Path,
) -> None:
    w = worker(tmp_path)
    good = CODECS[DEVICES].encode(device().to_record())
    w._apply_device(FakeMessage(DEVICES, b"dev-1", good, offset_=1))  # type: ignore[arg-type]
    assert "dev-1" in w.devices

    w._apply_device(FakeMessage(DEVICES, b"dev-1", GARBAGE, offset_=2))  # type: ignore[arg-type]
    assert w.devices["dev-1"] == device()  # still there: not a deletion
    assert w.counters.dead_lettered == 1
    assert w.counters.dead_letter_reasons == {"bad_magic": 1}

    w._apply_grants(FakeMessage(GRANTS, b"user:x", b"", offset_=4))  # type: ignore[arg-type]
    assert w.counters.dead_letter_reasons == {"bad_magic": 1, "too_short": 1}

    w._apply(Batch(), consumed=False)
    dead = [r for topic, r in w.transactions.committed if topic == DLQ]  # type: ignore[attr-defined]
    assert [(r["key"], r["value"]) for r in dead] == [(b"dev-1", GARBAGE), (b"user:x", b"")]
    headers = dlq_headers(dead[0])
    assert headers["error"] == b"bad_magic"
    assert (headers["topic"], headers["partition"], headers["offset"]) == (
        DEVICES.encode(),
        b"0",
        b"2",
    )

    # A tombstone still deletes, and is no dead letter.
    w._apply_device(FakeMessage(DEVICES, b"dev-1", None, offset_=3))  # type: ignore[arg-type]
    assert "dev-1" not in w.devices
    assert w.counters.dead_lettered == 2


def test_a_table_record_is_dead_lettered_once_though_read_again(tmp_path: Path) -> None:
    w = worker(tmp_path)
    msg = FakeMessage(ROLLOUTS, b"r-1", GARBAGE, offset_=9)
    for _ in range(2):  # a recovery reads the changelog again
        w._decode_table(ROLLOUTS, msg)  # type: ignore[arg-type]
    assert w.counters.dead_lettered == 1
    assert len(w._table_dead) == 1


def test_table_dead_letters_of_an_aborted_transaction_go_with_the_next(tmp_path: Path) -> None:
    w = worker(tmp_path)
    w._apply_device(FakeMessage(DEVICES, b"dev-9", GARBAGE))  # type: ignore[arg-type]
    w.transactions = FakeTransactions(fail=True)  # type: ignore[assignment]
    with pytest.raises(Aborted):
        w._apply(Batch(), consumed=False)
    w.recover()
    w.transactions = FakeTransactions()  # type: ignore[assignment]
    w._apply(Batch(), consumed=False)
    dead = [r for topic, r in w.transactions.committed if topic == DLQ]  # type: ignore[attr-defined]
    assert [r["key"] for r in dead] == [b"dev-9"]
    assert w.counters.dead_lettered == 1


def test_an_undecodable_input_is_dead_lettered_in_the_batch_transaction(tmp_path: Path) -> None:
    w = worker(tmp_path)
    batch = Batch()
    w._route(FakeMessage(EVENTS, b"dev-1", GARBAGE, partition_=2, offset_=40), batch)  # type: ignore[arg-type]
    w._route(FakeMessage(REQUESTS, b"r-1", None, offset_=41), batch)  # type: ignore[arg-type]
    w._route(FakeMessage(TELEMETRY, b"dev-1", GARBAGE, timestamp_=123), batch)  # type: ignore[arg-type]
    assert [d.reason for d in batch.dead] == ["bad_magic", "no_value"]
    assert w.last_seen == {"dev-1": 123}  # telemetry is never decoded: only its arrival counts
    assert w.counters.dead_lettered == 2
    w._apply(batch, consumed=True)
    dead = [r for topic, r in w.transactions.committed if topic == DLQ]  # type: ignore[attr-defined]
    assert [dlq_headers(r)["offset"] for r in dead] == [b"40", b"41"]
    assert dlq_headers(dead[0])["topic"] == EVENTS.encode()


# ---------------------------------------------------------------- topics and lag


def test_fleet_status_watches_every_topic_the_controller_consumes() -> None:
    groups = dict(LAG_GROUPS)
    assert set(groups[OTA_GROUP]) == set(INPUTS)
    assert TELEMETRY in groups[OTA_GROUP]


def test_the_controllers_dead_letter_topic_is_declared() -> None:
    by_name = {t.name: t for t in TOPICS}
    assert DLQ in by_name
    assert by_name[DLQ].cleanup == by_name["dlq.hot"].cleanup
