"""The one loop that runs every transactional job: a :class:`~streams.runtime.spec.JobSpec`
on Kafka, exactly once.

It consumes the spec's inputs in the spec's consumer group and, per batch, in **one Kafka
transaction** writes what `process` emitted, the dead letters of the batch (inputs that did not
decode, table records that could not be used) and the batch's input offsets. Either all of it
is visible to read-committed consumers or none: a job killed mid-batch restarts from the last
committed offsets with the state committed with them (its changelog tables), and emits the
batch once.

Changelog tables are restored for the partitions an instance is given (the topics are
co-partitioned with the inputs: same key, same partition count; range assignment gives an
instance the same partition numbers of every input); global tables are read whole and followed
between batches. Instances scale by partition: each has its own `instance` number, hence its
own transactional id and static group membership.

Nothing that can fail runs inside the consumer's rebalance callbacks: they only note what was
given or taken. A Python exception out of a callback makes `consume()` raise and drop what that
call fetched, which may hold the consumer's fatal error (a static member fenced after a broker
restart): the job would then poll a dead consumer forever. A given partition's state is
restored by the next `step`, before its records are processed (or by `recover`, which restores
every owned or given partition); a fatal consumer error is also taken from the consumer's error
callback, so it is never missed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Generic

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client.core import Metric

from schemas.codec import AvroCodec
from streams.runtime.clients import KafkaConfig, consumer_config, registered_codecs
from streams.runtime.core import JobCore
from streams.runtime.loop import BatchLoop
from streams.runtime.metrics import BATCH_BOUNDS, Buckets, counted, counter, counter_families, gauge
from streams.runtime.records import DeadLetter
from streams.runtime.source import gather
from streams.runtime.spec import Batch, JobSpec, Output, S, TableSpec
from streams.runtime.status import write_status
from streams.runtime.tables import Apply, ChangelogReader, GlobalTables, source_of
from streams.runtime.transactions import (
    Aborted,
    ConsumerFenced,
    Transactions,
    check_consumed,
    rewind_to_committed,
)

log = logging.getLogger("fleetstream.job")


@dataclass(frozen=True)
class JobOptions:
    """How one instance of a job runs (the composition root fills it from the settings)."""

    status_path: Path
    instance: int = 0
    max_batch: int = 5_000  # records per batch (per transaction), at most
    poll_ms: int = 20  # how long a batch waits for more records after its first
    tick_s: float = 1.0  # how often `process` gets a batch with `tick` set


@dataclass
class LoopCounters:
    transactions: int = counted("Kafka transactions committed")
    # Where the time goes: decoding and processing vs writing and committing transactions.
    process_s: float = 0.0
    commit_s: float = 0.0
    # Recovered from: broker restarts, timeouts.
    transient_errors: int = counted("Transient Kafka errors recovered from")
    last_transient_error: str = ""
    table_dead_lettered: int = 0  # table records that could not be used (error channel)
    # Input records consumed (and committed or being committed).
    records: int = counted("Input records consumed")


@dataclass
class LoopTimings:
    """Distributions behind the totals, for the metrics (not the status file)."""

    batch_records: Buckets = field(default_factory=lambda: Buckets(BATCH_BOUNDS))
    commit_seconds: Buckets = field(default_factory=Buckets)


def now_ms() -> int:
    return int(time.time() * 1000)


class TransactionalJob(BatchLoop, Generic[S]):
    def __init__(
        self,
        spec: JobSpec[S],
        kafka: KafkaConfig,
        options: JobOptions,
        codecs: Mapping[str, AvroCodec] | None = None,
    ) -> None:
        self.spec = spec
        self.kafka = kafka
        self.options = options
        self.core = JobCore(spec, codecs or registered_codecs(kafka, spec.schemas()))
        self.counters = LoopCounters()
        self.timings = LoopTimings()
        self.member = f"{spec.group}-{options.instance}"
        global_specs = [t for t in spec.tables if not t.changelog]
        appliers = {t.topic: self._applier(t) for t in global_specs}
        if len(appliers) < len(global_specs):
            raise ValueError(f"job {spec.name}: two global tables of one topic")
        # One reader for all of them (GlobalTables).
        self.globals = (
            [GlobalTables(kafka, appliers, name=f"fleetstream-{spec.name}-tables")]
            if appliers
            else []
        )
        self.changelogs = ChangelogReader(
            kafka,
            {t.topic: self._applier(t) for t in spec.tables if t.changelog},
            name=f"{spec.group}-restore",
            whole=frozenset(t.topic for t in spec.tables if t.changelog and t.whole),
        )
        self.transactions = Transactions(kafka, self.member, self.watchdog)
        self.consumer = self._new_consumer()
        self._fenced = False  # the consumer hit a fatal error: recover() replaces it
        self._consumer_error: str | None = None  # a fatal error its error callback reported
        self._owned: set[int] = set()  # partitions whose state is restored
        self._given: set[int] = set()  # partitions assigned, state not restored yet
        self._last_tick = 0.0

    @property
    def state(self) -> S:
        return self.core.state

    def _applier(self, table: TableSpec[S]) -> Apply:
        return lambda msg: self.core.apply_table(table, source_of(msg))

    def _new_consumer(self) -> Consumer:
        self._consumer_error = None
        config = consumer_config(
            self.kafka,
            self.spec.group,
            # Static membership: a restarted instance takes its partitions back at once.
            instance=self.member,
            # Range assignment gives one instance the same partition numbers of every
            # input, which is what co-partitioned state needs.
            partition_assignment_strategy="range",
        )
        return Consumer({**config, "error_cb": self._on_consumer_error})

    def _on_consumer_error(self, error: KafkaError) -> None:
        """The consumer's error callback: a fatal error is kept for the next step (it raises
        ConsumerFenced); the others are librdkafka's to retry."""
        if error.fatal() or error.code() == KafkaError._FATAL:
            self._consumer_error = str(error)
        else:
            log.debug("consumer: %s", error)

    # ------------------------------------------------------------------ partitions

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Note the partitions given; their state is restored by the next step (see the
        module's docstring: nothing here may raise)."""
        self._given |= {tp.partition for tp in partitions} - self._owned
        log.info("given partitions %s", sorted(self._given))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        self.state.drop_partitions(gone)
        self._owned -= gone
        self._given -= gone
        log.info("partitions %s moved away", sorted(gone))

    def _restore_given(self) -> None:
        """Restore the state of the partitions given since the last step (a failure goes to
        the loop, whose recovery restores them and rewinds what was consumed)."""
        if not self._given:
            return
        given = sorted(self._given)
        restored = self.changelogs.restore(given)
        self._owned |= self._given
        self._given = set()
        log.info("partitions %s restored: %d changelog records", given, restored)

    def _check_consumer(self) -> None:
        if self._consumer_error is not None:
            raise ConsumerFenced(self._consumer_error)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self.transactions.start()
        for table in self.globals:
            table.catch_up()
        if self.spec.on_start is not None:
            self.spec.on_start(self.state)
        self._subscribe()

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            list(self.spec.inputs), on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    def step(self) -> None:
        """One batch: consume, process, write outputs + dead letters + offsets in a
        transaction."""
        for table in self.globals:
            table.poll()
        # Idle, the wait for a first record lasts until the next tick (one wake-up a second,
        # not one per poll_ms); once one is there, what arrives within poll_ms joins it.
        until_tick = self.options.tick_s - (time.monotonic() - self._last_tick)
        messages = gather(
            self.consumer, self.options.max_batch, until_tick, self.options.poll_ms / 1000
        )
        check_consumed(messages)
        self._check_consumer()
        self._restore_given()
        started = time.perf_counter()
        inputs = [self.core.decode_input(source_of(m)) for m in messages if m.error() is None]
        tick = time.monotonic() - self._last_tick >= self.options.tick_s
        if tick:
            self._last_tick = time.monotonic()
        outputs = self.core.process(Batch(inputs, now_ms(), tick))
        processed = time.perf_counter()
        self.counters.process_s += processed - started
        if inputs or outputs or self.core.table_errors:
            self._commit(outputs, self.core.table_errors.take(), consumed=bool(inputs))
            commit_s = time.perf_counter() - processed
            self.counters.commit_s += commit_s
            self.counters.records += len(inputs)
            self.timings.commit_seconds.observe(commit_s)
            self.timings.batch_records.observe(len(inputs))

    def _produce_all(
        self, outputs: Sequence[Output], dead: Sequence[DeadLetter], producer: Producer
    ) -> None:
        produce, encode = producer.produce, self.core.encode
        for out in outputs:
            if out.headers is None:
                produce(out.topic, key=out.key, value=encode(out))
            else:
                produce(out.topic, key=out.key, value=encode(out), headers=out.headers)
        for d in dead:
            produce(
                self.spec.dead_letters, key=d.source.key, value=d.source.value, headers=d.headers()
            )

    def _commit(
        self, outputs: Sequence[Output], dead: Sequence[DeadLetter], consumed: bool
    ) -> None:
        try:
            committed = self.transactions.commit(
                self.consumer, lambda producer: self._produce_all(outputs, dead, producer), consumed
            )
        except BaseException:
            self.core.table_errors.returned(dead)
            raise
        if not committed:
            self.core.table_errors.returned(dead)
            raise Aborted(f"{self.spec.name} transaction aborted")
        self.counters.transactions += 1

    def recover(self) -> None:
        """After a transient failure or an abort: nothing open, and state and positions back
        to what the last commit holds (the changelogs and the committed offsets). Safe to
        call again if it fails half-way: it drops and restores the whole owned state."""
        self.transactions.abort()
        owned = sorted(self._owned | self._given)
        self.state.drop_partitions(set(owned))
        if self._fenced:
            self._replace_consumer()
            return
        self._owned, self._given = set(), set(owned)
        self._restore_given()
        rewind_to_committed(self.consumer)

    def _replace_consumer(self) -> None:
        """A new consumer for the dead one: it owns nothing until the group assigns it
        partitions (whose state the next step restores) and starts at the committed offsets."""
        self._owned, self._given = set(), set()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the failed consumer: %s", exc)
        self.consumer = self._new_consumer()
        self._subscribe()
        self._fenced = False

    def on_transient(self, exc: BaseException) -> None:
        self._fenced = self._fenced or isinstance(exc, ConsumerFenced)
        self._fenced = self._fenced or self._consumer_error is not None
        self.counters.transient_errors += 1
        self.counters.last_transient_error = str(exc)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, object]:
        self.counters.table_dead_lettered = self.core.table_errors.count
        return {
            "pid": os.getpid(),
            "ready": True,
            "partitions": sorted(self._owned),
            **self.state.status(),
            **asdict(self.counters),
        }

    def write_status(self) -> None:
        write_status(self.options.status_path, self.status())

    def metrics(self) -> Iterator[Metric]:
        """The loop's counters as Prometheus metrics (streams/runtime/metrics.py), then the
        job's own (its spec's `metrics`, from its state)."""
        c = self.counters
        yield from counter_families("fleetstream_job", c)
        yield self.timings.batch_records.family(
            "fleetstream_job_batch_records", "Input records per committed batch"
        )
        yield self.timings.commit_seconds.family(
            "fleetstream_job_commit_seconds", "Time to write and commit a batch's transaction"
        )
        yield counter(
            "fleetstream_job_process_seconds", "Time spent decoding and processing", c.process_s
        )
        yield counter(
            "fleetstream_job_table_dead_lettered",
            "Table records that could not be used (sent to the dead-letter topic)",
            self.core.table_errors.count,
        )
        yield gauge("fleetstream_job_partitions", "Input partitions owned", len(self._owned))
        if self.spec.metrics is not None:
            yield from self.spec.metrics(self.state)

    def close(self) -> None:
        self.write_status()
        self.consumer.close()
        for table in self.globals:
            table.close()
        self.transactions.close()
