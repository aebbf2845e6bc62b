"""A simulated fleet: many MQTT 5 devices over mTLS in one asyncio process.

Each device has its own key and certificate, connects with clean_start false and a session
expiry, publishes JSON telemetry at QoS 1 to `devices/<id>/telemetry` with its own growing
sequence number, and now and then an event to `devices/<id>/events`. A message is kept until
its PUBACK (gmqtt's store, replayed on reconnect); while offline, new messages wait in the
device's FIFO outbox.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from infra.provision import DeviceCredentials
from infra.services.mosquitto import client_tls_context
from infra.settings import Settings

SESSION_EXPIRY_S = 3600


@dataclass
class SensorModel:
    """Plausible readings: a daily temperature wave, slow battery drain, some drifting or
    failing devices (a drifting sensor warms steadily; a failing one vibrates and drains)."""

    base_temperature: float
    base_humidity: float
    battery: float
    drifting: bool
    failing: bool

    @classmethod
    def sample(cls, rng: random.Random) -> SensorModel:
        return cls(
            base_temperature=rng.uniform(18.0, 26.0),
            base_humidity=rng.uniform(35.0, 60.0),
            battery=rng.uniform(60.0, 100.0),
            drifting=rng.random() < 0.05,
            failing=rng.random() < 0.02,
        )

    def reading(self, rng: random.Random, seq: int, now_s: float) -> dict[str, float]:
        wave = 2.0 * math.sin(now_s / 3600.0 * 2 * math.pi / 24)
        drift = 0.05 * seq if self.drifting else 0.0
        self.battery = max(0.0, self.battery - (0.05 if self.failing else 0.001))
        vibration = rng.gauss(0.8, 0.1) * (6.0 if self.failing else 1.0)
        return {
            "temperature": round(self.base_temperature + wave + drift + rng.gauss(0, 0.2), 3),
            "humidity": round(min(100.0, max(0.0, self.base_humidity + rng.gauss(0, 1.0))), 3),
            "battery": round(self.battery, 3),
            "vibration_rms": round(abs(vibration), 4),
        }


@dataclass
class FleetStats:
    devices: int = 0
    connected: int = 0
    connect_failures: int = 0
    published: int = 0
    acked: int = 0
    events: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "devices": self.devices,
            "connected": self.connected,
            "connect_failures": self.connect_failures,
            "published": self.published,
            "acked": self.acked,
            "events": self.events,
            "elapsed_s": round(elapsed, 3),
            "publish_rate": round(self.published / elapsed, 1),
        }


class _AckCountingClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt drops a stored QoS 1 message on its PUBACK; count those (gmqtt 0.8 hook)."""

    def __init__(self, client_id: str, on_ack: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(client_id, **kwargs)
        self._on_ack = on_ack

    def _remove_message_from_queue(self, mid: int) -> None:
        super()._remove_message_from_queue(mid)
        self._on_ack()


class SimulatedDevice:
    def __init__(
        self,
        creds: DeviceCredentials,
        settings: Settings,
        stats: FleetStats,
        rng: random.Random,
        last_seq: dict[str, int] | None = None,
    ) -> None:
        self.creds = creds
        self.settings = settings
        self.stats = stats
        self.rng = rng
        self.model = SensorModel.sample(rng)
        # A device's sequence numbers only grow, across runs too: they continue from disk.
        self.seq = {"telemetry": 0, "events": 0, **(last_seq or {})}
        self.outbox: deque[tuple[str, bytes]] = deque()
        self.sent: list[tuple[str, int]] = []  # (kind, seq) handed to the broker, in order
        self.client = _AckCountingClient(
            creds.device_id,
            on_ack=self._acked,
            clean_session=False,
            session_expiry_interval=SESSION_EXPIRY_S,
        )

    @property
    def device_id(self) -> str:
        return self.creds.device_id

    def _acked(self) -> None:
        self.stats.acked += 1

    def tls(self) -> ssl.SSLContext:
        return client_tls_context(self.creds.ca_path, self.creds.cert_path, self.creds.key_path)

    async def connect(self) -> bool:
        try:
            await self.client.connect(
                self.settings.host,
                self.settings.mqtt_port,
                ssl=self.tls(),
                version=MQTTv50,
                keepalive=60,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            self.stats.connect_failures += 1
            return False
        self.stats.connected += 1
        return True

    def _message(self, kind: str, body: dict[str, Any]) -> tuple[str, bytes]:
        self.seq[kind] += 1
        payload = {"seq": self.seq[kind], "ts": int(time.time() * 1000), **body}
        self.sent.append((kind, self.seq[kind]))
        return f"devices/{self.device_id}/{kind}", json.dumps(payload).encode()

    def queue_telemetry(self) -> None:
        reading = self.model.reading(self.rng, self.seq["telemetry"] + 1, time.time())
        self.outbox.append(self._message("telemetry", reading))
        self.stats.published += 1
        if self.rng.random() < 0.02:
            event = {"type": "status", "attributes": {"battery": str(reading["battery"])}}
            self.outbox.append(self._message("events", event))
            self.stats.events += 1

    def flush_outbox(self) -> None:
        """Hand queued messages to the client in FIFO order while connected."""
        while self.outbox and self.client.is_connected:
            topic, payload = self.outbox.popleft()
            self.client.publish(topic, payload, qos=1)

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker (outbox plus gmqtt's in-flight store)."""
        storage = self.client._persistent_storage
        return len(self.outbox) + (0 if storage.is_empty else len(storage.get_all()))

    async def run(self, rate: float, until: float, max_messages: int | None) -> None:
        interval = 1.0 / rate
        await asyncio.sleep(self.rng.uniform(0, interval))  # spread devices over the period
        next_at = time.monotonic()
        while time.monotonic() < until and (
            max_messages is None or self.seq["telemetry"] < max_messages
        ):
            self.queue_telemetry()
            self.flush_outbox()
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flush_outbox()
            if self.pending() == 0:
                return True
            await asyncio.sleep(0.05)
        return self.pending() == 0

    async def close(self) -> None:
        if self.client.is_connected:
            await self.client.disconnect()


async def run_fleet(
    settings: Settings,
    credentials: Sequence[DeviceCredentials],
    rate: float,
    duration: float,
    max_messages: int | None = None,
    drain_timeout: float = 60.0,
    seed: int = 7,
    connect_concurrency: int = 50,
    on_start: Callable[[FleetStats], None] | None = None,
) -> tuple[FleetStats, list[SimulatedDevice]]:
    """Connect every device, publish at `rate` msgs/s each for `duration` s (or `max_messages`
    each), wait until every message is acknowledged, disconnect."""
    stats = FleetStats(devices=len(credentials))
    rng = random.Random(seed)
    devices = [
        SimulatedDevice(c, settings, stats, random.Random(rng.random()), load_seq(c))
        for c in credentials
    ]

    gate = asyncio.Semaphore(connect_concurrency)  # TLS handshakes cost CPU: pace them

    async def connect(device: SimulatedDevice) -> bool:
        async with gate:
            return await device.connect()

    connected = await asyncio.gather(*(connect(d) for d in devices))
    live = [d for d, ok in zip(devices, connected, strict=True) if ok]
    stats.started_at = time.monotonic()
    if on_start is not None:
        on_start(stats)  # live progress reads the counters while the fleet runs
    until = stats.started_at + duration
    await asyncio.gather(*(d.run(rate, until, max_messages) for d in live))
    await asyncio.gather(*(d.drain(drain_timeout) for d in live))
    await asyncio.gather(*(d.close() for d in live))
    for device in devices:
        save_seq(device.creds, device.seq)
    return stats, devices


def _seq_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".seq.json")


def load_seq(creds: DeviceCredentials) -> dict[str, int]:
    try:
        data = json.loads(_seq_path(creds).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_seq(creds: DeviceCredentials, seq: dict[str, int]) -> None:
    _seq_path(creds).write_text(json.dumps(seq))
