"""A declarative stream job: what it reads (inputs), the state it keeps (tables), what it writes
(outputs), and a pure `process` function from a batch of decoded records to output records.

The kit does all the Kafka around it (streams/runtime/job.py runs a spec on Kafka, one Kafka
transaction per batch; streams/runtime/testing.py runs it on in-memory records):

- every input record is decoded with its topic's Avro schema; one that does not decode reaches
  `process` with `dead` set (a dead letter ready for the job's dead-letter topic); an input
  without schema is not decoded (`process` gets its key, bytes and timestamp in `source`);
- every table record is decoded with its table's schema and handed to the table's `apply`; a
  record that does not decode, or that `apply` refuses (raising ``UnreadableRecord`` or
  ``ValueError``), goes to the job's dead-letter topic with its topic, partition and offset,
  and is counted (`table_dead_lettered` in the job's status);
- every output whose value is a mapping is encoded with its topic's Avro schema; bytes are
  written as they are.

A *global* table (``changelog=False``) is read whole by every instance of the job, then
followed between batches. A *changelog* table is co-partitioned with the inputs: an instance
restores the partitions it is given, and `drop_partitions` forgets the ones that move away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client.core import Metric

from streams.runtime.records import DeadLetter, SourceRecord

Headers = list[tuple[str, str | bytes | None]]


class JobState(Protocol):
    """What a job keeps in memory between batches (built by the spec's `state`)."""

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget what belongs to `partitions` (they moved to another instance, or the job
        rewinds to its last commit and restores them from the changelogs)."""

    def status(self) -> dict[str, Any]:
        """The job's counters and state summary, for its status file."""
        ...


S = TypeVar("S", bound=JobState)


@dataclass(frozen=True, slots=True)
class Input:
    """One input record: where it came from and its decoded value, or, if it did not decode,
    the dead letter to write instead."""

    source: SourceRecord
    record: dict[str, Any]
    dead: DeadLetter | None = None


@dataclass(frozen=True, slots=True)
class Output:
    """One record to write in the batch's transaction. A mapping value is Avro-encoded with the
    topic's schema (the job's `outputs`); bytes (or None, a tombstone) go as they are."""

    topic: str
    key: str | bytes | None
    value: Mapping[str, Any] | bytes | None
    headers: Headers | None = None


def dead_letter_output(topic: str, dead: DeadLetter) -> Output:
    """A dead letter as the platform writes them: original key and bytes, reason in headers."""
    return Output(topic, dead.source.key, dead.source.value, dead.headers())


@dataclass(frozen=True, slots=True)
class Batch:
    """What `process` gets: the batch's input records, the wall clock in milliseconds, and
    whether a tick is due (about once a second, for what depends on time passing)."""

    inputs: Sequence[Input]
    now_ms: int
    tick: bool = False


@dataclass(frozen=True, slots=True)
class TableRecord:
    """One table record for a table's `apply`: key (text), decoded value (None: a tombstone,
    or a table without schema), raw value and where it lives."""

    key: str
    record: dict[str, Any] | None
    value: bytes | None
    partition: int
    offset: int


@dataclass(frozen=True)
class TableSpec(Generic[S]):
    topic: str
    schema: str | None  # the Avro schema of its values; None: raw bytes (record stays None)
    apply: Callable[[S, TableRecord], None]
    changelog: bool = False  # per partition, restored on assignment; else global
    # A changelog of state not partitioned like the inputs (a single-instance job's own
    # output, read back): restored whole, not per partition (only with changelog=True).
    whole: bool = False
    # What an unreadable record means to the table: nothing (False: state stays as it was)
    # or a deletion of its key (True: apply gets a tombstone after it is dead-lettered).
    unreadable_deletes: bool = False


@dataclass(frozen=True)
class JobSpec(Generic[S]):
    name: str  # the job's name: its status file is `<name>.json`
    group: str  # consumer group; `<group>-<instance>` is the transactional id
    inputs: Mapping[str, str | None]  # topic -> Avro schema name (None: not decoded)
    outputs: Mapping[str, str | None]  # topic -> Avro schema name (None: raw bytes)
    dead_letters: str  # the dead-letter topic (`dlq.<source>`)
    stage: str  # header `source` of its dead letters
    state: Callable[[], S]
    process: Callable[[S, Batch], Iterable[Output]]
    tables: Sequence[TableSpec[S]] = field(default_factory=tuple)
    # The job's own Prometheus metrics, read from its state at each scrape (from another
    # thread: read, never change). The loop's own (records, transactions, ...) come anyway.
    metrics: Callable[[S], Iterable[Metric]] | None = None
    # Called once the global tables are read, before the first batch (then every table
    # record applied is news to the job).
    on_start: Callable[[S], None] | None = None

    def schemas(self) -> dict[str, str]:
        """Every topic with an Avro schema this job reads or writes, with that schema."""
        named = {t.topic: t.schema for t in self.tables if t.schema is not None}
        writes = {topic: schema for topic, schema in self.outputs.items() if schema is not None}
        reads = {topic: schema for topic, schema in self.inputs.items() if schema is not None}
        return {**named, **reads, **writes}
