"""Cold-path benchmarks: Kafka -> warehouse rows/s beside a bare loop, and the whole pipeline.

Cold path: with the worker stopped, N Avro records are produced to `telemetry.raw`; a bare loop
(confluent-kafka consume + fastavro decode + Arrow insert, same batch size, same chDB, a twin
table) loads them first; then the worker starts and loads the same records through its
consumer group and the sink. Both rates count the rows after the first batch over the time from
the first batch's insert to the last's, so start-up (the group join, chDB's first open) is left
out of both.

Pipeline: the simulator drives the real stack; sustained msgs/s is stored rows over the time
from the first publish to the last row queryable, beside the offered load; latency is device
timestamp -> warehouse insert, beside device timestamp -> bridge receive of the same rows.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from typing import Any

import clickhouse_connect
import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from bench.ingest import Result
from bench.loadgen import offer_load
from bench.telemetry import produce_readings
from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from infra.warehouse import fetch, warehouse_counts
from schemas.codec import CodecRegistry, load_schema
from schemas.topics import schema_of
from sinks.clickhouse import ClickHouseSink, telemetry_to_arrow

BENCH_TABLE = "telemetry_bench_raw"


def _produce(settings: Settings, prefix: str, rows: int) -> dict[int, int]:
    """N telemetry records; returns each partition's end offset before producing."""
    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        "telemetry.raw", load_schema(schema_of("telemetry.raw"))
    )
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "bench"})
    meta = consumer.list_topics("telemetry.raw", timeout=10).topics["telemetry.raw"]
    starts = {
        p: consumer.get_watermark_offsets(TopicPartition("telemetry.raw", p))[1]
        for p in meta.partitions
    }
    consumer.close()
    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "linger.ms": 20,
            "compression.type": "lz4",
            "enable.idempotence": True,
        }
    )
    produce_readings(producer, "telemetry.raw", codec, rows, 1000, prefix, int(time.time() * 1000))
    producer.flush(60)
    return starts


def _raw_loop(settings: Settings, starts: dict[int, int], rows: int, batch: int) -> float:
    """The bare ceiling: consume, fastavro-decode, Arrow, insert; rows/s after the first batch."""
    schema = fastavro.parse_schema(load_schema("Telemetry"))
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"bench-raw-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition("telemetry.raw", p, o) for p, o in starts.items()])
    sink = ClickHouseSink(settings.warehouse_dsn)
    sink.ensure_schema()  # the telemetry table the twin is copied from
    client = clickhouse_connect.get_client(dsn=settings.warehouse_dsn)
    client.command(f"CREATE TABLE IF NOT EXISTS {BENCH_TABLE} AS telemetry")
    done, inserted_at, counts = 0, [], []
    pending: list[Any] = []
    while done < rows:
        for msg in consumer.consume(10_000, 1.0):
            if msg.error() is None:
                body = io.BytesIO(msg.value() or b"")
                body.seek(5)
                pending.append(fastavro.schemaless_reader(body, schema, None))
        while len(pending) >= batch or (pending and done + len(pending) >= rows):
            chunk, pending = pending[:batch], pending[batch:]
            client.insert_arrow(BENCH_TABLE, telemetry_to_arrow(chunk))
            done += len(chunk)
            inserted_at.append(time.perf_counter())
            counts.append(len(chunk))
    consumer.close()
    client.close()
    sink.close()
    return sum(counts[1:]) / (inserted_at[-1] - inserted_at[0])


def _cold_rate(settings: Settings, prefix: str, rows: int) -> float:
    def stored() -> bool:
        return warehouse_counts(settings, device_prefix=prefix).stored >= rows

    wait_until(stored, timeout=600, interval=1.0)
    batches = fetch(
        settings,
        "SELECT toUnixTimestamp64Milli(stored_at) AS t, count() FROM telemetry FINAL"
        " WHERE startsWith(device_id, {p:String}) GROUP BY t ORDER BY t",
        {"p": prefix},
    ).rows
    span_s = (int(batches[-1][0]) - int(batches[0][0])) / 1000
    return sum(int(b[1]) for b in batches[1:]) / max(span_s, 1e-3)


def run_cold(settings: Settings, rows: int = 300_000) -> list[Result]:
    stack = Stack(settings)
    stack.up()
    stack.cold_worker.stop()
    prefix = f"coldb{uuid.uuid4().hex[:4]}-"
    starts = _produce(settings, prefix, rows)
    raw = _raw_loop(settings, starts, rows, settings.sink_batch_rows)
    stack.cold_worker.start(settings.startup_timeout_s)
    cold = _cold_rate(settings, prefix, rows)
    return [
        Result(
            "cold path: Kafka->chDB worker (baseline: bare consume+decode+Arrow insert)",
            cold,
            "rows/s",
            raw,
            cold / raw,
        )
    ]


def run_pipeline(
    settings: Settings, devices: int = 100, rate: float = 100.0, duration: float = 30.0
) -> list[Result]:
    """Lean mTLS devices (bench/loadgen.py) offer `devices * rate` msgs/s (10,000 by default:
    the issue's target) through broker, bridge, Kafka and the cold path into chDB."""
    stack = Stack(settings)
    stack.up()
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"e2eb{uuid.uuid4().hex[:4]}-"
    creds = load_or_provision(
        ca, [f"{prefix}{i:04d}" for i in range(devices)], settings.state_dir / "bench-devices", "ec"
    )
    started = time.time()
    stats = asyncio.run(offer_load(settings, creds, rate, duration))
    offered = stats.offered_rate

    def drained() -> bool:
        return warehouse_counts(settings, device_prefix=prefix).stored >= stats.published

    wait_until(drained, timeout=300, interval=0.5)
    row = fetch(
        settings,
        "SELECT count(), max(toUnixTimestamp64Milli(stored_at)),"
        " quantileExact(0.5)(dateDiff('millisecond', ts, stored_at)),"
        " quantileExact(0.99)(dateDiff('millisecond', ts, stored_at)),"
        " quantileExact(0.5)(dateDiff('millisecond', ts, received_at)),"
        " quantileExact(0.99)(dateDiff('millisecond', ts, received_at))"
        " FROM telemetry FINAL WHERE startsWith(device_id, {p:String})",
        {"p": prefix},
    ).rows[0]
    count, last_ms, p50, p99, k50, k99 = (float(v) for v in row)
    sustained = count / max(last_ms / 1000 - started, 1e-3)
    return [
        Result(
            "pipeline: devices->SQL row sustained (baseline: offered publish rate)",
            sustained,
            "msgs/s",
            offered,
            sustained / offered,
        ),
        Result(
            "pipeline: p50 publish->queryable (baseline: p50 publish->Kafka)",
            p50,
            "ms",
            k50,
            p50 / max(k50, 1.0),
        ),
        Result(
            "pipeline: p99 publish->queryable (baseline: p99 publish->Kafka)",
            p99,
            "ms",
            k99,
            p99 / max(k99, 1.0),
        ),
    ]
