"""The cold-path worker: Kafka batches -> decode -> warehouse, then commit.

It is a loader spec (:data:`COLD_JOB`) run by the kit's loader loop (streams/runtime/loader.py)
with the warehouse's writers. A consumer group of its own (`fleetstream-cold`), so it scales,
lags and fails apart from the hot path; workers scale by partition. It takes the Kafka
config and its :class:`LoaderOptions` (the composition root, infra/process.py, builds them from
the settings). It owns the embedded chDB folder, so it also answers `fleet sql` on the query
port. SIGTERM finishes the batch in hand (stored and committed), then exits.

Besides telemetry and device events it loads `twin.state` into `twin_history` (one row per twin
version). That topic is written by the hot worker's transactional producer: the loader's
consumer reads with isolation.level=read_committed (streams/runtime/source.py), which is what
keeps aborted twin states out; keep it.
It also loads `ota.rollouts` (compacted, the OTA controller's rollout states) into `ota_events`
(one row per rollout version and cohort: state and device counts per progress status), and
`alerts` (the hot path's alert lifecycle records) into `alerts`.

It follows the device registry (`registry.devices`, :mod:`streams.cold.registry`): read to its
end before the first batch, refreshed before each table's batch is stored: every row is stored
with its device's organization, project and group as the registry says when it is loaded (an
OTA rollout's rows with its target's), the tenant columns the query port's row filters use.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import KafkaException

from schemas.topics import TOPICS_BY_NAME, schema_of
from sinks.base import (
    ALERTS_TABLE,
    EVENTS_TABLE,
    OTA_EVENTS_TABLE,
    TELEMETRY_TABLE,
    TWIN_HISTORY_TABLE,
    InvalidBatch,
    SinkUnavailable,
    WarehouseSink,
    WriteResult,
)
from sinks.factory import open_sink
from sinks.quality.rules import QualityRules, load_rules
from sinks.warehouse_tables import ARROW_SCHEMAS, Columns
from streams.cold.quality import QUALITY_DLQ_TOPIC, RELEASE_TABLE, RELEASE_TOPIC, QualityPath
from streams.cold.registry import DeviceRegistry
from streams.cold.rows import origin_of, ota_events_rows, twin_history_rows
from streams.runtime.clients import KafkaConfig
from streams.runtime.loader import (
    DeadLetterProducer,
    LoaderLoop,
    LoaderOptions,
    LoaderSpec,
    LoadSource,
    SourcedWrite,
)
from streams.runtime.records import SourceRecord
from streams.runtime.transactions import Backoff

log = logging.getLogger("fleetstream.streams")

COLD_GROUP = "fleetstream-cold"
DLQ_TOPIC = "dlq.cold"

SOURCES = {
    table: (topic, schema_of(topic))  # the schema from the one catalogue (schemas/topics.py)
    for table, topic in (
        (TELEMETRY_TABLE, "telemetry.raw"),
        (EVENTS_TABLE, "device.events"),
        (TWIN_HISTORY_TABLE, "twin.state"),
        (OTA_EVENTS_TABLE, "ota.rollouts"),
        (ALERTS_TABLE, "alerts"),
        (
            RELEASE_TABLE,
            RELEASE_TOPIC,
        ),  # `fleet quality release` requests (streams/cold/quality.py)
    )
}

# State topics (compacted): a tombstone there deletes a key, it is not bad input.
COMPACTED_SOURCES = frozenset(
    topic for topic, _ in SOURCES.values() if TOPICS_BY_NAME[topic].cleanup == "compact"
)

COLD_JOB = LoaderSpec(
    name="cold-worker",
    group=COLD_GROUP,
    sources=tuple(
        LoadSource(topic, schema, table, compacted=topic in COMPACTED_SOURCES)
        for table, (topic, schema) in SOURCES.items()
    ),
    dead_letters=DLQ_TOPIC,
)


class Closeable(Protocol):
    def close(self) -> None: ...


Records = list[dict[str, Any]]
# The tenant columns (org, project, group) of a batch's rows, by their device.
TenantsOf = Callable[[Records], Columns]


# How a table's decoded records become its rows; the others are stored as decoded.
ROWS_OF: Mapping[str, Callable[[Records], Records]] = {
    TWIN_HISTORY_TABLE: twin_history_rows,
    OTA_EVENTS_TABLE: ota_events_rows,
}


def cold_writers(sink: WarehouseSink, tenants: TenantsOf | None = None) -> dict[str, SourcedWrite]:
    """Per table, what stores a batch of its decoded records into ``sink`` (in the loader's
    writer thread), told where they were read (:func:`origin_of`), with each row's tenant
    (``tenants``; without: empty; an OTA rollout's rows carry their target's)."""

    def tenant_columns(rows: Records) -> Columns | None:
        return tenants(rows) if tenants is not None else None

    def writer(table: str) -> SourcedWrite:
        rows_of = ROWS_OF.get(table, list)
        # An OTA rollout's rows carry their target's tenant: no batch-wide columns.
        tenants_of = tenant_columns if table != OTA_EVENTS_TABLE else lambda _rows: None

        def write(records: Records, sources: list[SourceRecord]) -> WriteResult:
            rows = rows_of(records)
            return sink.write(table, rows, origin_of(sources), tenants_of(rows))

        return write

    return {table: writer(table) for table in ARROW_SCHEMAS}


class ColdWorker:
    """The cold path's loader and the sink it writes (any :class:`sinks.base.WarehouseSink`:
    ClickHouse/chDB or Doris, as the warehouse URL says); one process owns a chDB folder."""

    def __init__(
        self,
        kafka: KafkaConfig,
        options: LoaderOptions,
        warehouse_dsn: str,
        rules: QualityRules | None = None,
    ) -> None:
        """``rules``: the quality gate's (default: sinks/quality/rules.toml)."""
        self.sink: WarehouseSink = open_sink(warehouse_dsn)
        self.registry = DeviceRegistry(kafka)
        self.quality_dlq = DeadLetterProducer(kafka, QUALITY_DLQ_TOPIC)
        writers = cold_writers(self.sink, self.tenants)
        self.quality = QualityPath(
            self.sink, rules or load_rules(), self.quality_dlq.send, self.registry.devices
        )
        writers[TELEMETRY_TABLE] = self.quality.write_telemetry
        writers[RELEASE_TABLE] = self._apply_releases
        self.loader = LoaderLoop(
            COLD_JOB,
            kafka,
            options,
            {},
            retryable=(SinkUnavailable,),
            rejected=(InvalidBatch,),
            sourced_writers={table: self._after_registry(w) for table, w in writers.items()},
            status_extra=self.quality.status,
        )
        self.counters = self.loader.counters

    def _apply_releases(self, records: list[dict[str, Any]], _: list[SourceRecord]) -> None:
        self.quality.apply_releases(records)

    def _after_registry(self, write: SourcedWrite) -> SourcedWrite:
        """`write`, run once the registry is refreshed (and its dead letters written)."""

        def refreshed_then_write(
            records: list[dict[str, Any]], sources: list[SourceRecord]
        ) -> object:
            self.refresh_registry()
            return write(records, sources)

        return refreshed_then_write

    def tenants(self, rows: list[dict[str, Any]]) -> Columns:
        """The tenant columns of a batch's rows, by their device, as the registry says now."""
        return self.registry.devices.tenants([row["device_id"] for row in rows]).as_columns()

    def refresh_registry(self) -> None:
        """What the registry wrote since (never blocks); its unreadable records go to the
        dead-letter topic before the batch is stored (in the writer thread)."""
        self.registry.refresh()
        dead = self.registry.take_dead_letters()
        if dead:
            try:
                self.loader.dlq.send(dead)
            except BaseException:
                self.registry.returned(dead)
                raise
            self.counters.dead_lettered += len(dead)

    async def run(self, stopping: asyncio.Event) -> None:
        await self.loader.run(stopping)

    def write_status(self, ready: bool = True, **extra: Any) -> None:
        self.loader.write_status(ready, **extra)

    def close(self) -> None:
        self.loader.close()
        self.registry.close()
        self.sink.close()


def apply_schema(worker: ColdWorker, stopping: threading.Event) -> bool:
    """Versioned DDL, applied once the warehouse answers: it may be down, or the embedded
    folder held by another process for a while. Waits with back-off (reporting why in the
    status file) rather than giving up: what waits in Kafka is loaded once it is back.
    Returns False if asked to stop first."""
    for delay in Backoff(first=0.5, longest=5.0).delays():
        try:
            worker.sink.ensure_schema()
            return True
        except SinkUnavailable as exc:
            worker.counters.retries += 1
            worker.write_status(ready=False, waiting_for=str(exc))
            log.warning("warehouse unavailable (%s); retrying in %.1fs", exc, delay)
            if stopping.wait(delay):
                return False
    return False


def catch_up_registry(worker: ColdWorker, stopping: threading.Event) -> bool:
    """The device registry read to its end before the first batch (Kafka may be starting, or
    the topic not created yet): waits with back-off. Returns False if asked to stop first."""
    for delay in Backoff(first=0.5, longest=5.0).delays():
        try:
            devices = worker.registry.catch_up()
            log.info("device registry read to its end: %d records", devices)
            return True
        except (KafkaException, RuntimeError, TimeoutError) as exc:
            worker.counters.retries += 1
            worker.write_status(ready=False, waiting_for=f"registry.devices: {exc}")
            log.warning("device registry not readable (%s); retrying in %.1fs", exc, delay)
            if stopping.wait(delay):
                return False
    return False


async def serve(
    kafka: KafkaConfig,
    options: LoaderOptions,
    warehouse_dsn: str,
    serve_queries: Callable[[], Closeable],
    where: str,
    expose: Callable[[ColdWorker], object] = lambda _worker: None,
) -> None:
    """The cold-path process: the schema applied, the query port served (`serve_queries`,
    given by the composition root), batches loaded until SIGTERM or SIGINT. `expose` serves
    the worker's metrics (the composition root knows where)."""
    worker = ColdWorker(kafka, options, warehouse_dsn)
    expose(worker)
    halt = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: halt.set())
    if not (apply_schema(worker, halt) and catch_up_registry(worker, halt)):
        worker.close()
        return
    server = serve_queries()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("cold-path worker up; queries on %s", where)
    try:
        await worker.run(stopping)
    finally:
        server.close()
        worker.close()
        log.info("cold-path worker stopped: %s", worker.counters)
