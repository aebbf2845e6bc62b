"""The one loop that runs every loader job: Kafka batches -> decode -> store -> commit.

A loader (the cold path, say) is a :class:`LoaderSpec`: its consumer group, its sources (topic,
Avro schema, destination table, whether the topic is a compacted state topic) and its
dead-letter topic; the composition gives it one writer per table. :class:`LoaderLoop` takes a
batch (N records or what arrived within T seconds, streams/runtime/source.py), stores each
source's records (:class:`LoadPath`), then commits the batch's offsets.

It commits only after `store_batch` returned. So `store_batch` must never return before the
batch is durably stored: it retries with back-off while the store is away (the stream pauses,
nothing is skipped). Records that cannot be decoded go to the dead-letter topic with their
original bytes and where they came from, before the batch is committed. A crash between store
and commit re-reads the batch; the store's deduplication makes that a no-op (at least once into
Kafka, exactly once into the warehouse).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer
from prometheus_client.core import Metric

from schemas.codec import AvroCodec, Decoded
from streams.runtime.clients import KafkaConfig, producer_config, registered_codecs
from streams.runtime.loop import FailureStreak
from streams.runtime.metrics import (
    BATCH_BOUNDS,
    Buckets,
    counted,
    counted_by,
    counter,
    counter_families,
    gauge,
)
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.source import BatchSource
from streams.runtime.status import write_status
from streams.runtime.transactions import Backoff, ConsumerFenced, is_transient

log = logging.getLogger("fleetstream.cold")


@dataclass(frozen=True)
class LoadSource:
    topic: str
    schema: str  # Avro schema name of its values
    table: str  # where its records are stored (the writer's name)
    compacted: bool = False  # a state topic: a tombstone deletes a key, it is not bad input


@dataclass(frozen=True)
class LoaderSpec:
    name: str  # its status file is `<name>.json`
    group: str  # its consumer group; `<group>-<instance>` its static member id
    sources: Sequence[LoadSource]
    dead_letters: str  # the dead-letter topic (`dlq.<source>`)

    def schemas(self) -> dict[str, str]:
        return {s.topic: s.schema for s in self.sources}


@dataclass(frozen=True)
class LoaderOptions:
    status_path: Path
    batch_rows: int = 50_000  # a batch is this many records, or
    batch_seconds: float = 1.0  # what arrived within this long of its first record
    instance: int = 0


# Stores a batch of decoded records of one table (called in the loader's one writer thread).
Write = Callable[[list[dict[str, Any]]], object]
# The same, told where each record was read (records[i] from sources[i]): for a writer that
# routes some records elsewhere with where they came from (the cold path's quality gate), or
# names the batch by its offsets (the Doris sink's Stream Load label).
SourcedWrite = Callable[[list[dict[str, Any]], list[SourceRecord]], object]


@dataclass(frozen=True)
class DecodedBatch:
    records: list[dict[str, Any]]
    dead: list[DeadLetter]
    tombstones: int = 0
    sources: list[SourceRecord] = field(default_factory=list)  # where records[i] was read


def decode_batch(
    batch: Sequence[SourceRecord], codec: AvroCodec, *, compacted: bool = False
) -> DecodedBatch:
    """Pure: the ok/error split of a batch. On a compacted topic a record without a value is a
    deletion (counted, nothing to load); anywhere else it is bad input."""
    records: list[dict[str, Any]] = []
    sources: list[SourceRecord] = []
    dead: list[DeadLetter] = []
    tombstones = 0
    for rec in batch:
        if rec.value is None:
            if compacted:
                tombstones += 1
            else:
                dead.append(DeadLetter(rec, "no_value", "a record without a value (tombstone)"))
            continue
        result = codec.decode(rec.value)
        if isinstance(result, Decoded):
            records.append(result.record)
            sources.append(rec)
        else:
            dead.append(DeadLetter(rec, str(result.reason), result.detail))
    return DecodedBatch(records, dead, tombstones, sources)


@dataclass
class LoaderCounters:
    batches: int = counted("Batches stored (one per source)")
    stored_rows: int = 0  # the sum of by_table
    dead_lettered: int = 0  # the sum of dead_letter_reasons
    tombstones: int = counted("Deletions read on state topics")
    retries: int = counted("Store or Kafka attempts retried")
    last_batch_at: float = 0.0
    by_table: dict[str, int] = counted_by("table", "Rows stored in the warehouse", metric="rows")
    dead_letter_reasons: dict[str, int] = counted_by(
        "reason", "Records sent to the dead-letter topic, by reason", metric="dead_lettered"
    )


@dataclass
class LoaderTimings:
    """Distributions behind the totals, for the metrics (not the status file)."""

    batch_records: Buckets = field(default_factory=lambda: Buckets(BATCH_BOUNDS))
    store_seconds: Buckets = field(default_factory=Buckets)
    commit_seconds: Buckets = field(default_factory=Buckets)


# A loader waits longer between tries than a transactional job: a warehouse away is usually
# away for a while.
LOAD_BACKOFF = Backoff(first=0.2, longest=10.0)


async def until_done(
    attempt: Callable[[], Awaitable[None]],
    retryable: tuple[type[BaseException], ...],
    counters: LoaderCounters,
    what: str,
    backoff: Backoff = LOAD_BACKOFF,
) -> None:
    """Run `attempt` until it succeeds; retryable failures wait and try again."""
    for delay in backoff.delays():
        try:
            await attempt()
            return
        except retryable as exc:
            counters.retries += 1
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


@dataclass
class LoadPath:
    """What a loader does with a batch of one source; I/O is injected so it tests without
    services."""

    table: str
    codec: AvroCodec
    write: Callable[[list[dict[str, Any]]], Awaitable[None]]
    dead_letter: Callable[[list[DeadLetter]], Awaitable[None]]
    retryable: tuple[type[BaseException], ...]
    counters: LoaderCounters
    # Failures that retrying cannot cure (the warehouse refuses the rows): the batch goes to the
    # dead-letter topic instead, so the stream neither stalls forever nor skips silently.
    rejected: tuple[type[BaseException], ...] = ()
    backoff: Backoff = LOAD_BACKOFF
    compacted: bool = False  # the source is a compacted state topic (tombstones are deletions)
    # Set: called instead of `write`, with where each record was read (see SourcedWrite).
    write_sourced: Callable[[list[dict[str, Any]], list[SourceRecord]], Awaitable[None]] | None = (
        None
    )

    async def store_batch(self, batch: Sequence[SourceRecord]) -> None:
        decoded = decode_batch(batch, self.codec, compacted=self.compacted)
        self.counters.tombstones += decoded.tombstones
        try:
            await self._store(decoded)
        except self.rejected as exc:
            log.error("%s refused a batch of %d: %s", self.table, len(batch), exc)
            refused = [DeadLetter(rec, "sink_rejected", str(exc)) for rec in batch]
            decoded = DecodedBatch([], refused)
            await self._store(decoded)
        self.counters.batches += 1
        self.counters.last_batch_at = time.time()

    async def _store(self, decoded: DecodedBatch) -> None:
        if decoded.dead:
            dead = decoded.dead
            await until_done(
                lambda: self.dead_letter(dead),
                self.retryable,
                self.counters,
                f"dead-lettering {len(dead)} from {self.table}",
            )
            self.counters.dead_lettered += len(dead)
            reasons = self.counters.dead_letter_reasons
            for d in dead:
                reasons[d.reason] = reasons.get(d.reason, 0) + 1
        if decoded.records:
            records, sources, sourced = decoded.records, decoded.sources, self.write_sourced
            await until_done(
                lambda: sourced(records, sources) if sourced else self.write(records),
                self.retryable,
                self.counters,
                f"writing {len(records)} rows to {self.table}",
            )
            self.counters.stored_rows += len(records)
            self.counters.by_table[self.table] = self.counters.by_table.get(self.table, 0) + len(
                records
            )


class DeadLetterProducer:
    """Writes dead letters and waits for Kafka to have them (before the batch is acked)."""

    def __init__(self, kafka: KafkaConfig, topic: str) -> None:
        self._producer = Producer(producer_config(kafka))
        self._topic = topic

    def send(self, dead: list[DeadLetter]) -> None:
        failures: list[str] = []
        for d in dead:
            self._producer.produce(
                self._topic,
                key=d.source.key,
                value=d.source.value,
                headers=d.headers(),
                on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
            )
        if self._producer.flush(30) or failures:
            raise KafkaException(f"dead letters not delivered: {failures[:3]}")


def _no_writer(records: list[dict[str, Any]]) -> object:
    raise TypeError("this table is written by its sourced writer")


class LoaderLoop:
    """A loader job on Kafka: take a batch, store it (retrying while the store is away), then
    commit it; transient Kafka errors rewind to the last commit and go on."""

    def __init__(
        self,
        spec: LoaderSpec,
        kafka: KafkaConfig,
        options: LoaderOptions,
        writers: Mapping[str, Write],
        retryable: tuple[type[BaseException], ...],
        rejected: tuple[type[BaseException], ...] = (),
        codecs: Mapping[str, AvroCodec] | None = None,
        sourced_writers: Mapping[str, SourcedWrite] | None = None,
        status_extra: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.spec = spec
        self.kafka = kafka
        self.options = options
        self.counters = LoaderCounters()
        self.status_extra = status_extra  # more of the job's counters for its status file
        self.timings = LoaderTimings()
        # One writer thread: batches reach the store in order, one at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink")
        self.dlq = DeadLetterProducer(kafka, spec.dead_letters)
        self.transient_errors = 0  # recovered from: broker restarts, timeouts
        self.last_transient_error = ""
        codecs = codecs or registered_codecs(kafka, spec.schemas())
        self.paths: dict[str, LoadPath] = {}
        sourced_writers = sourced_writers or {}
        for src in spec.sources:
            sourced_writer = sourced_writers.get(src.table)
            writer = writers[src.table] if sourced_writer is None else _no_writer

            async def write(records: list[dict[str, Any]], writer: Write = writer) -> None:
                await self._in_writer_thread(writer, records)

            async def write_sourced(
                records: list[dict[str, Any]],
                sources: list[SourceRecord],
                writer: SourcedWrite | None = sourced_writer,
            ) -> None:
                await self._in_writer_thread(writer, records, sources)

            async def dead_letter(dead: list[DeadLetter]) -> None:
                await self._in_writer_thread(self.dlq.send, dead)

            self.paths[src.topic] = LoadPath(
                src.table,
                codecs[src.topic],
                write,
                dead_letter,
                (*retryable, KafkaException),
                self.counters,
                rejected=rejected,
                compacted=src.compacted,
                write_sourced=write_sourced if sourced_writer is not None else None,
            )

    async def _in_writer_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping`: take a batch, store it (retrying while the store is away),
        then commit it. A batch in hand when asked to stop is finished first."""
        reporter = asyncio.create_task(self._report_forever())
        try:
            await self._load_until(stopping)
        finally:
            reporter.cancel()

    async def _load_until(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        topics = [src.topic for src in self.spec.sources]
        consumer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")
        member = f"{self.spec.group}-{self.options.instance}"

        def new_source() -> BatchSource:
            return BatchSource(self.kafka, topics, self.spec.group, instance=member)

        source = new_source()
        rows, seconds = self.options.batch_rows, self.options.batch_seconds
        failures = FailureStreak(Backoff(first=0.2, longest=5.0))
        try:
            while not stopping.is_set():
                try:
                    batch = await loop.run_in_executor(consumer_thread, source.take, rows, seconds)
                    by_topic: dict[str, list[SourceRecord]] = {}
                    for rec in batch:
                        by_topic.setdefault(rec.topic, []).append(rec)
                    started = time.perf_counter()
                    for topic, records in by_topic.items():
                        await self.paths[topic].store_batch(records)
                    stored = time.perf_counter()
                    await loop.run_in_executor(consumer_thread, source.commit, batch)
                    if batch:
                        self.timings.batch_records.observe(len(batch))
                        self.timings.store_seconds.observe(stored - started)
                        self.timings.commit_seconds.observe(time.perf_counter() - stored)
                    failures.reset()
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    if isinstance(exc, ConsumerFenced):
                        # The consumer is dead: a new one starts at the committed offsets.
                        self._count_transient(exc)
                        await loop.run_in_executor(consumer_thread, source.close)
                        if await self._sleep(stopping, failures.next_delay()):
                            return
                        source = await loop.run_in_executor(consumer_thread, new_source)
                        continue
                    await self._rewind(source, consumer_thread, stopping, failures, exc)
        finally:
            await loop.run_in_executor(consumer_thread, source.close)

    def _count_transient(self, exc: BaseException) -> None:
        self.counters.retries += 1
        self.transient_errors += 1
        self.last_transient_error = str(exc)
        log.warning("transient Kafka error (%s); recovering", exc)

    @staticmethod
    async def _sleep(stopping: asyncio.Event, delay: float) -> bool:
        """Wait `delay`; True if asked to stop meanwhile."""
        try:
            await asyncio.wait_for(stopping.wait(), delay)
            return True
        except TimeoutError:
            return False

    async def _rewind(
        self,
        source: BatchSource,
        consumer_thread: ThreadPoolExecutor,
        stopping: asyncio.Event,
        failures: FailureStreak,
        exc: BaseException,
    ) -> None:
        """A transient Kafka error (a commit meeting NOT_COORDINATOR while the broker comes
        back, say): back off, then rewind to the last commit, until the rewind succeeds."""
        loop = asyncio.get_running_loop()
        while True:
            self._count_transient(exc)
            if await self._sleep(stopping, failures.next_delay()):
                return
            try:
                await loop.run_in_executor(consumer_thread, source.rewind)
                return
            except Exception as again:
                if not is_transient(again) or isinstance(again, ConsumerFenced):
                    raise
                exc = again

    def close(self) -> None:
        self.write_status()
        self.executor.shutdown(wait=True)

    def write_status(self, ready: bool = True, **extra: Any) -> None:
        status = {
            "pid": os.getpid(),
            "ready": ready,
            **asdict(self.counters),
            "transient_errors": self.transient_errors,
            "last_transient_error": self.last_transient_error,
            **(self.status_extra() if self.status_extra is not None else {}),
            **extra,
        }
        write_status(self.options.status_path, status)

    def metrics(self) -> Iterator[Metric]:
        """The loop's counters as Prometheus metrics (streams/runtime/metrics.py)."""
        c, t = self.counters, self.timings
        yield from counter_families("fleetstream_loader", c)
        yield counter(
            "fleetstream_loader_transient_errors",
            "Transient Kafka errors recovered from",
            self.transient_errors,
        )
        yield t.batch_records.family("fleetstream_loader_batch_records", "Records per batch taken")
        yield t.store_seconds.family(
            "fleetstream_loader_store_seconds", "Time to store a batch (all its tables)"
        )
        yield t.commit_seconds.family(
            "fleetstream_loader_commit_seconds", "Time to commit a stored batch's offsets"
        )
        yield gauge(
            "fleetstream_loader_last_batch_timestamp_seconds",
            "When the last batch was stored (epoch seconds)",
            c.last_batch_at,
        )

    async def _report_forever(self) -> None:
        while True:
            self.write_status()
            await asyncio.sleep(1.0)
