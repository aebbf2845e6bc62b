"""`python -m bench.micro_route`: µs per call of the bridge's per-message work, no services.

Times envelope.validate, AvroCodec.encode and the whole ingest.bridge.route_message on one
telemetry message (and one event), each beside fastavro.schemaless_writer writing the same
Telemetry record in the same run (what AvroCodec.encode used to cost): ratio = value / baseline.
Each figure is the best of several rounds, which is the least disturbed by other processes.
"""

from __future__ import annotations

import io
import json
import sys
import timeit
from collections.abc import Callable
from typing import Any

import fastavro

from ingest.bridge import route_message
from ingest.envelope import validate
from schemas.codec import AvroCodec, load_schema

NOW = 1_700_000_000_001
RECORD: dict[str, Any] = {
    "device_id": "d-1",
    "seq": 5,
    "ts": 1_700_000_000_000,
    "received_at": NOW,
    "temperature": 20.1,
    "humidity": 40.0,
    "battery": 90.0,
    "vibration_rms": 0.8,
    "extra": {},
}
TELEMETRY = json.dumps(
    {k: v for k, v in RECORD.items() if k not in ("device_id", "received_at", "extra")}
).encode()
EVENT = json.dumps(
    {"seq": 5, "ts": 1_700_000_000_000, "type": "reboot", "attributes": {"fw": "1.2.3"}}
).encode()


def per_call_us(call: Callable[[], object], rounds: int = 15, budget_s: float = 0.05) -> float:
    """Best-of-``rounds`` µs per call, each round about ``budget_s`` long."""
    number, _elapsed = timeit.Timer(call).autorange()
    number = max(1, int(number * budget_s / 0.2))  # autorange aims at 0.2 s
    return min(timeit.repeat(call, number=number, repeat=rounds)) / number * 1e6


def main() -> None:
    codecs = {
        "telemetry": AvroCodec(load_schema("Telemetry"), 1),
        "events": AvroCodec(load_schema("DeviceEvent"), 2),
    }
    telemetry = codecs["telemetry"]
    parsed = fastavro.parse_schema(load_schema("Telemetry"))
    header = b"\x00\x00\x00\x00\x01"

    def fastavro_encode() -> bytes:
        buffer = io.BytesIO()
        buffer.write(header)
        fastavro.schemaless_writer(buffer, parsed, RECORD, strict_allow_default=True)
        return buffer.getvalue()

    assert telemetry.encode(RECORD) == fastavro_encode(), "the codec's bytes are fastavro's"
    out = route_message("devices/d-1/telemetry", TELEMETRY, NOW, codecs)
    assert out.reason is None, out.headers
    assert route_message("devices/d-1/events", EVENT, NOW, codecs).reason is None

    stages: list[tuple[str, Callable[[], object]]] = [
        ("json.loads (telemetry payload)", lambda: json.loads(TELEMETRY)),
        ("envelope.validate telemetry", lambda: validate("telemetry", "d-1", TELEMETRY, NOW)),
        ("envelope.validate events", lambda: validate("events", "d-1", EVENT, NOW)),
        ("AvroCodec.encode Telemetry", lambda: telemetry.encode(RECORD)),
        (
            "route_message telemetry",
            lambda: route_message("devices/d-1/telemetry", TELEMETRY, NOW, codecs),
        ),
        ("route_message events", lambda: route_message("devices/d-1/events", EVENT, NOW, codecs)),
    ]
    baseline = per_call_us(fastavro_encode)
    rows = [(name, per_call_us(call)) for name, call in stages]
    baseline = min(baseline, per_call_us(fastavro_encode))  # measured around the others too

    print(f"python {sys.version.split()[0]}, fastavro {fastavro.__version__}")
    print(f"baseline: fastavro.schemaless_writer, Telemetry record = {baseline:.2f} µs")
    print(f"{'stage':<34}{'µs/call':>9}{'baseline µs':>13}{'ratio':>8}")
    for name, value in rows:
        print(f"{name:<34}{value:>9.2f}{baseline:>13.2f}{value / baseline:>8.3f}")


if __name__ == "__main__":
    main()
