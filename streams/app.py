"""The cold-path worker: Kafka batches -> decode -> warehouse, then commit.

It is a consumer group of its own (`fleetstream-cold`, streams/source.py), so it scales, lags
and fails apart from the hot path; workers scale by partition. Configured from the one
settings object.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.settings import Settings
from infra.status_file import write_status
from schemas.codec import CodecRegistry, load_schema
from sinks.clickhouse import (
    EVENTS_TABLE,
    TELEMETRY_TABLE,
    ClickHouseSink,
    InvalidBatch,
    SinkUnavailable,
)
from streams.cold import DLQ_TOPIC, ColdCounters, ColdPath, DeadLetter, SourceRecord
from streams.source import BatchSource

log = logging.getLogger("fleetstream.streams")

SOURCES = {
    TELEMETRY_TABLE: ("telemetry.raw", "Telemetry"),
    EVENTS_TABLE: ("device.events", "DeviceEvent"),
}


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
        self._build_paths()

    async def _in_sink_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _build_paths(self) -> None:
        registry = CodecRegistry(SchemaRegistryClient({"url": self.settings.registry_url}))
        for table, (topic_name, schema) in SOURCES.items():
            codec = registry.codec(topic_name, load_schema(schema))
            writer = (
                self.sink.write_telemetry if table == TELEMETRY_TABLE else self.sink.write_events
            )

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
        source = BatchSource(self.settings, [topic for topic, _ in SOURCES.values()])
        consumer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")
        rows, seconds = self.settings.sink_batch_rows, self.settings.sink_batch_seconds
        try:
            while not stopping.is_set():
                batch = await loop.run_in_executor(consumer_thread, source.take, rows, seconds)
                by_topic: dict[str, list[SourceRecord]] = {}
                for rec in batch:
                    by_topic.setdefault(rec.topic, []).append(rec)
                for topic, records in by_topic.items():
                    await self.paths[topic].store_batch(records)
                await loop.run_in_executor(consumer_thread, source.commit, batch)
        finally:
            await loop.run_in_executor(consumer_thread, source.close)

    @property
    def status_path(self) -> Path:
        return self.settings.run_dir / "cold-worker.json"

    def close(self) -> None:
        self.write_status()
        self.executor.shutdown(wait=True)
        self.sink.close()

    def write_status(self) -> None:
        write_status(self.status_path, {"pid": os.getpid(), "ready": True, **asdict(self.counters)})

    async def _report_forever(self) -> None:
        while True:
            self.write_status()
            await asyncio.sleep(1.0)
