"""Records tests feed to jobs: a telemetry reading in the Avro ``Telemetry`` shape."""

from __future__ import annotations

from typing import Any


def telemetry_reading(device: str, seq: int, temperature: float | None) -> dict[str, Any]:
    """Reading ``seq`` of ``device`` (ts = seq seconds, received 5 ms later); other metrics null."""
    return {
        "device_id": device,
        "seq": seq,
        "ts": seq * 1000,
        "received_at": seq * 1000 + 5,
        "temperature": temperature,
        "humidity": None,
        "battery": None,
        "vibration_rms": None,
        "extra": {},
    }
