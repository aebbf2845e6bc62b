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
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from schemas.codec import AvroCodec
from streams.runtime.clients import KafkaConfig, consumer_config, registered_codecs
from streams.runtime.core import JobCore
from streams.runtime.loop import BatchLoop
from streams.runtime.records import DeadLetter
from streams.runtime.source import gather
from streams.runtime.spec import Batch, JobSpec, Output, S, TableSpec
from streams.runtime.status import write_status
from streams.runtime.tables import Apply, ChangelogReader, GlobalTable, source_of
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
    transactions: int = 0
    # Where the time goes: decoding and processing vs writing and committing transactions.
    process_s: float = 0.0
    commit_s: float = 0.0
    transient_errors: int = 0  # recovered from: broker restarts, timeouts
    last_transient_error: str = ""
    table_dead_lettered: int = 0  # table records that could not be used (error channel)


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
        self.member = f"{spec.group}-{options.instance}"
        self.globals = [
            GlobalTable(kafka, t.topic, self._applier(t)) for t in spec.tables if not t.changelog
        ]
        self.changelogs = ChangelogReader(
            kafka,
            {t.topic: self._applier(t) for t in spec.tables if t.changelog},
            name=f"{spec.group}-restore",
        )
        self.transactions = Transactions(kafka, self.member)
        self.consumer = self._new_consumer()
        self._fenced = False  # the consumer hit a fatal error: recover() replaces it
        self._owned: set[int] = set()
        self._last_tick = 0.0

    @property
    def state(self) -> S:
        return self.core.state

    def _applier(self, table: TableSpec[S]) -> Apply:
        return lambda msg: self.core.apply_table(table, source_of(msg))

    def _new_consumer(self) -> Consumer:
        return Consumer(
            consumer_config(
                self.kafka,
                self.spec.group,
                # Static membership: a restarted instance takes its partitions back at once.
                instance=self.member,
                # Range assignment gives one instance the same partition numbers of every
                # input, which is what co-partitioned state needs.
                partition_assignment_strategy="range",
            )
        )

    # ------------------------------------------------------------------ partitions

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        new = {tp.partition for tp in partitions} - self._owned
        restored = self.changelogs.restore(sorted(new))
        self._owned |= new
        log.info("given partitions %s; %d changelog records restored", sorted(new), restored)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        self.state.drop_partitions(gone)
        self._owned -= gone
        log.info("partitions %s moved away", sorted(gone))

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self.transactions.start()
        for table in self.globals:
            table.catch_up()
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
            self.counters.commit_s += time.perf_counter() - processed

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
        owned = sorted(self._owned)
        self.state.drop_partitions(set(owned))
        if self._fenced:
            self._replace_consumer()
            return
        self.changelogs.restore(owned)
        rewind_to_committed(self.consumer)

    def _replace_consumer(self) -> None:
        """A new consumer for the dead one: it owns nothing until the group assigns it
        partitions (whose state `_on_assign` restores) and starts at the committed offsets."""
        self._owned = set()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the failed consumer: %s", exc)
        self.consumer = self._new_consumer()
        self._subscribe()
        self._fenced = False

    def on_transient(self, exc: BaseException) -> None:
        self._fenced = self._fenced or isinstance(exc, ConsumerFenced)
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

    def close(self) -> None:
        self.write_status()
        self.consumer.close()
        for table in self.globals:
            table.close()
        self.transactions.close()
