"""Downlink: records on Kafka `mqtt.downlink` become MQTT messages to one device.

A record's key is the device id and its value an Avro `Downlink` (topic, payload, qos;
producers build it with schemas/downlink.py). The bridge publishes it with the orchestrator
identity, so it checks first that the topic lies under `devices/<key>/`: a producer bug must
not reach another device or a wildcard topic.
Offsets are committed after the batch was handed to the MQTT client (at-least-once; commands
carry idempotent ids for the devices to drop repeats).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Message

from schemas.codec import AvroCodec, Decoded
from streams.runtime.source import gather

log = logging.getLogger("fleetstream.downlink")

DOWNLINK_TOPIC = "mqtt.downlink"
DOWNLINK_GROUP = "bridge-downlink"


@dataclass(frozen=True)
class MqttOut:
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True)
class DownlinkRefused:
    reason: str


def to_mqtt(key: bytes | None, value: bytes | None, codec: AvroCodec) -> MqttOut | DownlinkRefused:
    """Pure: a Kafka record to the MQTT message it becomes, or why it is refused."""
    if not key or value is None:
        return DownlinkRefused("missing key or value")
    decoded = codec.decode(value)
    if not isinstance(decoded, Decoded):
        return DownlinkRefused(f"undecodable: {decoded.reason}")
    record: Mapping[str, Any] = decoded.record
    device_id = key.decode("utf-8", "replace")
    topic = str(record["topic"])
    if not topic.startswith(f"devices/{device_id}/") or any(c in topic for c in "+#\0"):
        return DownlinkRefused(f"topic {topic!r} is not under devices/{device_id}/")
    qos = int(record["qos"])
    if qos not in (0, 1, 2):
        return DownlinkRefused(f"bad qos {qos}")
    return MqttOut(topic, bytes(record["payload"]), qos)


@dataclass
class DownlinkCounters:
    sent: int = 0
    refused: int = 0


class DownlinkRelay:
    def __init__(
        self,
        bootstrap: str,
        codec: AvroCodec,
        publish: Callable[[MqttOut], None],
        counters: DownlinkCounters,
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": DOWNLINK_GROUP,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._codec = codec
        self._publish = publish
        self.counters = counters

    async def run(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._consumer.subscribe([DOWNLINK_TOPIC])
        try:
            while not stopping.is_set():
                # A twin delta or OTA command goes out the moment it is here (no batch wait
                # after the first record); idle, one wake-up every half second.
                batch: list[Message] = await loop.run_in_executor(
                    None, lambda: gather(self._consumer, 500, idle_s=0.5, linger_s=0.0)
                )
                if self._relay(batch):
                    await loop.run_in_executor(
                        None, lambda: self._consumer.commit(asynchronous=False)
                    )
        finally:
            await loop.run_in_executor(None, self._consumer.close)

    def _relay(self, batch: list[Message]) -> bool:
        handled = False
        for msg in batch:
            if msg.error() is not None:
                continue
            handled = True
            out = to_mqtt(msg.key(), msg.value(), self._codec)
            if isinstance(out, DownlinkRefused):
                self.counters.refused += 1
                log.warning(
                    "downlink refused at %s[%d]@%d: %s",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    out.reason,
                )
                continue
            self._publish(out)
            self.counters.sent += 1
        return handled
