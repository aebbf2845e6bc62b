"""The cold-path worker: Kafka batches -> decode -> warehouse, then commit.

It is a consumer group of its own (`fleetstream-cold`, streams/source.py), so it scales, lags
and fails apart from the hot path; workers scale by partition. Configured from the one
settings object.

Besides telemetry and device events it loads `twin.state` into `twin_history` (one row per twin
version). That topic is written by the hot worker's transactional producer: the consumer's
default isolation.level (read_committed) is what keeps aborted twin states out; keep it.
It also loads `ota.rollouts` (compacted, the OTA controller's rollout states) into `ota_events`
(one row per rollout version and cohort: state and device counts per progress status).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.settings import Settings
from schemas.codec import CodecRegistry, load_schema
from sinks.clickhouse import (
    EVENTS_TABLE,
    OTA_EVENTS_TABLE,
    TELEMETRY_TABLE,
    TWIN_HISTORY_TABLE,
    ClickHouseSink,
    InvalidBatch,
    SinkUnavailable,
    WriteResult,
)
from streams.cold import DLQ_TOPIC, ColdCounters, ColdPath, DeadLetter, SourceRecord
from streams.ota.model import Progress, Rollout
from streams.ota.model import from_record as rollout_from_record
from streams.runtime.status import write_status
from streams.source import COLD_GROUP, BatchSource
from streams.transactions import Backoff, ConsumerFenced, FailureStreak, is_transient
from streams.twin import TwinDocumentError, delta, from_record

log = logging.getLogger("fleetstream.streams")

SOURCES = {
    TELEMETRY_TABLE: ("telemetry.raw", "Telemetry"),
    EVENTS_TABLE: ("device.events", "DeviceEvent"),
    TWIN_HISTORY_TABLE: ("twin.state", "TwinState"),
    OTA_EVENTS_TABLE: ("ota.rollouts", "Rollout"),
}

# State topics (compacted): a tombstone there deletes a key, it is not bad input.
COMPACTED_SOURCES = frozenset({"twin.state", "ota.rollouts"})

# ota_events count columns: the progress statuses each one adds up.
OTA_COUNT_COLUMNS: dict[str, tuple[Progress, ...]] = {
    "planned": (Progress.planned,),
    "skipped": (Progress.skipped,),
    "sent": (Progress.sent,),
    "in_progress": (Progress.downloading, Progress.verifying, Progress.installing),
    "succeeded": (Progress.succeeded,),
    "failed": (Progress.failed,),
    "rollback_sent": (Progress.rollback_sent,),
    "rolled_back": (Progress.rolled_back,),
    "rollback_failed": (Progress.rollback_failed,),
}


def _compact_json(document: Mapping[str, Any]) -> str:
    """As streams.twin writes documents into TwinState: compact, keys sorted, UTF-8, strict
    JSON (a NaN raises ValueError)."""
    return json.dumps(
        document, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    )


def twin_history_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Decoded ``TwinState`` records as ``twin_history`` rows: device_id, version, updated_at,
    last_reported_seq, the desired and reported documents (compact JSON), ``delta`` (compact
    JSON of :func:`streams.twin.delta`) and ``delta_keys`` (its number of top-level keys).

    Done here, not in the sink: the delta is the twin's domain, and sinks/ imports nothing from
    streams/ (the sink converts these rows generically). A record whose documents are not JSON
    objects raises :class:`InvalidBatch`, so the cold path dead-letters the batch, as it does a
    telemetry batch the sink refuses.
    """
    rows = []
    for i, record in enumerate(records):
        try:
            twin = from_record(record)
            twin_delta = delta(twin)
            row = {
                "device_id": twin.device_id,
                "version": twin.version,
                "updated_at": twin.updated_at,
                "desired": _compact_json(twin.desired),
                "reported": _compact_json(twin.reported),
                "delta": _compact_json(twin_delta),
                "delta_keys": len(twin_delta),
                "last_reported_seq": twin.last_reported_seq,
            }
        except (TwinDocumentError, KeyError, TypeError, ValueError) as exc:
            device = record.get("device_id", "?")
            raise InvalidBatch(f"twin_history: record {i} (device {device!r}): {exc}") from exc
        rows.append(row)
    return rows


def rollout_rows(rollout: Rollout) -> list[dict[str, Any]]:
    """One rollout version as ``ota_events`` rows: one per cohort, with the rollout's state,
    artifact version, target, current cohort and reason, the cohort's number of devices and
    how many of them are in each status (:data:`OTA_COUNT_COLUMNS`). A rollout not split into
    cohorts yet gives one row, cohort 0, with zero counts, so every transition is recorded."""
    common = {
        "rollout_id": rollout.rollout_id,
        "updated_at": rollout.updated_ms,
        "state": str(rollout.state),
        "version": rollout.artifact.version,
        "target": str(rollout.target),
        "current_cohort": rollout.cohort_index,
        "reason": rollout.reason,
    }
    rows = []
    for index, members in enumerate(rollout.cohorts or ((),)):
        counts = rollout.counts(index)
        row = {**common, "cohort": index, "devices": len(members)}
        for column, statuses in OTA_COUNT_COLUMNS.items():
            row[column] = sum(counts[status] for status in statuses)
        rows.append(row)
    return rows


def ota_events_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Decoded ``Rollout`` records as ``ota_events`` rows (:func:`rollout_rows` of each).

    Done here, not in the sink: the rollout is the OTA core's domain (``streams.ota``). The
    controller may write several versions of a rollout in one millisecond (same updated_ms,
    hence the same (rollout_id, cohort, updated_at) keys): of those in one batch only the last
    (the newest, in topic order) is kept, so the table never holds two states for one key.
    A record that does not decode raises :class:`InvalidBatch`, so the cold path dead-letters
    the batch.
    """
    latest: dict[tuple[str, int], Rollout] = {}
    for i, record in enumerate(records):
        try:
            rollout = rollout_from_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            rollout_id = record.get("rollout_id", "?")
            raise InvalidBatch(f"ota_events: record {i} (rollout {rollout_id!r}): {exc}") from exc
        key = (rollout.rollout_id, rollout.updated_ms)
        latest.pop(key, None)  # re-inserted: dicts keep insertion order, so topic order holds
        latest[key] = rollout
    return [row for rollout in latest.values() for row in rollout_rows(rollout)]


class DeadLetterProducer:
    """Writes dead letters and waits for Kafka to have them (before the batch is acked)."""

    def __init__(self, settings: Settings) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
            }
        )

    def send(self, dead: list[DeadLetter]) -> None:
        failures: list[str] = []
        for d in dead:
            self._producer.produce(
                DLQ_TOPIC,
                key=d.source.key,
                value=d.source.value,
                headers=d.headers(),
                on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
            )
        if self._producer.flush(30) or failures:
            raise KafkaException(f"dead letters not delivered: {failures[:3]}")


class ColdWorker:
    """The cold path's loader and the sink it writes; one process owns the chDB folder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.counters = ColdCounters()
        self.sink = ClickHouseSink(settings.warehouse_dsn)
        # One writer thread: batches reach the warehouse in order, one at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink")
        self.dlq = DeadLetterProducer(settings)
        self.paths: dict[str, ColdPath] = {}
        self.transient_errors = 0  # recovered from (issue 12): broker restarts, timeouts
        self.last_transient_error = ""
        self._build_paths()

    def _writers(self) -> dict[str, Callable[[list[dict[str, Any]]], WriteResult]]:
        """Per table, what stores a batch of its decoded records (in the sink thread)."""

        def write_twin_history(records: list[dict[str, Any]]) -> WriteResult:
            return self.sink.write_twin_history(twin_history_rows(records))

        def write_ota_events(records: list[dict[str, Any]]) -> WriteResult:
            return self.sink.write_ota_events(ota_events_rows(records))

        return {
            TELEMETRY_TABLE: self.sink.write_telemetry,
            EVENTS_TABLE: self.sink.write_events,
            TWIN_HISTORY_TABLE: write_twin_history,
            OTA_EVENTS_TABLE: write_ota_events,
        }

    async def _in_sink_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _build_paths(self) -> None:
        registry = CodecRegistry(SchemaRegistryClient({"url": self.settings.registry_url}))
        writers = self._writers()
        for table, (topic_name, schema) in SOURCES.items():
            codec = registry.codec(topic_name, load_schema(schema))
            writer = writers[table]

            async def write(records: list[dict[str, Any]], writer: Any = writer) -> None:
                await self._in_sink_thread(writer, records)

            async def dead_letter(dead: list[DeadLetter]) -> None:
                await self._in_sink_thread(self.dlq.send, dead)

            path = ColdPath(
                table,
                codec,
                write,
                dead_letter,
                (SinkUnavailable, KafkaException),
                self.counters,
                rejected=(InvalidBatch,),
                compacted=topic_name in COMPACTED_SOURCES,
            )
            self.paths[topic_name] = path

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping`: take a batch, store it (retrying while the warehouse is away),
        then commit it. A batch in hand when asked to stop is finished first."""
        reporter = asyncio.create_task(self._report_forever())
        try:
            await self._load_until(stopping)
        finally:
            reporter.cancel()

    async def _load_until(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        topics = [topic for topic, _ in SOURCES.values()]
        consumer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")

        def new_source() -> BatchSource:
            return BatchSource(self.settings, topics, instance=f"{COLD_GROUP}-0")

        source = new_source()
        rows, seconds = self.settings.sink_batch_rows, self.settings.sink_batch_seconds
        failures = FailureStreak(Backoff(first=0.2, longest=5.0))
        try:
            while not stopping.is_set():
                try:
                    batch = await loop.run_in_executor(consumer_thread, source.take, rows, seconds)
                    by_topic: dict[str, list[SourceRecord]] = {}
                    for rec in batch:
                        by_topic.setdefault(rec.topic, []).append(rec)
                    for topic, records in by_topic.items():
                        await self.paths[topic].store_batch(records)
                    await loop.run_in_executor(consumer_thread, source.commit, batch)
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

    @property
    def status_path(self) -> Path:
        return self.settings.run_dir / "cold-worker.json"

    def close(self) -> None:
        self.write_status()
        self.executor.shutdown(wait=True)
        self.sink.close()

    def write_status(self, ready: bool = True, **extra: Any) -> None:
        status = {
            "pid": os.getpid(),
            "ready": ready,
            **asdict(self.counters),
            "transient_errors": self.transient_errors,
            "last_transient_error": self.last_transient_error,
            **extra,
        }
        write_status(self.status_path, status)

    async def _report_forever(self) -> None:
        while True:
            self.write_status()
            await asyncio.sleep(1.0)
