"""The `mqtt.downlink` record: what a producer (twin agent, OTA) writes to reach one device.

Its value is the Avro `Downlink` (topic, payload, qos, command id); the bridge
(ingest/downlink.py) publishes it to the device over MQTT.
"""

from __future__ import annotations

from typing import Any

__all__ = ["downlink_record"]


def downlink_record(
    device_id: str, subtopic: str, payload: bytes, qos: int = 1, command_id: str | None = None
) -> dict[str, Any]:
    """The Avro record a producer (twin agent, OTA) sends to reach `devices/<id>/<subtopic>`."""
    return {
        "topic": f"devices/{device_id}/{subtopic}",
        "payload": payload,
        "qos": qos,
        "command_id": command_id,
    }
