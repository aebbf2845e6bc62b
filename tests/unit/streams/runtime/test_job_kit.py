"""The stream-job kit without Kafka: a small job spec run through the harness, its inputs'
and tables' error channels, and the Kafka client configs built from a KafkaConfig."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from streams.runtime.clients import (
    KafkaConfig,
    consumer_config,
    table_reader_config,
    transactional_producer_config,
)
from streams.runtime.spec import (
    Batch,
    JobSpec,
    Output,
    TableRecord,
    TableSpec,
    dead_letter_output,
)
from streams.runtime.testing import JobHarness, run_job
from tests.support.records import telemetry_reading as reading

# ---------------------------------------------------------------- an example job


@dataclass
class Hottest:
    """Per device, the hottest reading so far (owned, per partition); a threshold table."""

    hottest: dict[str, float] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    threshold: float = 50.0
    dead: int = 0

    def drop_partitions(self, partitions: set[int]) -> None:
        gone = [d for d, p in self.partition_of.items() if p in partitions]
        for device in gone:
            self.hottest.pop(device, None)
            self.partition_of.pop(device, None)

    def status(self) -> dict[str, Any]:
        return {"devices": len(self.hottest), "dead_lettered": self.dead}


def set_threshold(state: Hottest, rec: TableRecord) -> None:
    if rec.record is not None:
        temperature = rec.record["temperature"]
        if temperature is None:
            raise ValueError("a threshold needs a temperature")
        state.threshold = float(temperature)


def hottest(state: Hottest, batch: Batch) -> Iterator[Output]:
    for item in batch.inputs:
        if item.dead is not None:
            state.dead += 1
            yield dead_letter_output("dlq.example", item.dead)
            continue
        device, temperature = item.record["device_id"], item.record["temperature"]
        if temperature is None or temperature <= state.hottest.get(device, float("-inf")):
            continue
        state.hottest[device] = temperature
        state.partition_of[device] = item.source.partition
        if temperature > state.threshold:
            yield Output("alerts.example", device, temperature.hex().encode())


EXAMPLE: JobSpec[Hottest] = JobSpec(
    name="example",
    group="fleetstream-example",
    inputs={"telemetry.raw": "Telemetry"},
    outputs={"alerts.example": None},
    dead_letters="dlq.example",
    stage="example",
    state=Hottest,
    process=hottest,
    tables=(TableSpec("example.thresholds", "Telemetry", set_threshold),),
)


# ---------------------------------------------------------------- the harness


def test_a_job_runs_on_in_memory_records() -> None:
    run = run_job(
        EXAMPLE,
        inputs=[
            ("telemetry.raw", "d-1", reading("d-1", 1, 40.0)),
            ("telemetry.raw", "d-1", reading("d-1", 2, 60.0)),
            ("telemetry.raw", "d-2", reading("d-2", 1, 55.0), 1),
        ],
        tables=[("example.thresholds", "all", reading("all", 1, 58.0))],
    )
    assert [(o.topic, o.key) for o in run.outputs] == [("alerts.example", "d-1")]
    assert run.state.hottest == {"d-1": 60.0, "d-2": 55.0}
    assert run.dead_letters == []


def test_state_carries_over_batches_and_partitions_can_be_dropped() -> None:
    harness = JobHarness(EXAMPLE)
    harness.run(("telemetry.raw", "d-1", reading("d-1", 1, 70.0)))
    second = harness.run(("telemetry.raw", "d-1", reading("d-1", 2, 65.0)))
    assert second.outputs == []  # not hotter than what it saw
    harness.drop_partitions([0])
    assert harness.state.hottest == {}


def test_an_input_that_does_not_decode_reaches_process_as_a_dead_letter() -> None:
    run = run_job(EXAMPLE, inputs=[("telemetry.raw", "d-1", b"\x00garbage")])
    [dead] = run.on("dlq.example")
    headers = dict(dead.headers or [])
    assert dead.key == b"d-1"
    assert dead.value == b"\x00garbage"
    assert headers["source"] == b"example"
    assert headers["topic"] == b"telemetry.raw"
    assert headers["offset"] == b"0"
    assert run.state.dead == 1


def test_a_corrupt_table_record_goes_to_the_error_channel_and_the_rest_applies() -> None:
    harness = JobHarness(EXAMPLE)
    harness.table("example.thresholds", "all", reading("all", 1, 30.0))
    harness.table("example.thresholds", "all", b"not avro", partition=2)
    harness.table("example.thresholds", "all", reading("all", 3, None))  # invalid: refused
    run = harness.run(("telemetry.raw", "d-1", reading("d-1", 1, 35.0)))

    assert run.state.threshold == 30.0  # what could not be used changed nothing
    assert [o.topic for o in run.outputs] == ["alerts.example"]
    first, second = run.dead_letters
    assert (first.source.topic, first.source.partition, first.source.offset) == (
        "example.thresholds",
        2,
        0,
    )
    assert first.source.value == b"not avro"
    assert first.stage == "example"
    assert second.reason == "invalid_record"
    assert "temperature" in second.detail
    headers = dict(first.headers())
    assert headers["partition"] == b"2"
    assert headers["offset"] == b"0"
    assert harness.table_dead_lettered == 2
    assert harness.run().dead_letters == []  # written once, with the batch after the refusal


def test_a_record_read_again_is_refused_once() -> None:
    harness = JobHarness(EXAMPLE)
    source = harness.table("example.thresholds", "all", b"junk")
    [table] = EXAMPLE.tables
    harness.core.apply_table(table, source)  # a changelog restored again after a rebalance
    assert harness.table_dead_lettered == 1
    assert len(harness.run().dead_letters) == 1


def test_the_spec_lists_every_schema_it_reads_and_writes() -> None:
    assert EXAMPLE.schemas() == {"telemetry.raw": "Telemetry", "example.thresholds": "Telemetry"}


# ---------------------------------------------------------------- clients


KAFKA = KafkaConfig("127.0.0.1:9092", "http://127.0.0.1:8081/apis/ccompat/v7", "test")


def test_consumers_commit_by_hand_and_read_committed() -> None:
    config = consumer_config(
        KAFKA, "fleetstream-x", instance="fleetstream-x-0", partition_assignment_strategy="range"
    )
    assert config["enable.auto.commit"] is False
    assert config["isolation.level"] == "read_committed"
    assert config["group.instance.id"] == "fleetstream-x-0"
    assert config["partition.assignment.strategy"] == "range"
    assert config["client.id"] == "test"
    assert "group.instance.id" not in consumer_config(KAFKA, "g")


def test_table_readers_and_transactional_producers() -> None:
    reader = table_reader_config(KAFKA, "fleetstream-table-t")
    assert reader["enable.partition.eof"] is True
    assert reader["isolation.level"] == "read_committed"
    producer = transactional_producer_config(KAFKA, "fleetstream-hot-0")
    assert producer["transactional.id"] == "fleetstream-hot-0"
    assert producer["acks"] == "all"
    assert producer["enable.idempotence"] is True


def test_the_process_entry_names_its_jobs() -> None:
    from infra.process import main

    with pytest.raises(SystemExit, match="hot-worker"):
        main(["no-such-job"])
