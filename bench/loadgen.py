"""A lean MQTT 5 load generator for benchmarks: real devices, real mTLS, little Python.

The simulator (infra/simulator/) models devices faithfully through gmqtt, which costs tens of
microseconds per message: on 2 cores shared with the whole platform it cannot offer 5,000
msgs/s. Here each device is one TLS connection (its own certificate, so the broker's ACL
applies as for any device) writing pre-framed MQTT 5 PUBLISH packets at QoS 1 and counting
PUBACKs; only the JSON body (seq, ts, metrics) is made per message. Rate is paced per device
in 10 ms ticks, with at most `window` messages unacknowledged per connection.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from infra.provision import DeviceCredentials
from infra.settings import Settings
from ingest.mqtt_client import client_tls_context


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    # Protocol name, level 5, flags: clean start; keepalive; no properties.
    variable = _text("MQTT") + bytes([5, 0x02]) + struct.pack("!H", keepalive) + b"\x00"
    body = variable + _text(client_id)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """QoS 1 PUBLISH; `topic` is the length-prefixed topic name."""
    body = topic + struct.pack("!H", packet_id) + b"\x00" + payload
    return b"\x32" + _varint(len(body)) + body


@dataclass
class LoadStats:
    published: int = 0
    acked: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def offered_rate(self) -> float:
        return self.published / max(self.finished_at - self.started_at, 1e-9)


async def _read_packets(
    reader: asyncio.StreamReader, stats: LoadStats, inflight: list[int]
) -> None:
    while True:
        head = await reader.readexactly(1)
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        await reader.readexactly(length)
        if head[0] >> 4 == 4:  # PUBACK
            stats.acked += 1
            inflight[0] -= 1


async def _device(
    creds: DeviceCredentials,
    settings: Settings,
    rate: float,
    until: float,
    stats: LoadStats,
    window: int,
    rng: random.Random,
    first_seq: int,
) -> None:
    tls = client_tls_context(creds.ca_path, creds.cert_path, creds.key_path)
    reader, writer = await asyncio.open_connection(settings.host, settings.mqtt_port, ssl=tls)
    writer.write(connect_packet(creds.device_id))
    await writer.drain()
    head = await reader.readexactly(2)
    await reader.readexactly(head[1])  # CONNACK (short: no long properties expected)
    inflight = [0]
    acks = asyncio.create_task(_read_packets(reader, stats, inflight))
    topic = _text(f"devices/{creds.device_id}/telemetry")
    seq, packet_id, due = first_seq, 0, 0.0
    base = rng.uniform(18.0, 26.0)
    last = time.monotonic()
    try:
        while time.monotonic() < until:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            due += (now - last) * rate
            last = now
            frames = []
            while due >= 1 and inflight[0] < window:
                due -= 1
                seq += 1
                packet_id = packet_id % 65535 + 1
                body = {
                    "seq": seq,
                    "ts": int(time.time() * 1000),
                    "temperature": round(base + rng.gauss(0, 0.2), 3),
                    "humidity": round(45 + rng.gauss(0, 1.0), 3),
                    "battery": 90.0,
                    "vibration_rms": round(abs(rng.gauss(0.8, 0.1)), 4),
                }
                frames.append(publish_packet(topic, packet_id, json.dumps(body).encode()))
                inflight[0] += 1
            if frames:
                writer.write(b"".join(frames))
                stats.published += len(frames)
                await writer.drain()
        deadline = time.monotonic() + 30
        while inflight[0] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        acks.cancel()
        writer.write(b"\xe0\x00")  # DISCONNECT
        writer.close()


async def offer_load(
    settings: Settings,
    creds: Sequence[DeviceCredentials],
    rate: float,
    duration: float,
    window: int = 100,
    seed: int = 11,
) -> LoadStats:
    """Every device publishes `rate` msgs/s for `duration` s; returns once all are acked."""
    stats = LoadStats(started_at=time.monotonic())
    until = stats.started_at + duration
    rng = random.Random(seed)
    # A device's seq never goes back, also across runs on one stack: a run that started at 1
    # again would be dropped downstream as re-sent (stale) messages. The run's start in epoch
    # ms is above any earlier run's last seq while a device sends under 1,000 msgs/s.
    first_seq = int(time.time() * 1000)
    await asyncio.gather(
        *(
            _device(c, settings, rate, until, stats, window, random.Random(rng.random()), first_seq)
            for c in creds
        )
    )
    stats.finished_at = min(time.monotonic(), until)
    return stats
