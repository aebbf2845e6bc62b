"""The Faust app of the cold path, configured from the one settings object.

The cold path is an app (consumer group) of its own, `fleetstream-cold`, so it scales, lags
and fails apart from the hot path. Workers scale by partition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import KafkaException, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.settings import Settings
from schemas.codec import CodecRegistry, load_schema
from sinks.clickhouse import (
    EVENTS_TABLE,
    TELEMETRY_TABLE,
    ClickHouseSink,
    InvalidBatch,
    SinkUnavailable,
)
from streams.cold import DLQ_TOPIC, ColdCounters, ColdPath, DeadLetter, SourceRecord

log = logging.getLogger("fleetstream.streams")

COLD_APP_ID = "fleetstream-cold"
SOURCES = {
    TELEMETRY_TABLE: ("telemetry.raw", "Telemetry"),
    EVENTS_TABLE: ("device.events", "DeviceEvent"),
}


def faust_broker(settings: Settings) -> str:
    return ";".join(f"kafka://{server}" for server in settings.bootstrap_servers.split(","))


def create_cold_app(settings: Settings) -> faust.App:
    datadir = settings.state_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        COLD_APP_ID,
        broker=faust_broker(settings),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,  # topics are declared once, by `fleet up` (infra/topics.py)
        topic_disable_leader=True,
        web_enabled=False,
        producer_acks=-1,
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, settings.sink_batch_rows * 2),
        datadir=str(datadir),
    )


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


def _source(event: Any) -> SourceRecord:
    message = event.message
    return SourceRecord(
        message.topic, message.partition, message.offset, message.key, message.value or b""
    )


class ColdWorker:
    """The app, its agents and the sink they share; one process owns the chDB folder."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_cold_app(settings)
        self.counters = ColdCounters()
        self.sink = ClickHouseSink(settings.warehouse_dsn)
        # One writer thread: batches reach the warehouse in order, one at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink")
        self.dlq = DeadLetterProducer(settings)
        self._register_agents()

    async def _in_sink_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _register_agents(self) -> None:
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
            self._agent(topic_name, path)
        self.app.timer(1.0)(self._report)

    def _agent(self, topic_name: str, path: ColdPath) -> None:
        topic = self.app.topic(topic_name, key_serializer="raw", value_serializer="raw")
        rows, seconds = self.settings.sink_batch_rows, self.settings.sink_batch_seconds

        async def cold_agent(stream: Any) -> None:  # a faust Stream (untyped take_events)
            async for events in stream.take_events(rows, within=seconds):
                await path.store_batch([_source(e) for e in events])

        self.app.agent(topic, name=f"cold-{path.table}")(cold_agent)

    @property
    def status_path(self) -> Path:
        return self.settings.run_dir / "cold-worker.json"

    async def _report(self) -> None:
        status = {"pid": os.getpid(), "ready": True, **self.counters.__dict__}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.status_path)
