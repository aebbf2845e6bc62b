"""Run a job's spec on in-memory records, without Kafka: outputs, dead letters and state back.

    harness = JobHarness(HOT_JOB)
    harness.table("alerts.rules", "hot", rule_to_record(rule))
    run = harness.run(("telemetry.raw", "d-1", reading))
    assert [o.value["status"] for o in run.on("alerts")] == ["raised"]

Records go through the same code as on Kafka (streams/runtime/core.py): inputs and table
records given as mappings are Avro-encoded with the topic's schema first, then decoded as the
job would; bytes are taken as they are (a corrupt record is just bytes that do not decode).
Offsets are counted per topic and partition from 0, in the order records are given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic

from schemas.codec import AvroCodec, load_schema
from streams.runtime.core import JobCore
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.spec import Batch, JobSpec, Output, S

Value = Mapping[str, Any] | bytes | None
# (topic, key, value) or (topic, key, value, partition)
Given = tuple[str, str | bytes | None, Value] | tuple[str, str | bytes | None, Value, int]


def local_codecs(schemas: Mapping[str, str]) -> dict[str, AvroCodec]:
    """Codecs without a schema registry: schema ids numbered in the order given."""
    return {
        topic: AvroCodec(load_schema(schema), schema_id)
        for schema_id, (topic, schema) in enumerate(sorted(schemas.items()), start=1)
    }


@dataclass(frozen=True)
class JobRun(Generic[S]):
    """What one batch did: its outputs as `process` gave them (dead letters of inputs among
    them, on the job's dead-letter topic), the table records refused since the last batch
    (the error channel, written with this batch), and the state after it."""

    outputs: list[Output]
    dead_letters: list[DeadLetter]
    state: S

    def on(self, topic: str) -> list[Output]:
        return [o for o in self.outputs if o.topic == topic]


class JobHarness(Generic[S]):
    def __init__(self, spec: JobSpec[S]) -> None:
        self.spec = spec
        self.core = JobCore(spec, local_codecs(spec.schemas()))
        self._offsets: dict[tuple[str, int], int] = {}

    @property
    def state(self) -> S:
        return self.core.state

    @property
    def table_dead_lettered(self) -> int:
        return self.core.table_errors.count

    def start(self) -> None:
        """What the loop does once the global tables are read (the spec's `on_start`)."""
        if self.spec.on_start is not None:
            self.spec.on_start(self.core.state)

    def record(
        self,
        topic: str,
        key: str | bytes | None,
        value: Value,
        partition: int = 0,
        timestamp_ms: int = 0,
    ) -> SourceRecord:
        """A record as read from `topic`, at the partition's next offset."""
        offset = self._offsets.get((topic, partition), 0)
        self._offsets[(topic, partition)] = offset + 1
        raw_key = key.encode() if isinstance(key, str) else key
        if isinstance(value, Mapping):
            value = self.core.codecs[topic].encode(value)
        return SourceRecord(topic, partition, offset, raw_key, value, timestamp_ms)

    def table(
        self, topic: str, key: str | bytes | None, value: Value, partition: int = 0
    ) -> SourceRecord:
        """Apply a record of table `topic` (every table of the spec on that topic: a topic
        may be both a global table and a changelog); returns it as read."""
        source = self.record(topic, key, value, partition)
        tables = [t for t in self.spec.tables if t.topic == topic]
        if not tables:
            raise KeyError(f"{self.spec.name} has no table on {topic}")
        for table in tables:
            self.core.apply_table(table, source)
        return source

    def run(self, *given: Given | SourceRecord, now_ms: int = 0, tick: bool = False) -> JobRun[S]:
        """One batch of input records, as one transaction would hold it."""
        sources = [g if isinstance(g, SourceRecord) else self.record(*g) for g in given]
        inputs = [self.core.decode_input(source) for source in sources]
        outputs = self.core.process(Batch(inputs, now_ms, tick))
        return JobRun(outputs, self.core.table_errors.take(), self.core.state)

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        self.core.state.drop_partitions(set(partitions))


def run_job(
    spec: JobSpec[S],
    inputs: Sequence[Given | SourceRecord],
    tables: Sequence[Given] = (),
    now_ms: int = 0,
    tick: bool = False,
) -> JobRun[S]:
    """Tables first (each a (topic, key, value[, partition])), then one batch of `inputs`."""
    harness = JobHarness(spec)
    for given in tables:
        harness.table(*given)
    return harness.run(*inputs, now_ms=now_ms, tick=tick)
