"""Synthetic telemetry the Kafka-side benches produce: one record shape, one produce loop."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer

from schemas.codec import AvroCodec


def synthetic_reading(i: int, devices: int, prefix: str, now_ms: int) -> dict[str, Any]:
    """Record ``i`` of a run over ``devices`` devices named ``<prefix><NNNN>``."""
    return {
        "device_id": f"{prefix}{i % devices:04d}",
        "seq": i // devices + 1,
        "ts": now_ms + i,
        "received_at": now_ms + i,
        "temperature": 20.0 + (i % 50) / 10,
        "humidity": 40.0,
        "battery": 90.0,
        "vibration_rms": 0.8,
        "extra": {},
    }


def produce_readings(
    producer: Producer,
    topic: str,
    codec: AvroCodec,
    rows: int,
    devices: int,
    prefix: str,
    now_ms: int,
) -> None:
    """Produce ``rows`` synthetic readings keyed by device, waiting when the local queue is full
    (the caller flushes)."""
    for i in range(rows):
        record = synthetic_reading(i, devices, prefix, now_ms)
        key = str(record["device_id"]).encode()
        while True:
            try:
                producer.produce(topic, key=key, value=codec.encode(record))
                break
            except BufferError:
                producer.poll(0.05)
