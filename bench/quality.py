"""What the data-quality gate costs the cold path: the same batches through the cold path's
store step with the gate and without it, in one run, on one chDB.

Each side takes the same Avro records (1% of them bad) in batches of the worker's size and does
what the cold worker does with a batch once Kafka handed it over: decode (the kit's
`decode_batch`), records -> Arrow, then store. With the gate (streams/cold/quality.py) the store
judges the batch, writes the refused rows to `quarantine` and builds their dead letters (handed
to a list here: producing 1% of the rows to Kafka is left out of both sides); without it every
row goes to `telemetry`. The sides alternate, several rounds each, and each keeps its best
round. Rates are rows per CPU-second of this process (chDB's threads included), not per
wall-clock second: on a shared machine the wall clock measures the neighbours too, the CPU
time the work. Each round writes new device ids, so no insert is a deduplicated no-op.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from typing import Any

from bench.ingest import Result
from schemas.codec import AvroCodec, load_schema
from sinks.clickhouse import ClickHouseSink
from sinks.quality.rules import load_rules
from streams.cold.quality import QualityPath
from streams.runtime.loader import decode_batch
from streams.runtime.records import DeadLetter, SourceRecord

CODEC = AvroCodec(load_schema("Telemetry"), schema_id=1)


def _batches(prefix: str, rows: int, batch_rows: int, bad_every: int = 100) -> list[Any]:
    now = int(time.time() * 1000)
    records = []
    for i in range(rows):
        device = f"{prefix}{i % 1000:04d}"
        reading = {
            "device_id": device,
            "seq": i // 1000 + 1,
            "ts": now + i,
            "received_at": now + i + 20,
            "temperature": 20.0 + (i % 50) / 10,
            "humidity": 180.0 if i % bad_every == 0 else 40.0,
            "battery": 90.0,
            "vibration_rms": 0.8,
            "extra": {},
        }
        records.append(
            SourceRecord("telemetry.raw", i % 3, i, device.encode(), CODEC.encode(reading))
        )
    return [records[i : i + batch_rows] for i in range(0, rows, batch_rows)]


def _round(path: QualityPath, batches: list[list[SourceRecord]]) -> float:
    """Rows per CPU-second (this process's, chDB's threads included) of the store step."""
    started = time.process_time()
    for batch in batches:
        decoded = decode_batch(batch, CODEC)
        path.write_telemetry(decoded.records, decoded.sources)
    return sum(len(b) for b in batches) / (time.process_time() - started)


def run_quality(rows: int = 100_000, batch_rows: int = 50_000, rounds: int = 3) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="fleet-bench-quality-") as folder:
        sink = ClickHouseSink(f"chdb://{folder}")
        try:
            sink.ensure_schema()
            dead: list[DeadLetter] = []
            gated = QualityPath(sink, load_rules(), dead.extend)
            bare = QualityPath(sink, None, dead.extend)
            _round(bare, _batches(f"warm{uuid.uuid4().hex[:4]}-", batch_rows, batch_rows))
            with_gate, without = 0.0, 0.0
            for _ in range(rounds):
                batches = _batches(f"qg{uuid.uuid4().hex[:6]}-", rows, batch_rows)
                with_gate = max(with_gate, _round(gated, batches))
                batches = _batches(f"qb{uuid.uuid4().hex[:6]}-", rows, batch_rows)
                without = max(without, _round(bare, batches))
                dead.clear()
        finally:
            sink.close()
    return [
        Result(
            "cold path rows per CPU-second with the quality gate (baseline: the same path "
            "without it)",
            with_gate,
            "rows/CPU-s",
            without,
            with_gate / without,
        )
    ]
