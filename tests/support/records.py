"""Records tests feed to jobs and sinks: a telemetry reading in the Avro ``Telemetry`` shape."""

from __future__ import annotations

from typing import Any


def telemetry_record(
    device: str, seq: int, ts: int, /, received_after_ms: int = 5, **fields: Any
) -> dict[str, Any]:
    """Reading ``seq`` of ``device`` taken at ``ts`` and received ``received_after_ms`` later,
    its metrics null but for ``fields`` (which may also set any other field)."""
    record: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "ts": ts,
        "received_at": ts + received_after_ms,
        "temperature": None,
        "humidity": None,
        "battery": None,
        "vibration_rms": None,
        "extra": {},
    }
    record.update(fields)
    return record


def telemetry_reading(device: str, seq: int, temperature: float | None) -> dict[str, Any]:
    """Reading ``seq`` of ``device`` (ts = seq seconds, received 5 ms later); other metrics null."""
    return telemetry_record(device, seq, seq * 1000, temperature=temperature)
